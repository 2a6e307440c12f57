"""Patient/group ids from file names: the named rules of the catalog (``dataset.group_rule``) and ``group_of``.

The split puts every group in one split only (medflow.data.split), so a rule must give every image of one
patient the same id. Each rule below is a regex searched in the file name (not the path); capture group 1
is the id. Where a name carries no patient id, the rule falls back to the coarsest unit the name does name
(the malaria slide), never to the single file. Each rule states what it assumes about its source's names
and lists real names from that source with the id they get; tests check the examples and run every rule
over the real folders of ../shared/data, requiring that every name gets an id.

A rule may also name *runs* (:attr:`GroupRule.runs`, :func:`join_runs`): file names that carry only a running
number, where consecutive numbers in one folder are adjacent slices of one scan. A regex on one name cannot
see its neighbours, so the manifest step joins them over the whole folder.

A custom rule (any other ``dataset.group_rule``) is a regex with one capturing group; a name it does not
match becomes a group of its own, which the manifest step counts and warns about.

The ``dicom`` rule reads no name: the manifest step takes the patient from each DICOM file's PatientID, or
its StudyInstanceUID where PatientID is missing (counted and warned about), and stores it only hashed with
the project's salt (:func:`project_salt`, :func:`medflow.imaging.dicom.hashed`).
"""

from __future__ import annotations

import os
import re
import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GroupRule:
    """One named rule: the regex, what it assumes about the names, real (file name, id) examples."""

    pattern: str
    doc: str
    examples: tuple[tuple[str, str], ...]
    # A regex on the file name whose group 1 is a running number: such files of one folder whose numbers
    # follow each other (gaps up to RUN_GAP) are one case (join_runs). Empty: no runs.
    runs: str = ""


# Largest step between the numbers of a run: 2 lets one missing slice (658, 660, 661 are one scan).
RUN_GAP = 2


RULES: dict[str, GroupRule] = {
    "kermany": GroupRule(
        pattern=r"^(person\d+|(?:[A-Z]+\d*-)?IM-\d+)",
        doc="Kermany chest X-rays (chest_xray, chest_xray_external): pneumonia images are named "
            "person<N>_{bacteria,virus}_<M>, normals IM-<N>-<M>[-<K>] and, in the second batch, "
            "NORMAL2-IM-<N>-<M>[-<K>]; the id is the part before the image counter. person<N> is one child "
            "whatever the pneumonia type; NORMAL2-IM-<N> and IM-<N> are different batches, so different ids.",
        examples=(("person1_bacteria_1.jpeg", "person1"), ("person1301_virus_2241.jpeg", "person1301"),
                  ("IM-0214-0001.jpeg", "IM-0214"), ("IM-0640-0001-0001.jpeg", "IM-0640"),
                  ("NORMAL2-IM-0793-0001.jpeg", "NORMAL2-IM-0793")),
    ),
    "nih_malaria": GroupRule(
        pattern=r"^(?:C\d+[A-Z]?(?=P\d))?(P\d+|C\d+)",
        doc="NIH malaria cells: names start with the slide, C<N> with an optional letter (C51A, C37B), then, "
            "on the slides of the 150 infected patients, the patient P<N> (C100P61ThinF_..., C68P29N_ThinF_..., "
            "C47P8thin_Original_Motic_...). The id is the patient P<N>; a name without one (the healthy "
            "patients' slides C1-C13 and C201-C241: C213ThinF_..., C1_thinF_..., C3thin_original_...) falls "
            "back to its slide number C<N>. In the real names each patient is on one slide and each slide "
            "shows one patient (checked on the 1,200 names of shared/data/malaria_cells), so patient and "
            "slide ids never join images of two splits.",
        examples=(("C100P61ThinF_IMG_20150918_145938_cell_138.png", "P61"),
                  ("C51AP12thinF_IMG_20150724_153313_cell_43.png", "P12"),
                  ("C68P29N_ThinF_IMG_20150819_134112_cell_79.png", "P29"),
                  ("C47P8thinOriginalOlympusCX21_IMG_20150717_174844_cell_52.png", "P8"),
                  ("C47P8thin_Original_Motic_IMG_20150714_093636_cell_142.png", "P8"),
                  ("C213ThinF_IMG_20151106_112853_cell_19.png", "C213"),
                  ("C1_thinF_IMG_20150604_104919_cell_134.png", "C1"),
                  ("C4thin_original_IMG_20150608_165620_cell_208.png", "C4")),
    ),
    "isic": GroupRule(
        pattern=r"^(ISIC_\d+)",
        doc="ISIC skin lesions: ISIC_<7 digits>.jpg, one image per lesion; the archive publishes no patient "
            "ids, so the image id is the group (near-duplicate grouping in the filter joins re-shot lesions).",
        examples=(("ISIC_0000000.jpg", "ISIC_0000000"), ("ISIC_0013456.jpg", "ISIC_0013456")),
    ),
    "covid_ct": GroupRule(
        pattern=r"^(.+?)(?:-p\d+.*|_\d+(?:%\d+)?|%\d+)?\.\w+$",
        doc="COVID-CT: the slices of one case share the stem before '%<N>' (1%0.jpg, 1%1.jpg -> 1); COVID "
            "images cut from papers are grouped by paper, the stem before '-p<page>' or a trailing "
            "'_<figure>' (2020.03.12.20034686-p17-91-1.png -> 2020.03.12.20034686; "
            "PIIS0140673620301549_0%0.png and PIIS0140673620301549_1.png -> PIIS0140673620301549). "
            "NonCOVID PNGs named by a bare running number are adjacent slices of one scan when their numbers "
            "follow each other (1497.png ... 1501.png; 658.png, 660.png with one number missing): runs with "
            "steps of at most RUN_GAP (2) are one case, id '<first>-<last>' (1497-1501); the regex alone "
            "gives each its number. Checked by eye on the 105 NonCOVID images of shared/data/covid_ct: "
            "every pair 1-2 apart shows one patient, pairs 7 or more apart different ones; their pHashes "
            "cannot tell (adjacent slices 4-26 bits apart, unrelated slices of the two classes from 6). "
            "Bare-number JPEGs (7.jpg, 8.jpg) are case numbers like 7%0.jpg, not slices: never joined.",
        examples=(("1%0.jpg", "1"), ("1%2.jpg", "1"), ("1046.png", "1046"), ("0.jpg", "0"),
                  ("2020.03.12.20034686-p17-91-1.png", "2020.03.12.20034686"),
                  ("kjr-21-e25-p1-6.png", "kjr-21-e25"), ("bmj.m606.full-p4-22%0.png", "bmj.m606.full"),
                  ("PIIS0140673620301549_0%0.png", "PIIS0140673620301549"),
                  ("PIIS0140673620301549_2.png", "PIIS0140673620301549"),
                  ("PIIS0140673620303603%8.png", "PIIS0140673620303603"),
                  ("2019-novel-Coronavirus-severe-adult-respiratory-dist_2020_International-Jour-p3-89%0.png",
                   "2019-novel-Coronavirus-severe-adult-respiratory-dist_2020_International-Jour")),
        runs=r"^(\d+)\.png$",
    ),
    "dicom": GroupRule(
        pattern=r"^(.+?)(?:\.[^.]*)?$",
        doc="DICOM: the patient is the file's PatientID tag, else its StudyInstanceUID (the manifest step "
            "counts those under dicom_patient_from_study and warns), stored as 'dcm-' and 16 hex digits of a "
            "SHA-256 salted per project, never in clear. The regex (the stem, as the filename rule) only "
            "serves files that are not DICOM, or DICOM files with neither tag: each is then its own group, "
            "counted under group_rule_fallback.",
        examples=(("IM-0001-0001.dcm", "IM-0001-0001"), ("1.2.840.113619.2.55.3.604", "1.2.840.113619.2.55.3")),
    ),
    "filename": GroupRule(
        pattern=r"^(.+?)(?:\.[^.]*)?$",
        doc="Every file its own group (the stem): for sources whose names carry no patient id.",
        examples=(("ISIC_0000000.jpg", "ISIC_0000000"), ("1%0.jpg", "1%0"),
                  ("bmj.m606.full-p4-22%0.png", "bmj.m606.full-p4-22%0")),
    ),
}

# Rule name -> regex: what dataset.group_rule names (medflow.config validates against it).
GROUP_RULES: dict[str, str] = {name: rule.pattern for name, rule in RULES.items()}


SALT_FILE = Path(".dvc") / "tmp" / "medflow" / "salt"  # under the project root; ignored by git and DVC


def project_salt(root: Path | str) -> bytes:
    """The project's secret salt for pseudonymised ids (the DICOM patient hashes), created on first use.

    32 random bytes (hex) in :data:`SALT_FILE` under ``root``, never committed: a hash cannot be reversed by
    trying the likely ids without it. Created exclusively (a hard link of a complete temporary file), so
    two runs starting at once agree on one salt. Losing the file changes every hash at the next manifest run
    (each patient still gets one id, so splits stay patient-disjoint, but the split assignment may change).
    """
    path = Path(root) / SALT_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".salt.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(secrets.token_hex(32))
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another run created it first: use that one
    finally:
        tmp.unlink()
    return path.read_bytes().strip()


def group_of(filename: str, pattern: re.Pattern[str]) -> str | None:
    """Patient/group id: group 1 of ``pattern`` searched in the file name, or None when it does not match."""
    m = pattern.search(filename)
    return m.group(1) if m and m.group(1) else None


def join_runs(names: Sequence[str], folders: Sequence[str], groups: Sequence[str], rule: str) -> list[str]:
    """The group ids with the runs of the named ``rule`` joined (:attr:`GroupRule.runs`); ``groups`` as they
    are for a rule without runs or a custom regex.

    ``names[i]`` is the file name of row i, ``folders[i]`` its folder (runs never cross folders: another
    class or source), ``groups[i]`` its id from the rule's regex. Files whose name matches the run regex
    are sorted by number per folder; a step of more than :data:`RUN_GAP` ends a run. Every member of a run
    of two or more gets the id ``<first>-<last>``; a lone number keeps its id.
    """
    out = list(groups)
    runs = RULES[rule].runs if rule in RULES else ""
    if not runs:
        return out
    pattern = re.compile(runs)
    numbered: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, (name, folder) in enumerate(zip(names, folders, strict=True)):
        if m := pattern.search(name):
            numbered[folder].append((int(m.group(1)), i))
    for members in numbered.values():
        for run in _runs(sorted(members)):
            if len(run) > 1:
                for _, i in run:
                    out[i] = f"{run[0][0]}-{run[-1][0]}"
    return out


def _runs(members: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """(number, row) pairs sorted by number, cut where the number steps by more than RUN_GAP."""
    runs: list[list[tuple[int, int]]] = []
    for number, row in members:
        if runs and number - runs[-1][-1][0] <= RUN_GAP:
            runs[-1].append((number, row))
        else:
            runs.append([(number, row)])
    return runs

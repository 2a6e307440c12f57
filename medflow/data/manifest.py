"""Manifest: one row per image found under the image roots (see schema.MANIFEST_COLUMNS).

Labels come from the nearest ancestor folder that is a key of ``dataset.labels``; the patient/group id
from the dataset's rule applied to the file name (medflow.patients); the source's own split from an
ancestor folder named train/val/test. Headers are read (size, mode, format) but images are not decoded:
that is the filter's job. DICOM files are found by their ``DICM`` marker whatever their name, their header
is read by pydicom (format ``DICOM``), and under the ``dicom`` group rule their patient is the hashed
PatientID (or StudyInstanceUID) of :mod:`medflow.imaging.dicom`; no other tag is read into the manifest.
Files outside any labelled folder are skipped and counted, and a WARNING names their folders (e.g. a
``COVID19/`` class that ``dataset.labels`` does not list); nothing is ever modified. The manifest step
(tasks/manifest.py) reads the roots and writes the CSV.
"""

from __future__ import annotations

import logging
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from PIL import Image

from medflow.data.digests import DigestCache, stat_keys
from medflow.data.walk import WalkReport, walk_files
from medflow.imaging import dicom
from medflow.imaging.files import file_problem, shown_path
from medflow.io import SOURCE_ROOT, display_path, root_labels, sha256_file
from medflow.patients import RULES, group_of, join_runs
from medflow.schema import IMAGE_EXTENSIONS, MANIFEST_COLUMNS, SOURCE_SPLIT_NAMES

log = logging.getLogger(__name__)
_UNKNOWN_SHOWN = 10  # folders named in the warning about images under no class folder
CHUNK_ROWS = 4096  # rows read and written at a time (memory holds one chunk's rows, not the manifest's)


def iter_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` in sorted order: :func:`medflow.data.walk.walk_files` (hidden files and
    folders skipped alike, OS junk skipped, symlinked folders followed with a loop guard), logged once; the files
    with an image extension (schema.IMAGE_EXTENSIONS), and any other file with the DICM marker."""
    report = WalkReport()
    for path in walk_files(root, report):  # is_dicom_file never blocks on a FIFO (opened non-blocking)
        if Path(path.name).suffix.lower() in IMAGE_EXTENSIONS or dicom.is_dicom_file(path):
            yield path
    report.log(root)


def class_of(parts: tuple[str, ...], labels: Mapping[str, int]) -> str | None:
    """Nearest ancestor folder naming a class (exact match first, then case-insensitive)."""
    lowered = {k.lower(): k for k in labels}
    for part in reversed(parts):
        if part in labels:
            return part
        if part.lower() in lowered:
            return lowered[part.lower()]
    return None


def source_split_of(parts: tuple[str, ...]) -> str:
    """train/val/test when an ancestor folder carries the source's own split, else ''."""
    for part in reversed(parts):
        split = SOURCE_SPLIT_NAMES.get(part.lower())
        if split:
            return split
    return ""


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory (the project root under DVC), links kept
    (:func:`medflow.io.display_path`)."""
    return display_path(path)


def _shown(rel: str, root: str) -> str:
    """The manifest's ``path`` of an image: project-relative, or ``@<label>/<rel>`` under a source root outside
    the project (``root`` is then ``@<label>``): never absolute, never a home folder. The manifest, the clean table,
    the split table and the reports are shared; the steps that open files resolve it (:func:`medflow.io.readable_path`).
    ``root`` is already shown (``@<label>``, or the root's :func:`_display_path`) and ``rel`` is a walk's POSIX
    path below it (no ``.`` or ``..`` parts), so joining them is what :func:`_display_path` of the file gives."""
    return rel if root == "." else f"{root}/{rel}"


def _file_facts(path: Path, salt: bytes = b"") -> dict[str, Any]:
    """sha256, size and header facts of one file; header fields are None when it is not a readable image.

    A DICOM file also gets ``_patient`` (its hashed patient id with ``salt``, '' when it has none) and
    ``_patient_tag`` (the tag it came from), which the caller pops. A file that cannot be read
    (:func:`file_problem`, or an error while hashing it) gets a blank sha256 and 0 bytes, and ``_problem``
    saying why: the filter lists it in rejects.csv as ``unreadable``."""
    facts: dict[str, Any] = {"sha256": "", "bytes": 0, "width": None, "height": None, "mode": None, "format": None}
    problem = file_problem(path)
    if not problem:
        try:
            facts.update(sha256=sha256_file(path), bytes=path.stat().st_size)
        except OSError as e:
            problem = f"cannot read: {e.strerror or e}"
    if problem:
        return {**facts, "_problem": problem}
    try:
        _read_header(path, salt, facts)
    except Exception as e:  # noqa: BLE001 - a header (or metadata block) that cannot be parsed: the filter's job
        log.debug("no readable header in %s: %s", path, e)
    return facts


def _read_header(path: Path, salt: bytes, facts: dict[str, Any]) -> None:
    """Header facts of a readable file into ``facts`` (DICOM by pydicom, the rest by Pillow)."""
    if dicom.is_dicom_file(path):
        read = dicom.read_patient(path, salt)
        if read is not None:
            head, patient, tag = read
            facts.update(width=head.width or None, height=head.height or None, mode=head.mode,
                         format=dicom.FORMAT, _patient=patient, _patient_tag=tag)
        return
    with Image.open(path) as im:
        facts.update(width=im.width, height=im.height, mode=im.mode, format=im.format)


def file_groups(paths: list[Path], pattern: re.Pattern[str], rule: str, salt: bytes | None) -> list[str]:
    """Per file, its patient/group id as the manifest step gives it (no runs joined): under the ``dicom``
    rule a DICOM file's hashed patient (``salt``: the project's), else the rule on the file name, else the
    name itself. For images outside the pipeline (``evaluate --images``, external sets) to meet the training
    split's ids."""
    out = []
    for path in paths:
        read = dicom.read_patient(path, salt or b"") if rule == "dicom" and dicom.is_dicom_file(path) else None
        out.append(read[1] if read and read[1] else group_of(path.name, pattern) or path.name)
    return out


def _dicom_group(row: dict[str, Any], patient: str, tag: str, skipped: dict[str, int]) -> None:
    """Under the dicom rule: the row's group is its hashed patient; the counts say where it came from."""
    if patient:
        row["group"] = patient
        skipped["dicom_patient_from_study"] += tag == "StudyInstanceUID"
    else:
        row["group"] = row["group"] or Path(row["relpath"]).stem
        skipped["group_rule_fallback"] += 1


def _warn_unknown_folders(root: Path, unknown: Counter[str], labels: Mapping[str, int]) -> None:
    """One WARNING naming the folders (with their image counts) under no class folder of ``dataset.labels``:
    a class the labels do not know (``COVID19/``) must be visible, not only counted."""
    if not unknown:
        return
    named = [f"{'(top level)' if folder == '.' else folder + '/'} ({n})" for folder, n in sorted(unknown.items())]
    shown = ", ".join(named[:_UNKNOWN_SHOWN]) + (f", and {len(named) - _UNKNOWN_SHOWN} more folders"
                                                 if len(named) > _UNKNOWN_SHOWN else "")
    log.warning("%s: %d image file(s) are under no class folder of dataset.labels (%s) and were skipped: %s",
                root, sum(unknown.values()), ", ".join(labels), shown)


def _all_facts(paths: list[Path], salt: bytes, cache: DigestCache, workers: int) -> list[dict[str, Any]]:
    """:func:`_file_facts` of each path, in order: from ``cache`` where the file's stat matches a row (the file
    is not opened), else read by ``workers`` threads and added to ``cache``."""
    keys = stat_keys(paths)
    found = cache.lookup_many(keys)
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            for i, facts in zip(todo, pool.map(lambda i: _file_facts(paths[i], salt), todo), strict=True):
                found[i] = facts
                if (key := keys[i]) is not None:
                    cache.add(key, facts)
    return [f for f in found if f is not None]


class _Found(NamedTuple):
    """One image of the walk, before its file is read (small: the walk holds one per image; the shown and the
    absolute path are made from ``rel`` and its root when the chunk is read)."""

    rel: str  # as found (relative to its root)
    root: int  # index into the roots
    class_name: str
    label: int
    group: str
    source_split: str


class _Root(NamedTuple):
    path: Path
    shown: str  # its ``root`` column before shown_path (``@<label>`` or project-relative)


def _row(f: _Found, root: _Root) -> dict[str, Any]:
    """The manifest columns ``f`` knows before its file is read."""
    return {"path": shown_path(_shown(f.rel, root.shown)), "relpath": shown_path(f.rel),
            "root": shown_path(root.shown), "class_name": f.class_name, "label": f.label, "group": f.group,
            "source_split": f.source_split}


def _shown_roots(roots: list[Path]) -> list[_Root]:
    labels_of = root_labels(str(r) for r in roots)
    return [_Root(r, f"{SOURCE_ROOT}{labels_of[str(r)]}" if str(r) in labels_of else _display_path(r)) for r in roots]


def root_columns(roots: list[Path]) -> list[str]:
    """The manifest's ``root`` column of each root's images (``@<label>`` for a root outside the project): the
    key of the root's part of the table (medflow.io.TableWriter)."""
    return [shown_path(r.shown) for r in _shown_roots(roots)]


def _walk_roots(roots: list[Path], labels: Mapping[str, int], pattern: re.Pattern[str], rule: str,
                skipped: dict[str, int], only: int | None = None) -> tuple[list[_Root], list[_Found]]:
    """The images of a labelled class folder under ``roots`` (``only``: under ``roots[only]`` alone, the labels
    of outside roots still made from all of them), in walk order, their groups' runs joined."""
    found: list[_Found] = []
    shown_roots = _shown_roots(roots)
    for index, root in enumerate(roots):
        if only is not None and index != only:
            continue
        unknown: Counter[str] = Counter()
        for path in iter_images(root):
            rel = path.relative_to(root)
            cls = class_of(rel.parts[:-1], labels)
            if cls is None:
                skipped["no_class_folder"] += 1
                unknown[rel.parent.as_posix()] += 1
                continue
            group = group_of(path.name, pattern)
            if rule == "dicom":
                group = group or ""  # counted later, once the header says whether the file names its patient
            elif group is None:
                skipped["group_rule_fallback"] += 1
                group = path.stem
            found.append(_Found(rel.as_posix(), index, cls, labels[cls], sys.intern(shown_path(group)),
                                source_split_of(rel.parts[:-1])))
        _warn_unknown_folders(root, unknown, labels)
    if RULES.get(rule) is not None and RULES[rule].runs:
        folders = [f"{shown_path(shown_roots[f.root].shown)}/{Path(shown_path(f.rel)).parent}" for f in found]
        groups = join_runs([Path(shown_path(f.rel)).name for f in found], folders, [f.group for f in found], rule)
        found = [f._replace(group=shown_path(g)) for f, g in zip(found, groups, strict=True)]
    return shown_roots, found


def manifest_chunks(roots: list[Path], labels: Mapping[str, int], pattern: re.Pattern[str], skipped: dict[str, int],
                    workers: int = 8, rule: str = "", salt: bytes | None = None, cache: DigestCache | None = None,
                    chunk: int | None = None, only: int | None = None) -> Iterator[pd.DataFrame]:
    """The manifest of the images under ``roots`` (:func:`build_manifest`) as DataFrames of ``chunk`` rows, in
    walk order: only one chunk's rows are held, so memory stays flat. ``skipped`` gets the counts (complete
    once the last chunk is out), ``cache`` is saved after it. ``chunk`` None: :data:`CHUNK_ROWS`. ``only``: the
    images of ``roots[only]`` alone (the manifest step indexes each root with its own digest cache)."""
    chunk = chunk or CHUNK_ROWS
    if rule == "dicom" and not salt:
        raise ValueError("build_manifest: the dicom group rule needs the project salt")
    skipped.update(no_class_folder=0, group_rule_fallback=0, **({"dicom_patient_from_study": 0} if rule == "dicom"
                                                               else {}))
    shown_roots, found = _walk_roots(roots, labels, pattern, rule, skipped, only)
    cache = cache or DigestCache(None)
    unreadable: list[str] = []
    for start in range(0, len(found), chunk):
        part = found[start:start + chunk]
        facts = _all_facts([shown_roots[f.root].path / f.rel for f in part], salt or b"", cache, workers)
        rows = []
        for f, fact in zip(part, facts, strict=True):
            row = _row(f, shown_roots[f.root])
            patient, tag = fact.pop("_patient", ""), fact.pop("_patient_tag", "")
            if problem := fact.pop("_problem", ""):
                unreadable.append(f"{row['path']}: {problem}")
            if rule == "dicom":
                _dicom_group(row, patient, tag, skipped)
            rows.append({**row, **fact})
        yield _frame(rows)
    cache.save()
    if cache.folder is not None:
        log.info("manifest: %d of %d files' digests from the cache", cache.hits, len(found))
    if unreadable:
        skipped["unreadable"] = len(unreadable)
        log.warning("%d file(s) cannot be read; each is listed, with why, in the filter's rejects "
                    "(reason unreadable): %s", len(unreadable), "; ".join(unreadable[:5]))


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return df.astype({"width": "Int64", "height": "Int64", "bytes": "int64", "label": "int64"})


def build_manifest(roots: list[Path], labels: Mapping[str, int], pattern: re.Pattern[str],
                   workers: int = 8, rule: str = "", salt: bytes | None = None,
                   cache: DigestCache | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Index the images under ``roots``: one row per image of a labelled class folder, in walk order.

    ``pattern`` is the dataset's patient/group rule (medflow.patients); a file name it does not match
    becomes a group of its own (its stem) and is counted under ``group_rule_fallback``. ``rule`` is the
    rule's name (``dataset.group_rule``): a named rule with runs joins them (:func:`join_runs`). Returns the
    manifest (schema.MANIFEST_COLUMNS) and the counts ``no_class_folder`` (skipped) and
    ``group_rule_fallback``. Files are read (sha256, image header) by ``workers`` threads, never written;
    ``cache`` (:class:`medflow.data.digests.DigestCache`, saved here) spares the files whose stat it knows.
    The manifest step writes the same rows chunk by chunk (:func:`manifest_chunks`).

    ``rule == "dicom"``: each DICOM file's group is its hashed patient (``salt``: the project's,
    :func:`medflow.patients.project_salt`; required), and the count ``dicom_patient_from_study`` says how
    many had no PatientID and were grouped by StudyInstanceUID. Files that are not DICOM, or DICOM files
    without either tag, keep the regex's group (their stem) and count under ``group_rule_fallback``.
    """
    skipped: dict[str, int] = {}
    frames = list(manifest_chunks(roots, labels, pattern, skipped, workers, rule, salt, cache))
    return (pd.concat(frames, ignore_index=True) if frames else _frame([])), skipped

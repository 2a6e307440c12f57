"""The manifest step (dvc.yaml stage manifest): roots.json -> manifest CSV, one row per image.

Reads the image roots the extract step listed, indexes them with :func:`medflow.data.manifest.build_manifest`
(class from the folder, patient id from ``dataset.group_rule``; the digest cache spares unchanged files) and
writes the CSV atomically, chunk by chunk (memory stays flat in the number of images).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medflow.config import Config
from medflow.data.digests import DigestCache
from medflow.data.manifest import manifest_chunks
from medflow.errors import StepError
from medflow.io import TableWriter, read_json
from medflow.patients import project_salt

log = logging.getLogger(__name__)


def _read_roots(roots_json: Path) -> list[Path]:
    """The image roots listed in ``roots_json``; StepError naming the file when it or a root is missing."""
    try:
        entries = read_json(roots_json)
    except FileNotFoundError:
        raise StepError(f"{roots_json}: not found (run the extract step first)") from None
    roots = [Path(e["root"]) for e in entries]
    for r in roots:
        if not r.is_dir():
            raise StepError(f"{roots_json}: image root {r} is not a folder")
    return roots


@dataclass
class _Counts:
    """Images, patients/groups and images per class of the manifest, counted chunk by chunk."""

    images: int = 0
    groups: set[str] = field(default_factory=set)
    per_class: Counter[str] = field(default_factory=Counter)

    def add(self, df: pd.DataFrame) -> None:
        self.images += len(df)
        self.groups.update(df["group"].dropna())
        self.per_class.update(df["class_name"])

    def summary(self, skipped: dict[str, int]) -> dict[str, Any]:
        """The step's summary, with the skipped counts."""
        return {"images": self.images, "patients": len(self.groups), "per_class": dict(sorted(self.per_class.items())),
                **skipped}


def _warn_skipped(skipped: dict[str, int], cfg: Config) -> None:
    if skipped["no_class_folder"]:
        log.warning("%d image files are outside any class folder of dataset.labels and were skipped",
                    skipped["no_class_folder"])
    if skipped["group_rule_fallback"]:
        log.warning("%d file names do not match dataset.group_rule %r; each is its own group",
                    skipped["group_rule_fallback"], cfg.dataset.group_rule)
    if skipped.get("dicom_patient_from_study"):
        log.warning("%d DICOM files have no PatientID; each is grouped by its StudyInstanceUID (one study = one "
                    "patient: two studies of one patient may then land in different splits)",
                    skipped["dicom_patient_from_study"])


def _no_images(roots: list[Path], cfg: Config) -> str:
    """Why no image was indexed: class folders dropped straight into the inbox (each became a root of its
    own, with no class folder below it), or labels that name no folder."""
    found = f"no images of classes {sorted(cfg.dataset.labels)} found under {', '.join(map(str, roots))}"
    loose = [r for r in roots if r.name in cfg.dataset.labels]
    if loose:
        return (f"{found}: {loose[0]} is itself a class folder; every inbox entry is one source with class "
                f"folders inside it, so put them in one folder ({loose[0].parent / 'mydata' / loose[0].name}/...)")
    return f"{found} (check dataset.labels in the dataset's catalog file)"


def run(cfg: Config, *, roots_json: Path, out: Path, cache: Path | None = None) -> dict[str, Any]:
    """Write the manifest CSV for every image under the roots listed in ``roots_json``; return its summary.

    ``cache``: the folder of the digest cache (:mod:`medflow.data.digests`; persistent across runs): files whose
    stat it knows are not read again. None: every file is read."""
    roots = _read_roots(roots_json)
    rule = cfg.dataset.group_rule
    salt = project_salt(Path.cwd()) if rule == "dicom" else None  # DVC runs the step in the project root
    digests = DigestCache(cache, salt or b"")
    skipped: dict[str, int] = {}
    chunks = manifest_chunks(roots, cfg.dataset.labels, cfg.dataset.group_pattern, skipped, rule=rule, salt=salt,
                             cache=digests)
    counts = _Counts()
    with TableWriter(out) as table:  # chunk by chunk: the same parts as one DataFrame's write_table
        for df in chunks:
            table.write(df)
            counts.add(df)
        if not counts.images:
            raise StepError(_no_images(roots, cfg))
    _warn_skipped(skipped, cfg)
    summary = counts.summary(skipped)
    log.info("manifest: %d images, %d patients/groups, per class %s -> %s",
             summary["images"], summary["patients"], summary["per_class"], out)
    return summary

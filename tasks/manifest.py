"""The manifest step (dvc.yaml stage manifest): roots.json -> manifest CSV, one row per image.

Reads the image roots the extract step listed, indexes them with :func:`medflow.data.manifest.build_manifest`
(class from the folder, patient id from ``dataset.group_rule``) and writes the CSV atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from medflow.config import Config
from medflow.data.manifest import build_manifest
from medflow.errors import StepError
from medflow.io import read_json, write_csv
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


def _summary(df: pd.DataFrame, skipped: dict[str, int]) -> dict[str, Any]:
    """Images, patients/groups and images per class of the manifest, with the skipped counts."""
    return {"images": len(df), "patients": int(df["group"].nunique()),
            "per_class": df.groupby("class_name").size().to_dict(), **skipped}


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


def run(cfg: Config, *, roots_json: Path, out: Path) -> dict[str, Any]:
    """Write the manifest CSV for every image under the roots listed in ``roots_json``; return its summary."""
    roots = _read_roots(roots_json)
    rule = cfg.dataset.group_rule
    salt = project_salt(Path.cwd()) if rule == "dicom" else None  # DVC runs the step in the project root
    df, skipped = build_manifest(roots, cfg.dataset.labels, cfg.dataset.group_pattern, rule=rule, salt=salt)
    if df.empty:
        raise StepError(_no_images(roots, cfg))
    _warn_skipped(skipped, cfg)
    write_csv(out, df)
    summary = _summary(df, skipped)
    log.info("manifest: %d images, %d patients/groups, per class %s -> %s",
             summary["images"], summary["patients"], summary["per_class"], out)
    return summary

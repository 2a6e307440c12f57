"""External validation: labelled images of another collection, scored at the model's stored threshold.

``evaluate.external`` lists folders (class subfolders named as ``dataset.labels``) or archives holding such
folders; relative paths are taken from the project folder (where ``dvc repro`` runs). The evaluate stage scores
each set once, after the test split, at the threshold chosen on val, and assesses it exactly like the test split
(same metrics, bootstrap CIs, curves, Grad-CAM): a full report per set in ``<out>/external/<name>/`` and one
block per set in ``metrics.json``. An external set is never used for training, model selection or the threshold.

An external image whose patient (``dataset.group_rule`` on its file name) also has images in the training split
is not evidence about new patients: :func:`patients_in_training` counts them, and the AUC on the other images
(unseen patients) is reported beside the AUC of the whole set.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medflow.config import Config, EvaluateConfig
from medflow.data.archives import extract_archive
from medflow.errors import StepError
from medflow.evaluation import assess, metrics, report
from medflow.evaluation.assess import TrainedModel
from medflow.evaluation.metrics import Interval
from medflow.evaluation.results import Evaluation, Scores
from medflow.io import display_path

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ExternalSet:
    """One entry of ``evaluate.external``: its name (the folder or archive name) and its path."""

    name: str
    path: Path

    @property
    def is_archive(self) -> bool:
        return self.path.is_file() and self.path.name.lower().endswith(ARCHIVE_SUFFIXES)


def set_name(path: Path) -> str:
    """The folder name, or the archive name without its archive suffix (``test.tar.gz`` -> ``test``)."""
    name = path.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def external_sets(entries: list[str], root: Path | str = ".") -> list[ExternalSet]:
    """The sets of ``evaluate.external``, checked: each exists (folder or archive), and names are unique."""
    sets: list[ExternalSet] = []
    for entry in entries:
        path = Path(entry) if Path(entry).is_absolute() else Path(root) / entry
        where = f"evaluate.external: {entry!r}"
        if not path.exists():
            raise StepError(f"{where}: not found ({path.resolve()}); give a folder of class folders or an archive")
        s = ExternalSet(set_name(path.resolve()), path)
        if not path.is_dir() and not s.is_archive:
            raise StepError(f"{where}: neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        if not _SET_NAME.fullmatch(s.name):
            raise StepError(f"{where}: its name {s.name!r} must be letters, digits, '_', '-' or '.' (it names the "
                            "set in metrics.json and its report folder); rename the folder or archive")
        if any(o.name == s.name for o in sets):
            raise StepError(f"{where}: two external sets are named {s.name!r}; rename one folder or archive")
        sets.append(s)
    return sets


@contextlib.contextmanager
def opened(s: ExternalSet, cfg: Config) -> Iterator[Path]:
    """The set's folder: the folder itself, or the archive safely extracted (``extract`` limits) into a
    temporary folder that is removed afterwards. The set itself is only read."""
    if not s.is_archive:
        yield s.path
        return
    with tempfile.TemporaryDirectory(prefix=f"medflow-external-{s.name}-") as tmp:
        extract_archive(s.path, Path(tmp), cfg.extract)
        yield Path(tmp)


def train_patients(split: pd.DataFrame) -> set[str]:
    """The patient groups of the training split (the split table's ``group`` column)."""
    return set(split.loc[split["split"] == "train", "group"].astype(str))


def patients_in_training(scores: Scores, train: set[str]) -> np.ndarray:
    """Per external image: does its patient also have images in the training split?"""
    return np.array([str(p) in train for p in scores.patient], dtype=bool)


def unseen_auc(scores: Scores, seen: np.ndarray, threshold: float, ev: EvaluateConfig) -> Interval | None:
    """ROC AUC (bootstrap CI) on the images of patients the model never trained on; None without both classes."""
    keep = ~seen
    y, p = scores.y[keep], scores.p[keep]
    if keep.all() or len(np.unique(y)) < 2:
        return None
    groups = scores.patient[keep] if ev.bootstrap_by == "patient" else None
    return metrics.bootstrap(y, p, threshold, n=ev.bootstrap, seed=ev.seed, confidence=ev.confidence,
                             bins=ev.calibration_bins, groups=groups)["roc_auc"]


@dataclass
class ExternalResult:
    """One external set's evaluation and what the test split's report says about it."""

    name: str
    path: str
    evaluation: Evaluation
    seen_images: int  # images of patients who also have training images
    seen_patients: int
    unseen_roc_auc: Interval | None

    def overlap_line(self) -> str:
        """What the report says about patients shared with training."""
        if not self.seen_images:
            return "no image of this set belongs to a patient of the training split"
        unseen = ("" if self.unseen_roc_auc is None
                  else f"; ROC AUC on the other images {report.fmt_interval(self.unseen_roc_auc)}")
        return (f"{self.seen_images} image(s) of {self.seen_patients} patient(s) who also have training images "
                f"(dataset.group_rule on file names){unseen}")

    def headline(self, internal_auc: float) -> dict[str, Any]:
        """The set's block of metrics.json: n, AUC (CI), sensitivity, specificity, ECE, the AUC gap to the test
        split, and the training-patient overlap."""
        iv = self.evaluation.intervals
        return {"n": len(self.evaluation.scores.y), "n_positive": int(np.sum(self.evaluation.scores.y)),
                **{k: iv[k].as_dict() for k in ("roc_auc", "sensitivity", "specificity")},
                "ece": iv["ece"].as_dict()["value"],
                "auc_gap": round(float(iv["roc_auc"].value - internal_auc), 6),
                "train_patient_images": self.seen_images,
                "unseen_roc_auc": None if self.unseen_roc_auc is None else self.unseen_roc_auc.as_dict()}


def evaluate_sets(cfg: Config, sets: list[ExternalSet], trained: TrainedModel, threshold: dict[str, Any],
                  split: pd.DataFrame, out: Path) -> list[ExternalResult]:
    """Score and assess each of ``sets`` (:func:`external_sets`) at ``threshold``; a full report per set in
    ``out/<name>/``. ``split`` is the split manifest (for the training patients)."""
    train = train_patients(split)
    results = []
    for s in sets:
        with opened(s, cfg) as folder:
            source = f"external set {s.name} ({display_path(s.path)})"
            evaluation = assess.assess_folder(cfg, trained, folder, threshold, source,
                                              where=f"evaluate.external: {s.path}")
        seen = patients_in_training(evaluation.scores, train)
        result = ExternalResult(s.name, display_path(s.path), evaluation, int(seen.sum()),
                                len(set(evaluation.scores.patient[seen])),
                                unseen_auc(evaluation.scores, seen, float(threshold["threshold"]), cfg.evaluate))
        evaluation.data["external_overlap"] = result.overlap_line()
        report.write_all(evaluation, out / s.name)
        log.info("evaluate: external %s: %d images, ROC AUC %s; %s", s.name, len(evaluation.scores.y),
                 report.fmt_interval(evaluation.intervals["roc_auc"]), result.overlap_line())
        results.append(result)
    return results

"""Shortcut check: can the file's metadata alone predict the label?

A model can learn *how* an image was stored instead of what it shows: in COVID-CT, 96 of 98 COVID images
are PNG against 52 of 105 non-COVID, so "is PNG" alone scores AUC 0.75. This check fits a small classifier
(scikit-learn gradient-boosted trees) on metadata only, never on pixels:

- ``format`` (PNG, JPEG, ...), ``mode`` (L, RGB, RGBA, ...) and ``root`` (the inbox or archive folder the
  image came from, not its class folder), one-hot;
- ``channels`` and ``bit_depth`` (both follow from the header's mode), ``width``, ``height`` and ``bytes``
  (file size), as numbers.

Every one is a column the manifest already holds (:data:`medflow.schema.MANIFEST_COLUMNS`, read from the
header without decoding). Folds are grouped by split unit (``split_group``: patients joined through
near-duplicates; ``group`` where there is no split yet) and stratified by class, so one patient's images
never score each other. The result is the out-of-fold ROC AUC of the classifier, with each feature's own
AUC beside it (direction-free: ``max(AUC, 1 - AUC)``; categories scored by their positive rate). File
size also depends on what the image shows (compression), so a high ``bytes`` AUC is a hint to look, not
proof of a storage artefact. A check AUC above ``validate.shortcut_auc_max`` means the labels are
predictable from how the files were stored: a model's score may then measure the storage, not the disease.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from PIL import ImageMode
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from threadpoolctl import threadpool_limits

CATEGORICAL = ("format", "mode", "root")
NUMERIC = ("channels", "bit_depth", "width", "height", "bytes")
FEATURES = (*CATEGORICAL, *NUMERIC)
FOLDS = 5
# The classifier is fitted on at most this many images, whole split units drawn at random (seeded): the AUC's
# standard error is then about 0.005, and the check costs the same at a million images as at 10,000 (1.1 s of
# a +1% validate at 27,558 cells before the cap). Each feature's own AUC is still computed on every image.
FIT_MAX = 10_000
_MISSING = "<none>"


@dataclass(frozen=True)
class ShortcutCheck:
    """The check's verdict: out-of-fold AUC of metadata -> label, and each feature's own AUC."""

    auc: float | None  # None when the check could not run (see ``skipped``)
    feature_auc: dict[str, float]
    threshold: float  # validate.shortcut_auc_max
    fail_on_shortcut: bool
    n: int
    groups: int
    folds: int
    skipped: str = ""  # why the check did not run (too few groups or a single class)
    fitted: int = 0  # images the classifier was cross-validated on (all, or a sample of whole units: FIT_MAX)
    features: tuple[str, ...] = field(default=FEATURES)

    @property
    def flagged(self) -> bool:
        """The metadata predicts the label better than the threshold allows."""
        return self.auc is not None and self.auc > self.threshold

    @property
    def failed(self) -> bool:
        """Flagged and ``validate.fail_on_shortcut``: the validate step stops."""
        return self.flagged and self.fail_on_shortcut

    @property
    def carriers(self) -> list[str]:
        """The features whose own AUC is above the threshold, strongest first; the strongest one where none
        is (the signal is then in their combination)."""
        ranked = sorted(self.feature_auc, key=lambda k: -self.feature_auc[k])
        strong = [k for k in ranked if self.feature_auc[k] > self.threshold]
        return strong or ranked[:1]

    def describe(self) -> str:
        """One line: the verdict with the AUCs, e.g. for the log and the StepError."""
        if self.auc is None:
            return f"shortcut check skipped: {self.skipped}"
        named = ", ".join(f"{k} {self.feature_auc[k]:.2f}" for k in self.carriers)
        verdict = (f"metadata alone predicts the label: AUC {self.auc:.3f} > validate.shortcut_auc_max "
                   f"{self.threshold:g}" if self.flagged else
                   f"metadata alone does not predict the label beyond validate.shortcut_auc_max "
                   f"{self.threshold:g}: AUC {self.auc:.3f}")
        sample = (f" on a sample of {self.fitted:,} of the {self.n:,} images (whole patients)"
                  if 0 < self.fitted < self.n else "")
        return f"{verdict} ({self.folds}-fold{sample}, grouped by patient; strongest features: {named})"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(features=list(self.features), flagged=self.flagged, failed=self.failed, carriers=self.carriers,
                   message=self.describe())
        return out


# ------------------------------------------------------------------------------------------- features
def mode_facts(mode: object) -> tuple[float, float]:
    """(channels, bits per channel) of a PIL mode such as ``L``, ``RGBA``, ``I;16`` (NaN when unknown)."""
    if not isinstance(mode, str) or not mode:
        return math.nan, math.nan
    try:
        info = ImageMode.getmode(mode)
    except KeyError:
        return math.nan, math.nan
    bits = 1 if mode == "1" else 8 * np.dtype(info.typestr).itemsize
    return float(len(info.bands)), float(bits)


def metadata_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per image with :data:`FEATURES`: categories as strings, the rest as floats (NaN if absent)."""
    out = pd.DataFrame(index=df.index)
    for name in CATEGORICAL:
        values = df[name] if name in df.columns else pd.Series(_MISSING, index=df.index)
        out[name] = values.astype(object).where(values.notna(), _MISSING).astype(str)
    modes = df["mode"] if "mode" in df.columns else pd.Series(None, index=df.index, dtype=object)
    codes, distinct = pd.factorize(modes)  # the facts of each distinct mode (a blank is code -1: the last row)
    facts = np.array([*(mode_facts(m) for m in distinct), (math.nan, math.nan)], dtype=float).reshape(-1, 2)
    out["channels"] = facts[codes, 0]
    out["bit_depth"] = facts[codes, 1]
    for name in ("width", "height", "bytes"):
        out[name] = pd.to_numeric(df[name], errors="coerce") if name in df.columns else math.nan
    return out


def _design(table: pd.DataFrame) -> np.ndarray:
    """Numeric matrix for the classifier: one-hot categories and log-scaled sizes (trees ignore the scale,
    the log keeps it readable)."""
    onehot = pd.get_dummies(table[list(CATEGORICAL)], dtype=float)
    numeric = table[list(NUMERIC)].astype(float)
    for name in ("width", "height", "bytes"):
        numeric[name] = np.log1p(numeric[name].clip(lower=0))
    return np.hstack([onehot.to_numpy(), numeric.to_numpy()])


# --------------------------------------------------------------------------------------------- scores
def _symmetric_auc(y: np.ndarray, score: np.ndarray) -> float:
    """``max(AUC, 1 - AUC)`` of a score (a feature predicts as well upside down); 0.5 for a constant."""
    ok = np.isfinite(score)
    if ok.sum() < 2 or len(np.unique(y[ok])) < 2 or len(np.unique(score[ok])) < 2:
        return 0.5
    auc = float(roc_auc_score(y[ok], score[ok]))
    return max(auc, 1.0 - auc)


def _category_rate(values: pd.Series, y: np.ndarray) -> np.ndarray:
    """Each image's category's positive rate."""
    rates = pd.Series(y, index=values.index).groupby(values).mean()
    return values.map(rates).to_numpy(dtype=float)


def feature_aucs(table: pd.DataFrame, y: np.ndarray) -> dict[str, float]:
    """Each feature's own direction-free AUC: numbers as they are, categories by their positive rate (the
    best order of the categories; in-sample, so a little optimistic for a feature of many values)."""
    out = {name: _symmetric_auc(y, _category_rate(table[name], y)) for name in CATEGORICAL}
    out.update({name: _symmetric_auc(y, table[name].to_numpy(dtype=float)) for name in NUMERIC})
    return {k: round(v, 4) for k, v in out.items()}


def _classifier(n: int, seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15,
                                          min_samples_leaf=max(5, min(20, n // 20)), random_state=seed)


def _oof_probabilities(x: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                       seed: int) -> np.ndarray:
    p = np.empty(len(y))
    with threadpool_limits(1):  # small fits: OpenMP threads only contend (10x slower on a busy machine)
        for train, test in folds:
            if len(np.unique(y[train])) < 2:  # a fold without one class: predict its prevalence
                p[test] = float(y[train].mean())
                continue
            p[test] = _classifier(len(train), seed).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return p


def _groups(df: pd.DataFrame) -> np.ndarray:
    column = "split_group" if "split_group" in df.columns and df["split_group"].notna().all() else "group"
    if column not in df.columns:
        return np.arange(len(df)).astype(str)
    return df[column].astype(str).to_numpy()


def check_shortcuts(df: pd.DataFrame, *, threshold: float = 0.70, fail_on_shortcut: bool = False,
                    seed: int = 42) -> ShortcutCheck:
    """Fit metadata -> label with grouped, stratified k-fold; the out-of-fold AUC and each feature's AUC.

    ``df`` is the split manifest (or the manifest: any frame with ``label`` and the metadata columns).
    Skipped, with the reason, when there is one class only or fewer than two groups per class.
    """
    y = pd.to_numeric(df["label"], errors="coerce").to_numpy() if "label" in df.columns else np.zeros(0)
    groups = _groups(df)
    per_class = [len(np.unique(groups[y == c])) for c in (0, 1)]

    def result(auc: float | None, aucs: dict[str, float], folds: int, skipped: str = "",
               fitted: int = 0) -> ShortcutCheck:
        return ShortcutCheck(auc, aucs, threshold, fail_on_shortcut, len(df), len(np.unique(groups)), folds, skipped,
                             fitted=fitted)

    if min(per_class) < 2 or not np.isin(y, (0, 1)).all():
        return result(None, {}, 0, f"needs labels 0/1 and at least two groups per class (groups per class: "
                                   f"{per_class})")
    y = y.astype(int)
    table = metadata_table(df)
    rows = _fit_rows(groups, y, seed)
    k = min(FOLDS, *[len(np.unique(groups[rows][y[rows] == c])) for c in (0, 1)])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = list(splitter.split(np.zeros(len(rows)), y[rows], groups[rows]))
    p = _oof_probabilities(_design(table)[rows], y[rows], folds, seed)
    return result(round(float(roc_auc_score(y[rows], p)), 4), feature_aucs(table, y), k, fitted=len(rows))


def _fit_rows(groups: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """The rows the classifier is cross-validated on: all of them up to :data:`FIT_MAX`, else whole groups drawn
    at random (seeded) until FIT_MAX images, as long as each class keeps two groups (else all rows)."""
    if len(groups) <= FIT_MAX:
        return np.arange(len(groups))
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = np.zeros(len(names), dtype=bool)
    chosen[order[: int(np.searchsorted(np.cumsum(sizes[order]), FIT_MAX)) + 1]] = True
    rows = np.flatnonzero(chosen[inverse])
    if min(len(np.unique(inverse[rows][y[rows] == c])) for c in (0, 1)) < 2:
        return np.arange(len(groups))
    return rows


# -------------------------------------------------------------------------------------------- report
def markdown(check: ShortcutCheck) -> list[str]:
    """The validation summary's section: verdict, then each feature's own AUC."""
    lines = ["## Shortcut check (metadata -> label)", "", check.describe() + ".", ""]
    if check.auc is None:
        return lines
    lines += ["Out-of-fold ROC AUC of gradient-boosted trees on file metadata only (format, mode, channels, "
              "bit depth, width, height, file size, source folder), folds grouped by patient. 0.5: the "
              "metadata says nothing about the label.", "",
              "| feature | own AUC |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in sorted(check.feature_auc.items(), key=lambda kv: -kv[1])]
    lines += [f"| **all (classifier)** | **{check.auc:.3f}** |", ""]
    return lines


def banner(check: ShortcutCheck) -> str:
    """The loud line at the top of validation.md when the check is flagged ('' otherwise)."""
    if not check.flagged:
        return ""
    action = ("validation FAILS (validate.fail_on_shortcut: true)" if check.failed else
              "a warning only (set validate.fail_on_shortcut: true to stop the pipeline)")
    return (f"> **WARNING: shortcut in the data.** {check.describe()}. A model can score well by learning how "
            f"the files were stored instead of what they show; this is {action}.")

"""Binary-classifier metrics, operating thresholds and bootstrap confidence intervals (pure numpy).

Every metric is computed for a batch of *weightings* of one sample at once: a weighting is the number of
times each image was drawn by one bootstrap resample (the point estimate is the all-ones weighting). The
scores are sorted once, so 2,000 resamples of a few thousand images take well under a second, and the
point estimates and the intervals come from the same code. Each metric equals scikit-learn's (with
``sample_weight``) on the same inputs; ``tests/test_metrics.py`` checks that.

A prediction is positive when ``p >= threshold`` (scikit-learn's ``roc_curve`` convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medflow.errors import StepError

METRICS: tuple[str, ...] = (
    "roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "npv",
    "f1", "brier", "ece",
)
THRESHOLD_METRICS = frozenset(METRICS) - {"roc_auc", "pr_auc", "brier", "ece"}
LABELS = {  # how the report, summary.md and the Prefect artifacts name each metric
    "roc_auc": "ROC AUC", "pr_auc": "PR AUC (average precision)", "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy", "sensitivity": "Sensitivity (recall)", "specificity": "Specificity",
    "precision": "Precision (PPV)", "npv": "NPV", "f1": "F1", "brier": "Brier score (lower is better)",
    "ece": "Expected calibration error (lower is better)",
}


def ci_level(confidence: float) -> str:
    """An interval's level as printed: 0.95 -> "95%", 0.9 -> "90%", 0.975 -> "97.5%"."""
    return f"{round(confidence * 100, 4):g}%"


_CHUNK = 250  # resamples per vectorised batch: bounds memory at _CHUNK x unique scores


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | None]:
        return {k: _json_float(v) for k, v in (("value", self.value), ("low", self.low), ("high", self.high))}


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else round(float(v), 6)


# --- inputs -------------------------------------------------------------------------------------------


def check_inputs(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
                 name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """``y`` as 0/1 int8 and ``p`` as float64 in [0, 1], same length; StepError naming ``name`` otherwise."""
    y_arr = np.asarray(y)
    p_arr = np.asarray(p, dtype=np.float64)
    if y_arr.ndim != 1 or p_arr.shape != y_arr.shape:
        raise StepError(f"{name}: labels {y_arr.shape} and probabilities {p_arr.shape} must be 1-D, same length")
    if len(y_arr) == 0:
        raise StepError(f"{name}: no samples")
    if not np.isin(y_arr, (0, 1)).all():
        raise StepError(f"{name}: labels must be 0 or 1")
    if not np.isfinite(p_arr).all() or (p_arr < 0).any() or (p_arr > 1).any():
        raise StepError(f"{name}: probabilities must be finite and in [0, 1]")
    return y_arr.astype(np.int8), p_arr


# --- operating threshold ------------------------------------------------------------------------------


def select_threshold(y: np.ndarray, p: np.ndarray, rule: Literal["target_sensitivity", "youden", "fixed"], *,
                     target_sensitivity: float = 0.95, fixed: float = 0.5) -> float:
    """The operating threshold by ``rule``, on validation scores (never the test split).

    - ``target_sensitivity``: the highest threshold whose sensitivity reaches the target; among thresholds
      that reach it, the highest has the best specificity.
    - ``youden``: the threshold maximising sensitivity + specificity - 1 (the highest one on ties).
    - ``fixed``: ``fixed``, whatever the scores.
    """
    y, p = check_inputs(y, p, "threshold selection")
    if rule == "fixed":
        return float(fixed)
    pos = np.sort(p[y == 1])[::-1]
    if len(pos) == 0 or len(pos) == len(p):
        raise StepError(f"threshold selection ({rule}): the validation split needs both classes")
    if rule == "target_sensitivity":
        k = max(1, math.ceil(target_sensitivity * len(pos) - 1e-9))  # positives that must be called positive
        return float(pos[k - 1])
    if rule == "youden":
        thresholds = np.unique(p)[::-1]  # descending: argmax takes the highest on ties
        sens = (p[y == 1][None, :] >= thresholds[:, None]).mean(axis=1)
        spec = (p[y == 0][None, :] < thresholds[:, None]).mean(axis=1)
        return float(thresholds[int(np.argmax(sens + spec - 1))])
    raise StepError(f"evaluate.threshold_rule: unknown rule {rule!r}")


# --- metrics for a batch of weightings ------------------------------------------------------------------


def batch_metrics(y: np.ndarray, p: np.ndarray, weights: np.ndarray, threshold: float,
                  bins: int = 10) -> dict[str, np.ndarray]:
    """Every metric in :data:`METRICS` for each row of ``weights`` (shape ``(B, n)``): arrays of shape (B,).

    Undefined values (no positives for sensitivity, say) are NaN.
    """
    w = np.asarray(weights, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    out.update(_ranking_metrics(y, p, w))
    out.update(_threshold_metrics(y, p >= threshold, w))
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["brier"] = (w * (p - y) ** 2).sum(axis=1) / total
    out["ece"] = _ece(y, p, w, bins)
    return {k: out[k] for k in METRICS}


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float, bins: int = 10) -> dict[str, float]:
    """Every metric in :data:`METRICS` on the sample itself."""
    y, p = check_inputs(y, p)
    return {k: float(v[0]) for k, v in batch_metrics(y, p, np.ones((1, len(y))), threshold, bins).items()}


def _unique_blocks(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique scores ascending, index of each sample's score among them)."""
    return np.unique(p, return_inverse=True)


def _per_block(w: np.ndarray, mask: np.ndarray, inverse: np.ndarray, k: int) -> np.ndarray:
    """Summed weights of the ``mask`` samples per unique score: (B, k)."""
    cols = np.zeros((w.shape[1], k))
    cols[np.arange(w.shape[1])[mask], inverse[mask]] = 1.0
    return w @ cols


def _ranking_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """ROC AUC (Mann-Whitney, ties count 1/2) and PR AUC (average precision, as scikit-learn)."""
    uniq, inverse = _unique_blocks(p)
    wpos = _per_block(w, y == 1, inverse, len(uniq))  # (B, K), scores ascending
    wneg = _per_block(w, y == 0, inverse, len(uniq))
    tot_pos, tot_neg = wpos.sum(axis=1), wneg.sum(axis=1)
    neg_below = np.cumsum(wneg, axis=1) - wneg
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wpos * (neg_below + 0.5 * wneg)).sum(axis=1) / (tot_pos * tot_neg)
        # descending thresholds: true/false positives at or above each unique score
        tp = np.cumsum(wpos[:, ::-1], axis=1)
        fp = np.cumsum(wneg[:, ::-1], axis=1)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        ap = (wpos[:, ::-1] * precision).sum(axis=1) / tot_pos
    auc[(tot_pos == 0) | (tot_neg == 0)] = np.nan
    ap[tot_pos == 0] = np.nan
    return {"roc_auc": auc, "pr_auc": ap}


def _threshold_metrics(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    yb = y.astype(bool)
    tp = w[:, yb & pred].sum(axis=1)
    fn = w[:, yb & ~pred].sum(axis=1)
    fp = w[:, ~yb & pred].sum(axis=1)
    tn = w[:, ~yb & ~pred].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        prec = tp / (tp + fp)
        return {
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "balanced_accuracy": (sens + spec) / 2,
            "sensitivity": sens,
            "specificity": spec,
            "precision": prec,
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


def calibration_bin(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of each probability; 1.0 falls in the last bin."""
    return np.minimum((np.asarray(p) * bins).astype(np.int64), bins - 1)


def _ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int) -> np.ndarray:
    """Expected calibration error: sum over bins of (bin weight share) x |mean p - mean y| in the bin."""
    b = calibration_bin(p, bins)
    onehot = np.zeros((len(p), bins))
    onehot[np.arange(len(p)), b] = 1.0
    n_b = w @ onehot
    sum_p = (w * p) @ onehot
    sum_y = (w * y) @ onehot
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(sum_p - sum_y).sum(axis=1) / n_b.sum(axis=1)


# --- bootstrap ----------------------------------------------------------------------------------------


def bootstrap_weights(y: np.ndarray, n: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """``(n, len(y))`` resample multiplicities, stratified by class.

    Without ``groups`` every resample draws as many positives and negatives as the sample has. With
    ``groups`` (patient ids) whole patients are drawn (a cluster bootstrap), stratified by whether the
    patient has any positive image, so images of one patient stay together as the split keeps them.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        units = np.arange(len(y))
        unit_label = np.asarray(y)
    else:
        names, units = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        unit_label = np.zeros(len(names), dtype=np.int8)
        np.maximum.at(unit_label, units, np.asarray(y, dtype=np.int8))
    counts = np.zeros((n, len(unit_label)))
    for cls in (0, 1):
        members = np.flatnonzero(unit_label == cls)
        if len(members):
            counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=n)
    return counts[:, units]


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap(y: np.ndarray, p: np.ndarray, threshold: float, *, n: int = 2000, seed: int = 42,
              confidence: float = 0.95, bins: int = 10, groups: np.ndarray | None = None) -> dict[str, Interval]:
    """Every metric with its stratified bootstrap percentile interval (``n`` seeded resamples)."""
    y, p = check_inputs(y, p)
    point = point_metrics(y, p, threshold, bins)
    weights = bootstrap_weights(y, n, seed, groups)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    for start in range(0, n, _CHUNK):
        for k, v in batch_metrics(y, p, weights[start:start + _CHUNK], threshold, bins).items():
            draws[k].append(v)
    return {k: Interval(point[k], *_percentile_interval(np.concatenate(draws[k]), confidence)) for k in METRICS}


def paired_bootstrap(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, *, metric: str = "roc_auc",
                     n: int = 2000, seed: int = 42, confidence: float = 0.95, groups: np.ndarray | None = None,
                     threshold_new: float = 0.5, threshold_old: float = 0.5) -> dict[str, float]:
    """Difference ``metric(new) - metric(old)`` on the same images, with a paired bootstrap interval.

    Both models are scored on each resample, so the interval reflects the models' difference, not the
    sampling noise they share. Returns ``point``, ``low``, ``high``, and ``p_worse``: the share of
    resamples in which the new model is worse.
    """
    if metric not in METRICS:
        raise StepError(f"paired bootstrap: unknown metric {metric!r}; known: {', '.join(METRICS)}")
    y, p_new = check_inputs(y, p_new, "new model scores")
    _, p_old = check_inputs(y, p_old, "old model scores")
    ones = np.ones((1, len(y)))
    point = (batch_metrics(y, p_new, ones, threshold_new)[metric] - batch_metrics(y, p_old, ones, threshold_old)[
        metric])[0]
    weights = bootstrap_weights(y, n, seed, groups)
    diffs = np.concatenate([
        batch_metrics(y, p_new, chunk, threshold_new)[metric] - batch_metrics(y, p_old, chunk, threshold_old)[metric]
        for chunk in (weights[s:s + _CHUNK] for s in range(0, n, _CHUNK))
    ])
    low, high = _percentile_interval(diffs, confidence)
    finite = diffs[np.isfinite(diffs)]
    return {"point": float(point), "low": low, "high": high,
            "p_worse": float((finite < 0).mean()) if len(finite) else math.nan}


# --- curves and tables for plots ----------------------------------------------------------------------


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts at ``threshold``: tp, fp, tn, fn."""
    pred = np.asarray(p) >= threshold
    yb = np.asarray(y).astype(bool)
    return {"tp": int((yb & pred).sum()), "fp": int((~yb & pred).sum()), "tn": int((~yb & ~pred).sum()),
            "fn": int((yb & ~pred).sum())}


def roc_points(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """ROC curve: fpr, tpr at each unique score (descending), starting at (0, 0)."""
    uniq, inverse = _unique_blocks(p)
    ones = np.ones((1, len(p)))
    tp = np.cumsum(_per_block(ones, y == 1, inverse, len(uniq))[0, ::-1])
    fp = np.cumsum(_per_block(ones, y == 0, inverse, len(uniq))[0, ::-1])
    npos, nneg = max(tp[-1], 1), max(fp[-1], 1)
    return {"threshold": np.r_[1.0, uniq[::-1]], "fpr": np.r_[0.0, fp / nneg], "tpr": np.r_[0.0, tp / npos]}


def pr_points(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Precision-recall curve at each unique score (descending)."""
    uniq, inverse = _unique_blocks(p)
    ones = np.ones((1, len(p)))
    tp = np.cumsum(_per_block(ones, y == 1, inverse, len(uniq))[0, ::-1])
    fp = np.cumsum(_per_block(ones, y == 0, inverse, len(uniq))[0, ::-1])
    return {"threshold": uniq[::-1], "recall": tp / max(tp[-1], 1), "precision": tp / np.maximum(tp + fp, 1)}


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability diagram data per equal-width bin: count, mean predicted probability, observed positive
    fraction (NaN in empty bins)."""
    b = calibration_bin(p, bins)
    count = np.bincount(b, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(b, weights=p, minlength=bins) / count
        frac = np.bincount(b, weights=np.asarray(y, dtype=np.float64), minlength=bins) / count
    return {"bin_low": np.arange(bins) / bins, "bin_high": np.arange(1, bins + 1) / bins, "count": count,
            "mean_predicted": mean_p, "fraction_positive": frac}


def threshold_sweep(y: np.ndarray, p: np.ndarray, steps: int = 101) -> dict[str, np.ndarray]:
    """Sensitivity and specificity at evenly spaced thresholds in [0, 1]."""
    t = np.linspace(0.0, 1.0, steps)
    pred = np.asarray(p)[None, :] >= t[:, None]
    yb = np.asarray(y).astype(bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (pred[:, yb]).sum(axis=1) / yb.sum()
        spec = (~pred[:, ~yb]).sum(axis=1) / (~yb).sum()
    return {"threshold": t, "sensitivity": sens, "specificity": spec}

"""Chance-level guard: does the model beat always predicting the training prevalence, on val?

A model that learnt nothing still gets a threshold, a report and a model card that look normal. This check
says plainly when it did not beat the simplest baseline, on the validation split (where the threshold is
chosen; the test split is not looked at). The model is **at chance** when either:

- its val loss is not better than the val loss of always predicting the training prevalence. Both losses
  are the training objective: binary cross-entropy, class-weighted as in training when
  ``train.class_weights`` is on (each class then weighs half, so the prevalence that objective sees is
  0.5). A class-weighted model predicts probabilities pulled towards 0.5; its unweighted loss can lose to
  the prevalence even at a val AUC of 0.8, so comparing unweighted losses would call a useful model useless;
- or the bootstrap confidence interval of its val ROC AUC reaches down to 0.5 (or below): it cannot be told
  apart from a ranking by coin flips. Resampled as ``evaluate.bootstrap_by`` says (images, or patients).

The verdict is computed once per model by the evaluate stage (stored in ``threshold.json`` beside the
model, shown at the top of the report, the summary and the model card, and in ``metrics.json``) and by the
champion/challenger step, which never promotes a model at chance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medflow.config import EvaluateConfig
from medflow.evaluation.metrics import bootstrap, check_inputs
from medflow.training.fit import class_weights

EPSILON = 1e-7  # probability clipping, as Keras' binary cross-entropy
TOLERANCE = 1e-6  # a val loss must be lower than the baseline by more than this (float noise)


@dataclass(frozen=True)
class ChanceVerdict:
    """Whether the model beats the prevalence baseline on val, with the evidence."""

    at_chance: bool
    reasons: tuple[str, ...]  # why it is at chance (empty when it is not)
    n_val: int
    train_prevalence: float  # share of positives in the train split
    weighted: bool  # losses class-weighted as in training (train.class_weights)
    val_loss: float
    baseline_loss: float  # val loss of always predicting the (weighted) training prevalence
    val_auc: float
    val_auc_low: float
    val_auc_high: float
    confidence: float
    bootstrap_by: str

    def summary(self) -> str:
        """One line for logs, banners and decisions."""
        level = f"{round(self.confidence * 100, 4):g}%"
        facts = (f"val loss {self.val_loss:.4f} vs {self.baseline_loss:.4f} for always predicting the training "
                 f"prevalence{' (class-weighted)' if self.weighted else ''}; val AUC {_fmt(self.val_auc)} "
                 f"({level} CI {_fmt(self.val_auc_low)}-{_fmt(self.val_auc_high)}, {self.n_val} images)")
        if self.at_chance:
            return f"the model does not beat chance on val: {'; '.join(self.reasons)} ({facts})"
        return f"the model beats chance on val: {facts}"

    def as_dict(self) -> dict[str, Any]:
        out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        out["reasons"] = list(self.reasons)
        out["summary"] = self.summary()
        return out


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


def cross_entropy(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Binary cross-entropy averaged over the images (weighted average with ``weights``), probabilities
    clipped to [EPSILON, 1 - EPSILON] as in Keras."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1 - EPSILON)
    y = np.asarray(y, dtype=np.float64)
    per_image = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.average(per_image, weights=weights))


def verdict(y: np.ndarray, p: np.ndarray, train_counts: tuple[int, int], *, weighted: bool, ev: EvaluateConfig,
            groups: np.ndarray | None = None) -> ChanceVerdict:
    """The chance verdict of val scores ``(y, p)``; ``train_counts`` = (negatives, positives) of train.

    ``groups`` (patient ids) resample whole patients for the AUC interval (``evaluate.bootstrap_by``).
    """
    y, p = check_inputs(y, p, "val scores")
    neg, pos = train_counts
    prevalence = pos / (neg + pos)
    w0, w1 = (class_weights(neg, pos)[c] for c in (0, 1)) if weighted else (1.0, 1.0)
    w = np.where(y == 1, w1, w0)
    constant = w1 * prevalence / (w1 * prevalence + w0 * (1 - prevalence))  # 0.5 with the training weights
    loss, baseline = cross_entropy(y, p, w), cross_entropy(y, np.full(len(y), constant), w)
    auc = bootstrap(y, p, 0.5, n=ev.bootstrap, seed=ev.seed, confidence=ev.confidence, bins=ev.calibration_bins,
                    groups=groups)["roc_auc"]
    level = f"{round(ev.confidence * 100, 4):g}%"
    reasons = []
    if not loss < baseline - TOLERANCE:
        reasons.append(f"val loss {loss:.4f} is not better than {baseline:.4f}, the loss of always predicting the "
                       f"training prevalence{' (class-weighted, as trained)' if weighted else f' {prevalence:.3f}'}")
    if not auc.low > 0.5:
        reasons.append(f"the {level} CI of the val AUC ({_fmt(auc.low)}-{_fmt(auc.high)}) does not exclude 0.5"
                       if math.isfinite(auc.low) else "the val AUC is undefined")
    return ChanceVerdict(bool(reasons), tuple(reasons), len(y), prevalence, weighted, loss, baseline, auc.value,
                         auc.low, auc.high, ev.confidence, ev.bootstrap_by)

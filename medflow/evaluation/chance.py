"""Chance-level guard: does the model beat always predicting the training prevalence, on val?

A model that learnt nothing still gets a threshold, a report and a model card that look normal. This check
says plainly when it did not beat the simplest baseline, on the validation split (where the threshold is
chosen; the test split is not looked at). The model is **at chance** when either:

- its val loss (binary cross-entropy, as Keras' ``val_loss``) is not better than the val loss of always
  predicting the training prevalence. Where training was class-weighted (``train.class_weights``) the
  model may beat it in the training objective's weighting instead: each class then weighs half, so the
  baseline predicts 0.5 (loss about ln 2, weighed as Keras weighs val_loss: the mean of w * loss). Class
  weights pull probabilities towards 0.5, so at a val AUC of 0.8
  the unweighted loss can lose to the prevalence while the weighted one wins; an output bias initialised
  at the prevalence does the opposite early in training. A model is at chance by loss only when it beats
  the baseline in neither weighting;
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
from medflow.training.selection import cross_entropy, prevalence_loss

TOLERANCE = 1e-6  # a val loss must be lower than the baseline by more than this (float noise)


@dataclass(frozen=True)
class ChanceVerdict:
    """Whether the model beats the prevalence baseline on val, with the evidence."""

    at_chance: bool
    reasons: tuple[str, ...]  # why it is at chance (empty when it is not)
    n_val: int
    train_prevalence: float  # share of positives in the train split
    val_loss: float
    baseline_loss: float  # val loss of always predicting the training prevalence
    weighted: bool  # trained class-weighted: the weighted losses below count too
    val_loss_weighted: float  # NaN when not weighted
    baseline_loss_weighted: float  # about ln 2 with the training's weights n / (2 n_c); NaN when not weighted
    val_auc: float
    val_auc_low: float
    val_auc_high: float
    confidence: float
    bootstrap_by: str

    def summary(self) -> str:
        """One line for logs, banners and decisions."""
        level = f"{round(self.confidence * 100, 4):g}%"
        weighted = (f"; class-weighted as trained {self.val_loss_weighted:.4f} vs {self.baseline_loss_weighted:.4f}"
                    if self.weighted else "")
        facts = (f"val loss {self.val_loss:.4f} vs {self.baseline_loss:.4f} for always predicting the training "
                 f"prevalence {self.train_prevalence:.3f}{weighted}; val AUC {_fmt(self.val_auc)} ({level} CI "
                 f"{_fmt(self.val_auc_low)}-{_fmt(self.val_auc_high)}, {self.n_val} images)")
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


def _losses(y: np.ndarray, p: np.ndarray, prevalence: float,
            weights: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """(model loss, loss of always predicting the training prevalence), classes weighted (w0, w1); the
    constant is the prevalence as that weighting counts it (0.5 with the training's weights)."""
    cw = {0: weights[0], 1: weights[1]}  # as Keras' val_loss (medflow.training.selection: mean of w * loss)
    return cross_entropy(y, p, cw), prevalence_loss(y, prevalence, cw)


def verdict(y: np.ndarray, p: np.ndarray, train_counts: tuple[int, int], *, weighted: bool, ev: EvaluateConfig,
            groups: np.ndarray | None = None) -> ChanceVerdict:
    """The chance verdict of val scores ``(y, p)``; ``train_counts`` = (negatives, positives) of train.

    ``weighted``: the model was trained with class weights (``n / (2 n_c)`` of the train split). ``groups``
    (patient ids) resample whole patients for the AUC interval (``evaluate.bootstrap_by``).
    """
    y, p = check_inputs(y, p, "val scores")
    neg, pos = train_counts
    prevalence = pos / (neg + pos)
    loss, baseline = _losses(y, p, prevalence)
    cw = class_weights(neg, pos)
    wloss, wbaseline = _losses(y, p, prevalence, (cw[0], cw[1])) if weighted else (math.nan, math.nan)
    auc = bootstrap(y, p, 0.5, n=ev.bootstrap, seed=ev.seed, confidence=ev.confidence, bins=ev.calibration_bins,
                    groups=groups)["roc_auc"]
    level = f"{round(ev.confidence * 100, 4):g}%"
    reasons = []
    if not (loss < baseline - TOLERANCE or wloss < wbaseline - TOLERANCE):
        reasons.append(f"val loss {loss:.4f} is not better than {baseline:.4f}, the loss of always predicting the "
                       f"training prevalence {prevalence:.3f}"
                       + (f", nor class-weighted as trained ({wloss:.4f} vs {wbaseline:.4f})" if weighted else ""))
    if not auc.low > 0.5:
        reasons.append(f"the {level} CI of the val AUC ({_fmt(auc.low)}-{_fmt(auc.high)}) does not exclude 0.5"
                       if math.isfinite(auc.low) else "the val AUC is undefined")
    return ChanceVerdict(bool(reasons), tuple(reasons), len(y), prevalence, loss, baseline, weighted, wloss, wbaseline,
                         auc.value, auc.low, auc.high, ev.confidence, ev.bootstrap_by)

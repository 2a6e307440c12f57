"""Model selection: the validation figure that picks the kept epoch, stops early and lowers the learning rate.

``train.select_on`` names a key of the per-epoch logs (and of ``history.csv``):

- ``val_loss`` (default): the training objective on the val split, the binary cross-entropy weighted by
  the *training* class weights (``train.class_weights``; unweighted when they are off). Keras computes it
  from validation batches that carry those weights as sample weights, the multi-worker loop by hand, so
  training and selection optimise the same thing: a near-untrained model that predicts the prevalence
  scores about ln 2 or worse here on imbalanced data, however low its unweighted loss;
- ``val_auc`` / ``val_pr_auc``: the val ROC AUC / PR AUC (higher is better): ranking only, blind to
  calibration and to class balance.

The plain, unweighted val cross-entropy (what ``val_loss`` was before the class weights reached the val
split) is not offered: on imbalanced data it favours an untrained model that predicts the prevalence.
Who wants an unweighted criterion turns ``train.class_weights`` off, so that training is unweighted too.

This module is small and pure (numpy only, no TensorFlow, no config), so the callbacks, the custom loop and
the model card agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

_EPS = 1e-7  # keras.losses.binary_crossentropy clips probabilities to [eps, 1 - eps]


@dataclass(frozen=True)
class Criterion:
    """One ``train.select_on`` choice: the logs key it watches and whether lower or higher is better."""

    monitor: str
    mode: Literal["min", "max"]

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` improves on ``best`` (None: nothing seen yet); NaN never improves."""
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best


def criterion(select_on: str) -> Criterion:
    """The criterion of a ``train.select_on`` value (medflow.config checks the value)."""
    return Criterion(select_on, "min" if select_on == "val_loss" else "max")


def describe(select_on: str, class_weight: dict[int, float] | None) -> str:
    """The criterion in words, for the metadata and the model card."""
    if select_on == "val_auc":
        return "the val ROC AUC (highest)"
    if select_on == "val_pr_auc":
        return "the val PR AUC (highest)"
    if class_weight is None:
        return "the training objective on val (lowest): binary cross-entropy, unweighted (train.class_weights off)"
    return (f"the training objective on val (lowest): binary cross-entropy weighted by the training class weights, "
            f"negative {class_weight[0]:.3f}, positive {class_weight[1]:.3f}")


def sample_weights(y: np.ndarray, class_weight: dict[int, float] | None) -> np.ndarray:
    """Per-example weights (float32): the class weight of each 0/1 label, or ones."""
    y = np.asarray(y).reshape(-1)
    if class_weight is None:
        return np.ones(len(y), dtype=np.float32)
    return np.where(y >= 0.5, class_weight[1], class_weight[0]).astype(np.float32)


def cross_entropy(y: np.ndarray, p: np.ndarray, class_weight: dict[int, float] | None = None) -> float:
    """Mean of ``w * binary cross-entropy`` over the examples (Keras' ``sum_over_batch_size``)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), _EPS, 1 - _EPS)
    per_example = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.mean(sample_weights(y, class_weight) * per_example))


def prevalence_loss(y: np.ndarray, prevalence: float, class_weight: dict[int, float] | None = None) -> float:
    """:func:`cross_entropy` of always predicting the training ``prevalence``, as the weighting counts it
    (0.5 with the balancing class weights ``n / (2 n_c)``): the loss a model must beat to have learnt anything."""
    w0, w1 = (class_weight[0], class_weight[1]) if class_weight else (1.0, 1.0)
    constant = w1 * prevalence / (w1 * prevalence + w0 * (1 - prevalence))
    return cross_entropy(y, np.full(len(np.asarray(y).reshape(-1)), constant), class_weight)

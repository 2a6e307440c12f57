"""What an evaluation produces: a split's scores, and everything the report shows.

Plain data shared by :mod:`medflow.evaluation.assess` (which computes them) and
:mod:`medflow.evaluation.report` (which writes them), so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medflow.evaluation.metrics import Interval


@dataclass(frozen=True)
class Scores:
    """One split's labels, predicted probabilities, patient ids, paths and rows in the image store.

    ``row`` is empty when the images were decoded from files rather than read from the image store.
    """

    y: np.ndarray
    p: np.ndarray
    patient: np.ndarray
    path: np.ndarray
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class Evaluation:
    """Everything the report shows, computed once.

    ``settings`` is the ``evaluate`` config as a dict (bootstrap resamples, confidence, seed, ...);
    ``data`` holds the facts about the data (counts, rejects, validation, sources, the dataset card).
    """

    title: str
    dataset: str
    source: str  # where the evaluated images came from
    metadata: dict[str, Any]
    threshold: dict[str, Any]
    scores: Scores
    intervals: dict[str, Interval]
    confusion: dict[str, int]
    curves: dict[str, pd.DataFrame]
    gradcams: list[dict[str, Any]]
    history: pd.DataFrame
    settings: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def confidence(self) -> float:
        """The confidence level of the intervals, e.g. 0.95."""
        return float(self.settings["confidence"])

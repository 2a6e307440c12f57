"""The crossval step (dvc.yaml stage ``crossval``): grouped k-fold cross-validation of the training recipe.

With ``crossval.folds`` k >= 3 it trains k models on the split table's images (fold i tests, fold i + 1
selects, the rest train; whole patients per fold) and writes their pooled out-of-fold figures into ``out``
(``metrics.json``, ``predictions.csv``, ``crossval.md``): :mod:`medflow.evaluation.crossval`. With 0 (the
default) it writes outputs that say it did not run. A finished fold is kept in ``cache`` and not trained again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medflow.config import Config
from medflow.evaluation import crossval


def run(cfg: Config, *, images: Path, split: Path, out: Path, cache: Path) -> dict[str, Any]:
    """Cross-validate the dataset's train params; returns the headline (``metrics.json``)."""
    return crossval.run(cfg, images=Path(images), split=Path(split), out=Path(out), cache=Path(cache))

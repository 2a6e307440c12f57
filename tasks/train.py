"""The train step (dvc.yaml stage ``train``): the validated split in, the model folder out.

Reads the image store (uint8, each shard memory-mapped) and the split table; trains with
:func:`medflow.training.fit.train_model` (resuming from ``<model_dir>/checkpoints`` after a crash); the chief
then writes ``model.keras`` (best validation loss), ``metadata.json`` and ``history.csv`` into ``model_dir``,
each atomically, and empties the checkpoints. DVCLive writes per-epoch metrics into ``live_dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras

from medflow.config import Config
from medflow.io import atomic_path, write_json
from medflow.training import fit, inputs
from medflow.training.distribute import place

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def _write_model_folder(folder: Path, model: keras.Model, meta: dict[str, Any],
                        history: list[dict[str, float]]) -> None:
    with atomic_path(folder / "model.keras", suffix=".keras") as tmp:
        model.save(tmp)
    write_json(folder / "metadata.json", meta)
    fit.write_history(folder / "history.csv", history or [{"epoch": 0.0}])


def run(cfg: Config, *, images: Path, split: Path, model_dir: Path, live_dir: Path) -> fit.TrainResult:
    """Train on the train split, select on val; write the model folder (chief only) and DVCLive metrics.

    Returns the result with the trained model in memory (its weights are the ones saved).
    """
    placement = place(cfg.train.strategy)  # first: multi-worker collectives must start before other TF work
    images, split, model_dir = Path(images), Path(split), Path(model_dir)
    data = inputs.load_split_data(images, split)
    fingerprint = fit.run_fingerprint(cfg, images, split)
    checkpoints = model_dir / CHECKPOINTS
    result = fit.train_model(cfg, data, placement=placement, fingerprint=fingerprint, checkpoints=checkpoints,
                             live_dir=Path(live_dir))
    if placement.is_chief:
        _write_model_folder(model_dir, result.model, fit.metadata(cfg, data, result, fingerprint), result.history)
        fit.clear_checkpoints(checkpoints)  # last: they serve a crashed run; a finished one starts afresh
        log.info("train: wrote %s", model_dir / "model.keras")
    return result

"""Training a Keras 3 binary classifier on the validated split, on any backend, resumable.

:func:`train_model` trains on ``train`` and selects on ``val``: checkpoints, early stopping and learning-rate
reduction all watch ``train.select_on`` (:mod:`medflow.training.selection`; by default the val loss weighted
by the training class weights, so selection and training optimise the same objective), never a training
figure; it never reads ``test``. Per-epoch metrics go
to DVCLive's plots (``dvc plots``) and to the history; DVCLive's ``metrics.json`` (``dvc exp show``) ends up
holding the kept epoch's headline figures (:meth:`TrainResult.live_metrics`). :func:`metadata` is what inference
needs to preprocess exactly as in training, plus the data fingerprint, params and package versions. The
train step (``tasks/train.py``) reads the inputs, calls these, and writes the model folder.

A run killed mid-way resumes exactly: every epoch ends by atomically writing ``checkpoints/last.keras`` (model and
optimizer state) and ``checkpoints/state.json`` (epoch, best value, patience counters, fingerprint, and the random
state: every layer's Keras ``SeedGenerator`` state, which drives augmentation and Dropout and which a reloaded model
would reset, plus ReduceLROnPlateau's counters). The data order is keyed by (seed, epoch), so a resumed run sees
the batches an uninterrupted one would. A new run with the same params and data continues from the next epoch and
ends with the weights an uninterrupted run would have; anything else starts afresh.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medflow.config import Config, TrainConfig
from medflow.errors import StepError
from medflow.io import STORE_INDEX, atomic_path, table_parts, write_json
from medflow.training import inputs, models, selection
from medflow.training.distribute import Placement

log = logging.getLogger(__name__)

METRICS = ("loss", "auc", "pr_auc", "precision", "recall", "accuracy")
LIVE_HEADLINE = ("loss", "val_loss", "val_auc")  # history keys of the kept epoch in metrics.json (and select_on)
LIVE_METRICS = "metrics.json"  # DVCLive's summary file in the live folder
STATE_VERSION = 3  # 2: best_value/monitor (train.select_on) instead of best_loss; 3: rng and reduce_lr


# ------------------------------------------------------------------------------------------- pure helpers


def class_weights(neg: int, pos: int) -> dict[int, float]:
    """The Keras imbalanced-data tutorial's weights: n / (2 * n_c), so both classes weigh n/2 in total."""
    if neg == 0 or pos == 0:
        raise StepError(f"the train split needs both classes (negatives {neg}, positives {pos})")
    n = neg + pos
    return {0: n / (2.0 * neg), 1: n / (2.0 * pos)}


def train_class_weights(cfg: Config, data: inputs.SplitData) -> dict[int, float] | None:
    """The class weights of training (and of the val loss), or None where ``train.class_weights`` is off."""
    return class_weights(*data.class_counts("train")) if cfg.train.class_weights else None


def learning_rate(train: TrainConfig, steps_per_epoch: int, base: float | None = None) -> Any:
    """A float for constant/ReduceLROnPlateau, else a Keras schedule stepped per batch."""
    lr = base if base is not None else train.learning_rate
    if train.schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=max(1, steps_per_epoch),
                                                           decay_rate=train.decay_rate)
    if train.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, steps_per_epoch * train.epochs))
    return lr


def base_lr(train: TrainConfig) -> float:
    """The starting learning rate: lowered by fine_tune_lr_factor while pretrained backbone layers train.

    Fine-tuning a pretrained backbone at the head's rate would wipe out what it learnt; a frozen backbone
    (or our own CNNs, trained from scratch) use ``learning_rate`` as given.
    """
    if train.model in models.BACKBONES and train.fine_tune != "frozen":
        return train.learning_rate * train.fine_tune_lr_factor
    return train.learning_rate


def make_optimizer(train: TrainConfig, lr: Any) -> keras.optimizers.Optimizer:
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=train.weight_decay)
    if train.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    return keras.optimizers.Adam(learning_rate=lr)


def make_metrics() -> list[keras.metrics.Metric]:
    """Unweighted metrics (Keras applies no sample weights to ``metrics``; ``loss`` carries the class weights)."""
    return [keras.metrics.AUC(name="auc"), keras.metrics.AUC(curve="PR", name="pr_auc"),
            keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall"),
            keras.metrics.BinaryAccuracy(name="accuracy")]


def fingerprint_data(images: Path, split: Path) -> str:
    """sha256 over the split table (its parts in order) and the image store's index: the training data's identity
    (the index names each row's shard, and a shard's name is the digest of the content addresses of its images)."""
    h = hashlib.sha256()
    for path in (*table_parts(split), images / STORE_INDEX if images.is_dir() else images):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"keras_backend": keras.backend.backend()}
    for name in ("keras", "numpy", "tensorflow", "tensorflow-cpu", "jax", "torch", "opencv-python-headless",
                 "medflow"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------------------- resume state


@dataclass
class RunState:
    """What a resumed run needs besides the model: where it was and what it had seen."""

    fingerprint: str
    monitor: str = "val_loss"  # the logs key selected on (train.select_on)
    epoch: int = -1  # last finished epoch (0-based); -1 = none
    best_value: float | None = None  # of monitor; None = no epoch has improved yet
    best_epoch: int = -1
    wait: int = 0  # epochs since the best, for early stopping
    stopped: bool = False
    rng: dict[str, list[int]] = field(default_factory=dict)  # SeedGenerator states after ``epoch`` (rng_state)
    reduce_lr: dict[str, Any] | None = None  # ReduceLROnPlateau's counters after ``epoch``
    version: int = STATE_VERSION

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> RunState | None:
        try:
            data = json.loads(path.read_text())
            state = cls(**data)
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None
        if state.fingerprint != fingerprint or state.version != STATE_VERSION:
            log.info("checkpoint in %s is for other params or data; starting afresh", path.parent)
            return None
        return state


def _seed_generators(model: keras.Model) -> list[tuple[str, Any]]:
    """Every layer's SeedGenerators, keyed by layer name and position (stable across save and reload; the
    generators' own variable paths are global counters that a reloaded model numbers afresh)."""
    return [(f"{layer.name}#{i}", gen) for layer in model._flatten_layers()
            for i, gen in enumerate(getattr(layer, "_seed_generators", []))]


def rng_state(model: keras.Model) -> dict[str, list[int]]:
    """The state of every SeedGenerator of ``model`` (augmentation, Dropout, noise): seed and counter."""
    return {key: [int(v) for v in keras.ops.convert_to_numpy(gen.state.value).reshape(-1)]
            for key, gen in _seed_generators(model)}


def restore_rng_state(model: keras.Model, states: dict[str, list[int]]) -> None:
    """Put back what :func:`rng_state` saved, so that a reloaded model draws the random numbers an uninterrupted
    run would draw next. A model whose generators do not match the saved ones is an error (the checkpoint's
    fingerprint vouches for the same architecture, so this is a broken checkpoint)."""
    found = _seed_generators(model)
    if {key for key, _ in found} != set(states):
        raise StepError(f"checkpoint random state names generators {sorted(states)}, the model has "
                        f"{sorted(key for key, _ in found)}: delete the checkpoints folder to start afresh")
    for key, gen in found:
        gen.state.assign(np.asarray(states[key], dtype=gen.state.dtype).reshape(gen.state.shape))


class _ReduceLR(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters (wait, cooldown, best) are checkpointed and restored on resume."""

    def __init__(self, resume: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resume = resume
        self._apply()

    def _apply(self) -> None:
        if self._resume:
            self.wait, self.cooldown_counter = int(self._resume["wait"]), int(self._resume["cooldown_counter"])
            self.best = self._resume["best"]

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        super().on_train_begin(logs)  # resets the counters
        self._apply()

    def counters(self) -> dict[str, Any]:
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "cooldown_counter": int(self.cooldown_counter),
                "best": best if best is None or np.isfinite(best) else None}


class _Checkpointer(keras.callbacks.Callback):
    """Per epoch: track the best ``criterion`` value (early stopping), save best weights, last model and state
    atomically.

    Replaces Keras' EarlyStopping/ModelCheckpoint so that their counters survive a restart; it runs after
    ReduceLROnPlateau (``reduce_lr``), so the saved optimizer has this epoch's learning rate, and it saves the
    random state and that callback's counters with the model, so a resumed run continues exactly.
    """

    def __init__(self, folder: Path, state: RunState, patience: int, is_chief: bool,
                 history: list[dict[str, float]], criterion: selection.Criterion,
                 reduce_lr: _ReduceLR | None = None) -> None:
        super().__init__()
        self.folder, self.state, self.patience, self.is_chief = folder, state, patience, is_chief
        self.history, self.criterion, self.reduce_lr = history, criterion, reduce_lr
        self.best_weights: list[Any] | None = None  # in memory on every worker, so all restore the same

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        key = self.criterion.monitor
        if key not in logs:
            raise StepError(f"no {key} was computed (train.select_on): the validation split is empty or failed")
        value = float(logs[key])
        st = self.state
        improved = self.criterion.better(value, st.best_value)
        if improved:
            st.best_value, st.best_epoch, st.wait = value, epoch, 0
            self.best_weights = self.model.get_weights()
        else:
            st.wait += 1
        st.epoch = epoch
        st.rng = rng_state(self.model)
        st.reduce_lr = None if self.reduce_lr is None else self.reduce_lr.counters()
        if self.patience and st.wait >= self.patience:
            st.stopped = True
            self.model.stop_training = True
            log.info("early stopping at epoch %d: %s has not improved for %d epochs (best %s at %d)",
                     epoch + 1, key, st.wait, _fmt(st.best_value), st.best_epoch + 1)
        if not self.is_chief:
            return
        if improved:
            with atomic_path(self.folder / "best.weights.h5", suffix=".weights.h5") as tmp:
                self.model.save_weights(tmp)
        with atomic_path(self.folder / "last.keras", suffix=".keras") as tmp:
            self.model.save(tmp)
        write_history(self.folder / "history.csv", self.history)
        write_json(self.folder / "state.json", asdict(st))  # last: it vouches for the files above


class _Live(keras.callbacks.Callback):
    """Per-epoch metrics into DVCLive (its plots, for `dvc plots`) and a history list.

    DVCLive's metrics.json holds the latest epoch while training runs; train_model replaces it with the kept
    epoch's figures at the end."""

    def __init__(self, live: Any, history: list[dict[str, float]]) -> None:
        super().__init__()
        self.live, self.history = live, history

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        lr = self.model.optimizer.learning_rate
        row["lr"] = float(keras.ops.convert_to_numpy(lr)) if not callable(lr) else float("nan")
        self.history.append(row)
        if self.live is None:
            return
        for name in METRICS:
            for prefix, split in (("", "train"), ("val_", "val")):
                if prefix + name in row:
                    self.live.log_metric(f"{split}/{name}", row[prefix + name])
        self.live.next_step()


# ------------------------------------------------------------------------------------------- the run


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _open_live(folder: Path, resume: bool, is_chief: bool) -> Any:
    if not is_chief:
        return None
    try:
        from dvclive import Live
    except ImportError:  # e.g. a GPU box with only JAX and Keras: history.csv still has every epoch
        log.warning("dvclive is not installed: per-epoch metrics go to history.csv only")
        if not resume:  # as DVCLive would: no earlier run's plots stay behind (dvc.yaml keeps outputs: persist)
            shutil.rmtree(folder / "plots", ignore_errors=True)
        return None
    return Live(dir=str(folder), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)


def _resume_live(live: Any, state: RunState) -> None:
    """Continue DVCLive's plots after the last checkpointed epoch of ``state``.

    DVCLive would take its step from metrics.json, which holds the kept epoch's summary after a finished run;
    and a run killed between DVCLive's write and the checkpoint's logged one epoch more than it saved, which the
    resumed run trains again: its rows go, so that every epoch is plotted once.
    """
    if live is None:
        return
    live.step = state.epoch + 1
    for tsv in sorted(Path(live.plots_dir, "metrics").rglob("*.tsv")):
        with open(tsv, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            fields, rows = reader.fieldnames, list(reader)
        kept = [row for row in rows if int(row["step"]) <= state.epoch]
        if fields is None or len(kept) == len(rows):
            continue
        with atomic_path(tsv) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)


def _set_precision(train: TrainConfig) -> None:
    keras.mixed_precision.set_dtype_policy("float32" if train.mixed_precision == "none" else train.mixed_precision)


def _build(cfg: Config, data: inputs.SplitData, placement: Placement, steps: int,
           resume_from: Path | None) -> keras.Model:
    neg, pos = data.class_counts("train")
    with placement.scope():
        if resume_from is not None:
            model = keras.saving.load_model(resume_from, custom_objects=models.custom_objects(), safe_mode=True)
            models.allow_jit(model, cfg.train.jit_compile)
        else:
            model = models.build_model(cfg.train, input_shape=data.input_shape, allow_flips=cfg.dataset.allow_flips,
                                       pos=pos, neg=neg)
            models.allow_jit(model, cfg.train.jit_compile)
            model.compile(optimizer=make_optimizer(cfg.train, learning_rate(cfg.train, steps, base_lr(cfg.train))),
                          loss=keras.losses.BinaryCrossentropy(), metrics=make_metrics(),
                          jit_compile=models.jit_compile(cfg.train.jit_compile))
        if not model.optimizer.built:
            # Eagerly, in the placement's scope: left to the first traced train step, building the optimizer's
            # slots doubles the step's tracing (first epoch of a 32 px medflow_cnn run, same load: 75 s -> 32 s
            # on the 2-core VM). The state is the same: zero slots, iteration 0.
            model.optimizer.build(model.trainable_variables)
    return model


def _callbacks(cfg: Config, folder: Path, state: RunState, placement: Placement, live: Any,
               history: list[dict[str, float]]) -> list[keras.callbacks.Callback]:
    crit = selection.criterion(cfg.train.select_on)
    reduce_lr = None
    if cfg.train.reduce_lr_patience and cfg.train.schedule == "constant":
        reduce_lr = _ReduceLR(state.reduce_lr, monitor=crit.monitor, mode=crit.mode, factor=0.5,
                              patience=cfg.train.reduce_lr_patience, min_lr=1e-6)
    checkpointer = _Checkpointer(folder, state, cfg.train.early_stopping_patience, placement.is_chief, history,
                                 crit, reduce_lr)
    # _Live first (the row keeps the epoch's own learning rate), the checkpoint last (it saves the reduced one)
    return [_Live(live, history), *([reduce_lr] if reduce_lr else []), checkpointer]


def _fit(cfg: Config, model: keras.Model, data: inputs.SplitData, placement: Placement, state: RunState,
         global_batch: int, callbacks: list[keras.callbacks.Callback]) -> None:
    """Keras ``fit``, or the custom tf.distribute loop where ``fit`` cannot run (multi-worker)."""
    train = cfg.train
    # Training uses whole batches only (one traced step; the order is reshuffled every epoch, so every image is
    # seen); several replicas need whole global batches for validation too, one device keeps every image.
    whole = placement.replicas > 1
    n_train = len(data.rows["train"])
    drop = n_train >= global_batch
    # An epoch-keyed stream (tf.data) or epoch counter (PyDataset) starting at the resumed epoch: a resumed run
    # sees the batches an uninterrupted run would. The custom multi-worker loop iterates whole datasets instead.
    start = None if placement.kind == "multi_worker" else state.epoch + 1
    weights = train_class_weights(cfg, data)
    custom_loop = placement.kind == "multi_worker"  # weighs the val loss itself
    train_ds = inputs.batches(data, "train", batch_size=global_batch, shuffle=True, seed=train.seed,
                              drop_remainder=drop, start_epoch=start)
    # Validation batches carry the training class weights, so val_loss is the training objective on val.
    val_ds = inputs.batches(data, "val", batch_size=global_batch, shuffle=False, seed=train.seed,
                            drop_remainder=whole, class_weight=None if custom_loop else weights)
    if custom_loop:
        from medflow.training.tf_loop import DistributedLoop

        DistributedLoop(model, placement.tf_strategy, global_batch, weights).fit(
            train_ds, val_ds, epochs=train.epochs, initial_epoch=state.epoch + 1, callbacks=callbacks)
        return
    stream = keras.backend.backend() == "tensorflow"  # the endless tf.data stream needs steps_per_epoch
    model.fit(train_ds, validation_data=val_ds, epochs=train.epochs, initial_epoch=state.epoch + 1, verbose=2,
              steps_per_epoch=inputs.steps(n_train, global_batch, drop) if stream else None,
              class_weight=weights, callbacks=callbacks, shuffle=False)  # batches() shuffles, seeded


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch rows as CSV, ``epoch`` first, written atomically (a reader never sees half a file)."""
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        # epoch stays an integer, so a resumed run's history.csv reads as an uninterrupted run's
        return [{k: int(float(v)) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def run_fingerprint(cfg: Config, images: Path, split: Path) -> str:
    """The identity of a training run: the data, the train params and the flip rule.

    A checkpoint is resumed only under the same fingerprint, so changed params or data start afresh; it is
    also stored in the metadata as ``data_fingerprint``.
    """
    key = fingerprint_data(Path(images), Path(split)) + cfg.train.model_dump_json() + json.dumps(
        cfg.dataset.allow_flips)
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class TrainResult:
    """A finished run: the model with its best weights (``train.select_on``) restored, and how it got there."""

    model: keras.Model
    state: RunState
    history: list[dict[str, float]]
    placement: Placement
    global_batch: int
    seconds: float
    resumed_from_epoch: int  # 0 for a run from scratch

    def best_row(self) -> dict[str, float]:
        """The history row of the kept epoch (empty when no epoch improved)."""
        return next((row for row in self.history if int(row.get("epoch", 0)) == self.state.best_epoch + 1), {})

    def live_metrics(self) -> dict[str, Any]:
        """DVCLive's ``metrics.json`` (``dvc exp show``, ``dvc metrics show``): the kept epoch's headline figures.

        A few numbers, so that ``dvc exp show`` fits a terminal: the kept epoch (1-based) and the epochs run,
        the train loss, the val loss and ROC AUC, and the ``train.select_on`` figure where it is another. Every
        epoch's every metric is in ``history.csv`` and DVCLive's plots.
        """
        st, row = self.state, self.best_row()
        out: dict[str, Any] = {"epoch": st.best_epoch + 1, "epochs_run": st.epoch + 1}
        for key in dict.fromkeys((*LIVE_HEADLINE, st.monitor)):
            if key in row:
                split, name = ("val", key[4:]) if key.startswith("val_") else ("train", key)
                out.setdefault(split, {})[name] = row[key]
        return out

    def summary(self) -> dict[str, Any]:
        """The headline figures (JSON-ready), for logs and callers."""
        st = self.state
        return {"best_epoch": st.best_epoch + 1, "select_on": st.monitor, "best_value": st.best_value,
                "best_val_loss": self.best_row().get("val_loss"), "epochs_run": st.epoch + 1,
                "seconds": self.seconds, "global_batch": self.global_batch,
                "resumed_from_epoch": self.resumed_from_epoch}


def selection_metadata(cfg: Config, data: inputs.SplitData, result: TrainResult) -> dict[str, Any]:
    """How the kept epoch was chosen: the criterion (in words too), its best value, and val at that epoch."""
    weights = train_class_weights(cfg, data)
    crit = selection.criterion(cfg.train.select_on)
    return {"select_on": crit.monitor, "mode": crit.mode,
            "criterion": selection.describe(cfg.train.select_on, weights),
            "class_weights": None if weights is None else {str(k): v for k, v in weights.items()},
            "best_value": result.state.best_value, "best_epoch": result.state.best_epoch + 1,
            "val_at_best": {k: v for k, v in result.best_row().items() if k.startswith("val_")}}


def metadata(cfg: Config, data: inputs.SplitData, result: TrainResult, fingerprint: str) -> dict[str, Any]:
    """``metadata.json``: what inference needs to preprocess exactly as in training, and how the model came to be."""
    neg, pos = data.class_counts("train")
    state, placement = result.state, result.placement
    return {
        "task": cfg.dataset.name,
        "input_shape": list(data.input_shape),
        "channels": cfg.dataset.channels,
        "class_names": {str(label): name for label, name in enumerate(cfg.dataset.class_names)},
        "labels": dict(cfg.dataset.labels),
        "positive_class": [k for k, v in cfg.dataset.labels.items() if v == 1],
        "preprocessing": {"size": cfg.resize.size, "channels": cfg.dataset.channels, "interpolation": "area",
                          "resize": "stretch to square", "decoder": "medflow.imaging.decode.load_resized",
                          "input_dtype": "uint8", "scaling": "inside the model"},
        "data_fingerprint": fingerprint,
        "train_counts": {"negative": neg, "positive": pos},
        "val_counts": dict(zip(("negative", "positive"), data.class_counts("val"), strict=True)),
        "best_epoch": state.best_epoch + 1,
        "best_val_loss": result.best_row().get("val_loss"),
        "selection": selection_metadata(cfg, data, result),
        "epochs_run": state.epoch + 1,
        "early_stopped": state.stopped,
        "placement": {"strategy": placement.kind, "replicas": placement.replicas,
                      "global_batch": result.global_batch},
        "params": {"train": cfg.train.model_dump(), "resize": cfg.resize.model_dump(),
                   "dataset": {"name": cfg.dataset.name, "allow_flips": cfg.dataset.allow_flips}},
        "versions": package_versions(),
        "train_seconds": round(result.seconds, 1),
    }


def clear_checkpoints(folder: Path) -> None:
    """Empty the checkpoint folder (it must exist: dvc.yaml declares it as a persistent output)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _resume_state(folder: Path, fingerprint: str, monitor: str) -> tuple[RunState, bool]:
    """(the state to continue from, whether it is a resume): a fresh state, and an emptied folder, unless
    ``folder`` holds this run's state and last model."""
    state = RunState.load(folder / "state.json", fingerprint)
    if state is not None and state.monitor == monitor and (folder / "last.keras").exists():
        return state, True
    clear_checkpoints(folder)
    return RunState(fingerprint, monitor=monitor), False


def _train_epochs(cfg: Config, model: keras.Model, data: inputs.SplitData, placement: Placement, state: RunState,
                  global_batch: int, checkpoints: Path, live_dir: Path, resuming: bool,
                  history: list[dict[str, float]]) -> list[Any] | None:
    """Run the remaining epochs with checkpointing and DVCLive; return the best weights seen (None if no epoch
    improved on the resumed best)."""
    live = _open_live(live_dir, resuming, placement.is_chief)
    if resuming:
        _resume_live(live, state)
    callbacks = _callbacks(cfg, checkpoints, state, placement, live, history)
    try:
        _fit(cfg, model, data, placement, state, global_batch, callbacks)
    finally:
        if live is not None:
            live.end()
    return next((c.best_weights for c in callbacks if isinstance(c, _Checkpointer)), None)


def train_model(cfg: Config, data: inputs.SplitData, *, placement: Placement, fingerprint: str, checkpoints: Path,
                live_dir: Path) -> TrainResult:
    """Train on ``data``'s train split, selecting on val; continue from ``checkpoints`` if it holds this run.

    ``placement`` must come from :func:`~medflow.training.distribute.place` before any other TensorFlow work
    (multi-worker collectives start there). Every epoch is checkpointed into ``checkpoints`` (by the chief) and
    logged to DVCLive in ``live_dir``; the returned model carries the weights of the best ``train.select_on``.
    Saving the model folder is the caller's job (the train step's), so that it happens once, on the chief.
    """
    train = cfg.train
    keras.utils.set_random_seed(train.seed)
    _set_precision(train)
    global_batch = placement.global_batch(train.batch_size)
    n_train = len(data.rows["train"])
    steps = inputs.steps(n_train, global_batch, drop_remainder=n_train >= global_batch)
    checkpoints = Path(checkpoints)
    state, resuming = _resume_state(checkpoints, fingerprint, train.select_on)
    history = _read_history(checkpoints / "history.csv") if resuming else []
    log.info("train: %s on %d images (neg %d, pos %d), val %d; global batch %d = %d x %d replica(s); selecting on "
             "%s; %s", train.model, n_train, *data.class_counts("train"), len(data.rows["val"]), global_batch,
             train.batch_size, placement.replicas, selection.describe(train.select_on, train_class_weights(cfg, data)),
             f"resuming after epoch {state.epoch + 1}" if resuming else "from scratch")
    resumed_from = state.epoch + 1
    model = _build(cfg, data, placement, steps, checkpoints / "last.keras" if resuming else None)
    if resuming:  # a reloaded model starts its SeedGenerators afresh: continue where the checkpoint left them
        restore_rng_state(model, state.rng)
    start = time.perf_counter()
    best = None
    if not state.stopped and state.epoch + 1 < train.epochs:
        best = _train_epochs(cfg, model, data, placement, state, global_batch, checkpoints, Path(live_dir),
                             resuming, history)
    seconds = time.perf_counter() - start
    if best is not None:
        model.set_weights(best)
    elif (checkpoints / "best.weights.h5").exists():  # resumed, and no better epoch since: the chief's file
        model.load_weights(checkpoints / "best.weights.h5")
    log.info("train: best %s %s at epoch %d of %d run (%.0f s)", state.monitor, _fmt(state.best_value),
             state.best_epoch + 1, state.epoch + 1, seconds)
    _log_chance(history, state.best_epoch + 1, data.class_counts("train"), data.class_counts("val"),
                train_class_weights(cfg, data))
    result = TrainResult(model, state, history, placement, global_batch, seconds, resumed_from)
    if placement.is_chief:  # last: DVCLive wrote the latest epoch's figures there after every epoch
        write_json(Path(live_dir) / LIVE_METRICS, result.live_metrics())
    return result


def _log_chance(history: list[dict[str, float]], best_epoch: int, train: tuple[int, int], val: tuple[int, int],
                class_weight: dict[int, float] | None) -> None:
    """Say whether the kept epoch's val_loss beats always predicting the training prevalence, in val_loss's own
    weighting (the training class weights; selection.cross_entropy). The evaluate stage's chance guard
    (medflow.evaluation.chance) gives the verdict on the model's val predictions."""
    row = next((r for r in history if int(r.get("epoch", 0)) == best_epoch and "val_loss" in r), None)
    if row is None or 0 in train:
        return
    q = train[1] / sum(train)
    baseline = selection.prevalence_loss(np.repeat([0.0, 1.0], val), q, class_weight)
    weighting = "class-weighted as trained" if class_weight else "unweighted"
    if row["val_loss"] < baseline:
        log.info("train: val_loss %.4f beats %.4f (%s), always predicting the training prevalence %.3f",
                 row["val_loss"], baseline, weighting, q)
        return
    log.warning("train: AT CHANCE? val_loss %.4f is no better than %.4f (%s), the loss of always predicting the "
                "training prevalence %.3f: the model has not learnt the task", row["val_loss"], baseline, weighting, q)


def predict_probabilities(model: keras.Model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities for a uint8 batch of images, in inference mode (no augmentation)."""
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0)).reshape(-1).astype(np.float64)


"""Training input pipeline: seeded, shuffled batches of uint8 images gathered straight from the image store.

The resize step writes every image into an image store (:class:`medflow.io.ImageStore`: shard files of raw
``(size, size, channels)`` uint8 rows and a row index); the split table says which row of it belongs to which
split, with which label. :func:`load_split_data` opens the store, each shard a memory map (nothing is read
yet; the page cache holds what is read, shared by every epoch and process) and validates the split table
against it. :func:`batches` turns one split into what ``model.fit`` consumes for the current Keras backend:

- **tensorflow**: a ``tf.data.Dataset``. The *row indices* are shuffled (seeded; a new, reproducible
  order each epoch via ``reshuffle_each_iteration``) and batched first, then each batch is gathered from
  the memory map in one NumPy call (``tf.numpy_function``), several batches at once
  (``num_parallel_calls``), in deterministic order, and prefetched.
- **jax / torch / numpy**: a ``keras.utils.PyDataset`` (:class:`MemmapBatches`) whose epoch order is a
  permutation drawn from ``numpy.random.default_rng([seed, epoch])``; a small thread pool reads the next
  batches ahead while the accelerator works.

Why gather whole batches from a memory map: the images are already decoded and resized, so a batch is
one fancy-indexing copy per shard it touches (no per-image Python, no decode). Shuffled indices are sorted
inside each batch by where their rows lie (shard, then slot) before the read, so each shard's rows are taken
together, straight into the batch, and the pages are touched in ascending order (sequential reads on a
cold cache); the
labels are permuted with them, and the order of examples inside a batch does not matter to training.
Unshuffled batches keep split-table order exactly, so ``model.predict(batches(..., shuffle=False))`` lines
up with ``data.labels[split]``. Batches stay uint8 until the model (its first layer rescales): host to
device transfers are 4x smaller than float32.

Why not Keras's own PyDataset workers: with ``workers > 1`` Keras runs an enqueuer that computes batches
ahead in threads. The JAX and torch trainers peek at one batch to build the model and then end that
"epoch"; the enqueuer keeps the batches it had already computed and serves them at the start of the next
epoch, so every later epoch is shifted by up to ``max_queue_size`` batches of the previous order and some
rows are seen twice per epoch while others are missed (measured with Keras 3.15). :class:`MemmapBatches`
therefore tells Keras ``workers=1`` (no enqueuer; Keras calls ``__getitem__`` in order from its own thread)
and reads ahead itself, keyed to the current epoch: read-ahead is dropped in :meth:`on_epoch_end`.

Use it with ``model.fit(ds, shuffle=False)``: the order is already shuffled here, seeded; fit's own
``shuffle=True`` (its default) would permute the batch order of a PyDataset again with Python's
``random`` and defeat the read-ahead (it stays correct, only slower: batches are then read on demand).

This module imports no TensorFlow at module level: with ``KERAS_BACKEND=jax`` or ``torch`` it runs
where TensorFlow is not installed. It needs keras, numpy and pandas (through :mod:`medflow.io`), and no
:mod:`medflow.config` (pydantic, yaml).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from medflow.errors import StepError
from medflow.io import ImageStore, n_workers, open_images, read_csv
from medflow.schema import SPLITS
from medflow.training.selection import sample_weights

log = logging.getLogger(__name__)

PY_DATASET_BACKENDS = ("jax", "torch", "numpy")
DEFAULT_READ_AHEAD = 8  # batches a MemmapBatches reads ahead (the tf.data branch prefetches with AUTOTUNE)
MAX_DEFAULT_WORKERS = 8  # a batch is a memory copy: a few threads saturate memory bandwidth


@dataclass(frozen=True)
class SplitData:
    """The resized images (an image store, or an array in memory) and, per split, their rows and labels.

    ``rows[split]`` (int64) and ``labels[split]`` (float32, 0/1) are in split-table order.
    """

    images: ImageStore | np.ndarray
    rows: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of one image."""
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)

    def class_counts(self, split: str) -> tuple[int, int]:
        """``(negatives, positives)`` in ``split`` (for class weights and the output bias)."""
        y = self.labels[_known(self, split)]
        pos = int(np.count_nonzero(y))
        return len(y) - pos, pos


def load_split_data(images: Path, split: Path) -> SplitData:
    """Open ``images`` (the resize step's image store) and read ``split`` (the split table) against it.

    Raises :class:`StepError` naming the file when either is missing or unreadable, when the array is not
    uint8 ``(N, H, W, C)``, when a ``row`` is not an integer in ``[0, N)`` or appears twice, when a
    ``label`` is not 0/1, when a ``split`` value is unknown, or when a split has no rows.
    """
    array = _open_images(Path(images))
    df = _read_split(Path(split))
    rows = _rows(df, Path(split), len(array), Path(images))
    labels = _labels(df, Path(split))
    names = df["split"].to_numpy()
    unknown = sorted(set(names) - set(SPLITS))
    if unknown:
        raise StepError(f"{split}: unknown split values {unknown} (expected {', '.join(SPLITS)})")
    by_split = {s: names == s for s in SPLITS}
    empty = [s for s, mask in by_split.items() if not mask.any()]
    if empty:
        raise StepError(f"{split}: no rows in split {', '.join(empty)}")
    data = SplitData(
        images=array,
        rows={s: rows[mask] for s, mask in by_split.items()},
        labels={s: labels[mask] for s, mask in by_split.items()},
    )
    log.info("%s: %d images %s; %s", images, len(array), "x".join(map(str, data.input_shape)),
             ", ".join(f"{s} {len(data.rows[s])} (neg/pos {'/'.join(map(str, data.class_counts(s)))})"
                       for s in SPLITS))
    return data


def steps(n: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches per epoch for ``n`` examples: the last partial batch counts unless it is dropped."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, epoch_seeded: bool = True) -> np.ndarray:
    """Positions ``0..n-1`` in the order of one epoch: a permutation seeded by ``(seed, epoch)``.

    ``epoch_seeded=False`` reuses epoch 0's permutation every epoch; ``shuffle=False`` keeps the order.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    key = [seed % (1 << 64), epoch if epoch_seeded else 0]
    return np.random.default_rng(key).permutation(n).astype(np.int64)


def gather(data: SplitData, split: str, positions: np.ndarray, *, sort: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8) and labels (float32) of ``split`` at ``positions`` (indices into ``data.rows[split]``).

    ``sort=True`` reads the rows in ascending order (sequential on disk) and returns the batch in that
    order, labels permuted alike; ``sort=False`` keeps the order of ``positions``.
    """
    return _gather(data.images, data.rows[split], data.labels[split], np.asarray(positions), sort)


def batches(
    data: SplitData,
    split: str,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch_seeded: bool = True,
    drop_remainder: bool = False,
    backend: str | None = None,
    num_parallel_calls: int | None = None,
    max_queue_size: int = DEFAULT_READ_AHEAD,
    start_epoch: int | None = None,
    class_weight: dict[int, float] | None = None,
) -> Any:
    """Batches ``(uint8 images, float32 labels)`` of one split for ``model.fit`` under ``backend``.

    ``backend`` defaults to ``keras.backend.backend()``. tensorflow -> ``tf.data.Dataset``; jax, torch,
    numpy -> :class:`MemmapBatches` (pass ``shuffle=False`` to ``model.fit``; see the module docstring).
    The same data, seed and arguments give the same batch sequence, epoch after epoch (tf.data's shuffle
    is also keyed by TensorFlow's global seed, which ``keras.utils.set_random_seed`` sets: seed first).
    The PyDataset's epoch count starts at 0 for each new object: a resumed run gets epoch 0's order again.

    ``shuffle``: a new seeded order every epoch (``epoch_seeded=False``: the same shuffled order every
    epoch). ``num_parallel_calls``: batches gathered concurrently (tf.data: None = AUTOTUNE; PyDataset:
    reader threads, None = up to 8, one per core, 0 = read in the caller's thread). ``max_queue_size``:
    batches a PyDataset reads ahead.

    ``start_epoch`` (training, resumable): the first epoch's order is ``epoch_order(..., epoch=start_epoch)``,
    exactly as in a run that started at epoch 0, so a resumed run sees the batches an uninterrupted one would.
    On tensorflow this makes the dataset an endless stream of epochs: pass ``steps_per_epoch`` to ``fit``.

    ``class_weight`` ({0: w0, 1: w1}, validation): batches are ``(images, labels, sample weights)``, each
    example weighted by its class, so Keras' ``val_loss`` is the class-weighted training objective.
    """
    backend = backend or keras.backend.backend()
    n = len(data.rows[_known(data, split)])
    if steps(n, batch_size, drop_remainder) == 0:
        raise StepError(f"split {split!r} has {n} images, fewer than one batch of {batch_size} "
                        "with drop_remainder: lower train.batch_size")
    if backend == "tensorflow":
        return _tf_dataset(data, split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           epoch_seeded=epoch_seeded, drop_remainder=drop_remainder,
                           num_parallel_calls=num_parallel_calls, start_epoch=start_epoch,
                           class_weight=class_weight)
    if backend in PY_DATASET_BACKENDS:
        workers = min(MAX_DEFAULT_WORKERS, n_workers(0)) if num_parallel_calls is None else num_parallel_calls
        return MemmapBatches(data, split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                             epoch_seeded=epoch_seeded, drop_remainder=drop_remainder, workers=workers,
                             max_queue_size=max_queue_size, start_epoch=start_epoch or 0,
                             class_weight=class_weight)
    raise ValueError(f"unknown backend {backend!r}: expected tensorflow or one of {', '.join(PY_DATASET_BACKENDS)}")


class MemmapBatches(keras.utils.PyDataset):
    """One split as a ``keras.utils.PyDataset``: batch ``i`` of the current epoch, gathered from the memory map.

    Keras sees ``workers=1`` (no Keras enqueuer, see the module docstring); ``workers`` threads of our own
    read up to ``max_queue_size`` batches ahead while Keras asks for them in order. Read-ahead only
    follows in-order access; any other access pattern is served on demand, still correct.
    :meth:`on_epoch_end` (Keras calls it after each epoch; call it yourself in a custom loop) moves to
    the next epoch's order and drops what was read ahead for the previous one. With ``class_weight`` a
    batch is ``(images, labels, sample weights)``.
    """

    def __init__(self, data: SplitData, split: str, *, batch_size: int, shuffle: bool, seed: int,
                 epoch_seeded: bool = True, drop_remainder: bool = False, workers: int = 4,
                 max_queue_size: int = DEFAULT_READ_AHEAD, start_epoch: int = 0,
                 class_weight: dict[int, float] | None = None) -> None:
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=max_queue_size)
        self._data, self._split = data, _known(data, split)
        self._n = len(data.rows[split])
        self._batch_size, self._shuffle, self._seed = batch_size, shuffle, seed
        self._epoch_seeded, self._class_weight = epoch_seeded, class_weight
        self._steps = steps(self._n, batch_size, drop_remainder)
        self._threads, self._ahead_depth = max(0, workers), max(0, max_queue_size)
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[int, Future[tuple[np.ndarray, np.ndarray]]] = {}
        self._last = -1
        self.epoch = start_epoch  # a resumed run continues with the order an uninterrupted one would use
        self._order = self._epoch_order()

    def __len__(self) -> int:
        return self._steps

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        if not 0 <= index < self._steps:
            raise IndexError(f"batch {index} out of range for {self._steps} batches")
        future = self._ahead.pop(index, None)
        self._read_ahead(index)
        x, y = future.result() if future is not None else self._load(index)
        if self._class_weight is None:
            return x, y
        return x, y, sample_weights(y, self._class_weight)

    def on_epoch_end(self) -> None:
        """Next epoch: a new order (when shuffling per epoch); read-ahead of the old one is dropped."""
        self._drop_read_ahead()
        self.epoch += 1
        self._order = self._epoch_order()

    def close(self) -> None:
        """Stop the reader threads (they also stop when the object is garbage-collected)."""
        self._drop_read_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _epoch_order(self) -> np.ndarray:
        return epoch_order(self._n, shuffle=self._shuffle, seed=self._seed, epoch=self.epoch,
                           epoch_seeded=self._epoch_seeded)

    def _positions(self, index: int) -> np.ndarray:
        return self._order[index * self._batch_size:(index + 1) * self._batch_size]

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return gather(self._data, self._split, self._positions(index), sort=self._shuffle)

    def _read_ahead(self, index: int) -> None:
        """Submit batches ``index+1 .. index+depth`` when access is in order; drop any other read-ahead."""
        in_order = index == self._last + 1
        self._last = index
        window = range(index + 1, min(index + 1 + self._ahead_depth, self._steps)) if in_order else range(0)
        for stale in [j for j in self._ahead if j not in window]:
            self._ahead.pop(stale).cancel()
        if self._threads == 0 or not window:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="medflow-batches")
        for j in window:
            if j not in self._ahead:
                # Positions are taken now, from this epoch's order: a late result can never mix epochs.
                self._ahead[j] = self._pool.submit(gather, self._data, self._split, self._positions(j),
                                                   sort=self._shuffle)

    def _drop_read_ahead(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._last = -1


# ----------------------------------------------------------------------------------------------- helpers
def _known(data: SplitData, split: str) -> str:
    if split not in data.rows:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(data.rows)}")
    return split


def _gather(images: ImageStore | np.ndarray, rows: np.ndarray, labels: np.ndarray, positions: np.ndarray,
            sort: bool) -> tuple[np.ndarray, np.ndarray]:
    positions = positions.astype(np.int64, copy=False)
    if sort:  # by shard and slot: each shard's rows are one copy straight into the batch (ImageStore._gather)
        where = images.locations(rows[positions]) if isinstance(images, ImageStore) else rows[positions]
        positions = positions[np.argsort(where, kind="stable")]
    return np.asarray(images[rows[positions]]), labels[positions]


def _tf_dataset(data: SplitData, split: str, *, batch_size: int, shuffle: bool, seed: int,
                epoch_seeded: bool, drop_remainder: bool, num_parallel_calls: int | None,
                start_epoch: int | None = None, class_weight: dict[int, float] | None = None) -> Any:
    import tensorflow as tf  # only here: the other backends run without TensorFlow installed

    n = len(data.rows[split])
    batch_dim = batch_size if drop_remainder else None
    image_shape = (batch_dim, *data.input_shape)

    def load(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return gather(data, split, positions, sort=shuffle)

    def tf_load(positions: Any) -> tuple[Any, Any]:
        x, y = tf.numpy_function(load, [positions], [tf.uint8, tf.float32], name="gather_batch")
        x.set_shape(image_shape)
        y.set_shape((batch_dim,))
        return x, y

    if start_epoch is None:
        ds = tf.data.Dataset.range(n)
        if shuffle:
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=epoch_seeded)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    else:  # an endless stream of epochs, each in epoch_order(seed, epoch): resumable at any epoch
        def order(epoch: np.int64) -> np.ndarray:
            return epoch_order(n, shuffle=shuffle, seed=seed, epoch=int(epoch), epoch_seeded=epoch_seeded)

        def one_epoch(epoch: Any) -> Any:
            positions = tf.numpy_function(order, [epoch], tf.int64, name="epoch_order")
            positions.set_shape((n,))
            return tf.data.Dataset.from_tensor_slices(positions).batch(batch_size, drop_remainder=drop_remainder)

        ds = tf.data.Dataset.range(start_epoch, 2**31 - 1).flat_map(one_epoch)
    ds = ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls,
                deterministic=True)
    if class_weight is not None:
        table = tf.constant([class_weight[0], class_weight[1]], tf.float32)
        ds = ds.map(lambda x, y: (x, y, tf.gather(table, tf.cast(y, tf.int32))))
    options = tf.data.Options()
    options.deterministic = True
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _open_images(path: Path) -> ImageStore:
    return open_images(path)  # always uint8 (N, height, width, channels): the store's index is checked


def _read_split(path: Path) -> pd.DataFrame:
    try:
        df = read_csv(path)
    except FileNotFoundError:
        raise StepError(f"{path}: split manifest not found (run the split step first)") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise StepError(f"{path}: not a readable CSV: {e}") from None
    missing = [c for c in ("row", "label", "split") if c not in df.columns]
    if missing:
        raise StepError(f"{path}: missing columns {missing}")
    return df


def _integers(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise StepError(f"{path}: {column} must be an integer, got {df[column].iloc[first]!r} "
                        f"on data line {first + 1} ({int(bad.sum())} such lines)")
    return values.astype(np.int64)


def _rows(df: pd.DataFrame, path: Path, n_images: int, images: Path) -> np.ndarray:
    rows = _integers(df, "row", path)
    bad = (rows < 0) | (rows >= n_images)
    if bad.any():
        raise StepError(f"{path}: row {int(rows[bad][0])} is outside {images} ({n_images} images); "
                        f"{int(bad.sum())} rows out of range: re-run the resize step")
    uniq, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        raise StepError(f"{path}: row {int(uniq[counts > 1][0])} appears {int(counts.max())} times; "
                        "each image may belong to one row")
    return rows


def _labels(df: pd.DataFrame, path: Path) -> np.ndarray:
    labels = _integers(df, "label", path)
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        raise StepError(f"{path}: label must be 0 or 1, got {int(labels[bad][0])} ({int(bad.sum())} rows)")
    return labels.astype(np.float32)

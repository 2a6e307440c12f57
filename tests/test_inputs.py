"""Training input pipeline: loading and validating the image store + split.csv, tf.data and PyDataset batches.

Every image's pixels all equal its row number in the image store, and its label is a function of that row, so a
batch shows which images it carries and whether the labels still line up after shuffling and sorting.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import write_split_csv

from medflow.errors import StepError
from medflow.imaging.store import save_array
from medflow.io import ImageStore
from medflow.schema import SPLITS
from medflow.training import inputs
from medflow.training.inputs import MemmapBatches, SplitData, batches, epoch_order, load_split_data, steps

N = 41  # images in the fixture: train 25, val 8, test 8 (batches of 4 leave a remainder of 1 in train)
SIZE = 3


def _label(row: int) -> int:
    return int(row % 3 == 0)


def _write(folder: Path, *, n: int = N, rows: Iterable[int] | None = None, labels: Iterable[object] | None = None,
           splits: Iterable[str] | None = None, images: np.ndarray | None = None) -> tuple[Path, Path]:
    """An image store (pixel value = row and a split.csv with the SPLIT_COLUMNS; rows listed out of order."""
    folder.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, SIZE, SIZE, 1)).copy()
    save_array(folder / "images", images, shard_rows=7)  # several shards: batches gather across them
    rows = [int(r) for r in np.random.default_rng(7).permutation(n)] if rows is None else list(rows)
    m = len(rows)
    split = write_split_csv(
        folder / "split.csv", paths=[f"data/raw/t/img{r}.png" for r in rows], rows=rows,
        labels=[_label(r) if isinstance(r, int) else 0 for r in rows] if labels is None else list(labels),
        splits=list(splits) if splits is not None else ["train"] * 25 + ["val"] * 8 + ["test"] * (m - 33),
        groups=[f"p{r}" for r in rows])
    return folder / "images", split


@pytest.fixture
def data(tmp_path: Path) -> SplitData:
    return load_split_data(*_write(tmp_path))


def _check_batch(x: np.ndarray, y: np.ndarray, shape: tuple[int, ...] = (SIZE, SIZE, 1)) -> list[int]:
    """Rows carried by a batch, after checking dtypes, whole images and label alignment."""
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == np.uint8 and y.dtype == np.float32
    assert x.shape[1:] == shape and y.shape == (len(x),)
    rows = x[:, 0, 0, 0].astype(int)
    assert (x == rows[:, None, None, None]).all()  # every pixel of an image belongs to the same row
    assert y.tolist() == [_label(r) for r in rows]
    return rows.tolist()


def _tf_epochs(ds: object, epochs: int) -> list[list[list[int]]]:
    """Rows per batch per epoch; each `for` over a tf.data.Dataset is one epoch, as in model.fit."""
    return [[_check_batch(x.numpy(), y.numpy()) for x, y in ds] for _ in range(epochs)]  # type: ignore[attr-defined]


def _py_epochs(ds: MemmapBatches, epochs: int, peek: bool = True) -> list[list[list[int]]]:
    """Rows per batch per epoch, driven the way Keras's JAX/torch fit drives a PyDataset.

    fit first takes one batch to build the model, then ends that pseudo-epoch (peek); then, every epoch,
    batches 0..len-1 in order, then on_epoch_end.
    """
    if peek:
        _check_batch(*ds[0])
        ds.on_epoch_end()
    out = []
    for _ in range(epochs):
        out.append([_check_batch(*ds[i]) for i in range(len(ds))])
        ds.on_epoch_end()
    return out


def _flat(epoch: list[list[int]]) -> list[int]:
    return [r for b in epoch for r in b]


def _both(data: SplitData, **kw: object) -> Iterator[tuple[str, list[list[list[int]]]]]:
    """The same arguments through both branches: (branch, rows per batch per epoch over 3 epochs)."""
    pytest.importorskip("tensorflow")
    yield "tensorflow", _tf_epochs(batches(data, "train", backend="tensorflow", **kw), 3)  # type: ignore[arg-type]
    yield "numpy", _py_epochs(batches(data, "train", backend="numpy", **kw), 3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- loading
def test_load_split_data_reads_rows_labels_and_shape(tmp_path: Path) -> None:
    images, split = _write(tmp_path)
    data = load_split_data(images, split)
    df = pd.read_csv(split)
    assert isinstance(data.images, ImageStore) and data.input_shape == (SIZE, SIZE, 1)
    assert len(data.images.shard_names) == 6  # 41 rows in shards of 7: every batch gathers across shards
    for s in SPLITS:
        part = df[df["split"] == s]
        assert data.rows[s].dtype == np.int64 and data.rows[s].tolist() == part["row"].tolist()
        assert data.labels[s].dtype == np.float32 and data.labels[s].tolist() == part["label"].tolist()
        assert data.class_counts(s) == ((part["label"] == 0).sum(), (part["label"] == 1).sum())


@pytest.mark.parametrize(("case", "message"), [
    ({"rows": [*range(40), 41]}, "row 41 is outside"),
    ({"rows": [*range(40), -1]}, "row -1 is outside"),
    ({"rows": [*range(40), 0]}, "row 0 appears 2 times"),
    ({"rows": [*range(40), "x"]}, "row must be an integer, got 'x'"),
    ({"rows": [*range(40), 1.5]}, "row must be an integer"),
    ({"labels": [0] * 40 + [2]}, "label must be 0 or 1, got 2"),
    ({"labels": [0] * 40 + [""]}, "label must be an integer"),
    ({"splits": ["train"] * 33 + ["val"] * 8}, "no rows in split test"),
    ({"splits": ["train"] * 25 + ["val"] * 8 + ["holdout"] * 8}, "unknown split values ['holdout']"),
])
def test_load_split_data_rejects_bad_inputs(tmp_path: Path, case: dict[str, object], message: str) -> None:
    kw = dict(case)
    if "rows" in kw or "labels" in kw:
        kw.setdefault("rows", range(41))
    images, split = _write(tmp_path, **kw)  # type: ignore[arg-type]
    with pytest.raises(StepError, match="^" + str(split)) as e:
        load_split_data(images, split)
    assert message in str(e.value)


def test_load_split_data_missing_files_and_columns(tmp_path: Path) -> None:
    images, split = _write(tmp_path)
    with pytest.raises(StepError, match=f"^{tmp_path / 'nope' / 'index.json'}: image store index not found"):
        load_split_data(tmp_path / "nope", split)
    with pytest.raises(StepError, match=f"^{tmp_path / 'nope.csv'}: split manifest not found"):
        load_split_data(images, tmp_path / "nope.csv")
    pd.read_csv(split).drop(columns=["label"]).to_csv(split, index=False)
    with pytest.raises(StepError, match=r"missing columns \['label'\]"):
        load_split_data(images, split)
    index = json.loads((images / "index.json").read_text())
    (images / "index.json").write_text(json.dumps({**index, "dtype": "float32"}))  # only uint8 stores exist
    with pytest.raises(StepError, match="index.json: not an image store index of this medflow"):
        load_split_data(images, split)
    (images / "index.json").write_text("not an index")
    with pytest.raises(StepError, match="index.json: not a readable image store index"):
        load_split_data(images, split)


def test_steps_and_unknown_names(data: SplitData) -> None:
    assert [steps(25, 4, False), steps(25, 4, True), steps(24, 4, False), steps(3, 4, True)] == [7, 6, 6, 0]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        steps(3, 0, False)
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        batches(data, "holdout", batch_size=4, shuffle=False, seed=0, backend="numpy")
    with pytest.raises(ValueError, match="unknown backend 'mxnet'"):
        batches(data, "train", batch_size=4, shuffle=False, seed=0, backend="mxnet")
    with pytest.raises(StepError, match="fewer than one batch of 64"):
        batches(data, "val", batch_size=64, shuffle=True, seed=0, drop_remainder=True, backend="numpy")


def test_epoch_order_is_seeded_per_epoch() -> None:
    a = [epoch_order(50, shuffle=True, seed=3, epoch=e).tolist() for e in range(3)]
    assert a == [epoch_order(50, shuffle=True, seed=3, epoch=e).tolist() for e in range(3)]
    assert a[0] != a[1] != a[2] and sorted(a[1]) == list(range(50))
    assert epoch_order(50, shuffle=True, seed=4, epoch=0).tolist() != a[0]
    assert epoch_order(50, shuffle=True, seed=3, epoch=2, epoch_seeded=False).tolist() == a[0]
    assert epoch_order(5, shuffle=False, seed=3, epoch=2).tolist() == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------- both branches
def test_every_row_once_per_epoch_with_aligned_labels(data: SplitData) -> None:
    train_rows = sorted(data.rows["train"].tolist())
    for branch, epochs in _both(data, batch_size=4, shuffle=True, seed=1):
        for epoch in epochs:
            assert [len(b) for b in epoch] == [4] * 6 + [1], branch
            assert sorted(_flat(epoch)) == train_rows, branch
            assert all(b == sorted(b, key=lambda r: int(data.images.locations(np.array([r]))[0]))
                       for b in epoch), branch  # read shard by shard, in ascending slot order


def test_same_seed_same_sequence_new_order_each_epoch(data: SplitData) -> None:
    for branch, first in _both(data, batch_size=4, shuffle=True, seed=11):
        again = dict(_both(data, batch_size=4, shuffle=True, seed=11))[branch]
        assert first == again, branch
        assert _flat(first[0]) != _flat(first[1]) != _flat(first[2]), branch
        other_seed = dict(_both(data, batch_size=4, shuffle=True, seed=12))[branch]
        assert other_seed[0] != first[0], branch


def test_epoch_seeded_false_repeats_one_shuffled_order(data: SplitData) -> None:
    csv_order = data.rows["train"].tolist()
    for branch, epochs in _both(data, batch_size=4, shuffle=True, seed=5, epoch_seeded=False):
        assert epochs[0] == epochs[1] == epochs[2], branch
        assert _flat(epochs[0]) != csv_order, branch


def test_unshuffled_batches_keep_split_csv_order(data: SplitData) -> None:
    csv_order = data.rows["train"].tolist()
    assert csv_order != sorted(csv_order)  # the fixture lists rows out of order
    for branch, epochs in _both(data, batch_size=4, shuffle=False, seed=0):
        assert all(_flat(e) == csv_order for e in epochs), branch


def test_drop_remainder_gives_full_batches_only(data: SplitData) -> None:
    for branch, epochs in _both(data, batch_size=4, shuffle=True, seed=2, drop_remainder=True):
        for epoch in epochs:
            assert [len(b) for b in epoch] == [4] * 6, branch
            assert len(set(_flat(epoch))) == 24 and set(_flat(epoch)) <= set(data.rows["train"].tolist())
    ds = batches(data, "train", batch_size=4, shuffle=True, seed=2, drop_remainder=True, backend="tensorflow")
    assert tuple(ds.element_spec[0].shape) == (4, SIZE, SIZE, 1)  # static batch size (TPU/XLA friendly)
    assert len(batches(data, "train", batch_size=4, shuffle=True, seed=2, drop_remainder=True, backend="numpy")) == 6


def test_sorted_gather_keeps_labels_with_their_images(tmp_path: Path) -> None:
    # Labels that no formula predicts: only a correctly permuted label vector can match the pixels.
    labels = np.random.default_rng(3).integers(0, 2, N)
    rows = np.random.default_rng(4).permutation(N)
    data = load_split_data(*_write(tmp_path, rows=rows, labels=labels[rows]))
    for positions in (np.arange(25)[::-1], np.random.default_rng(5).permutation(25)[:9]):
        x, y = inputs.gather(data, "train", positions, sort=True)
        got = x[:, 0, 0, 0].astype(int)
        where = data.images.locations(got)
        assert sorted(got.tolist()) == sorted(data.rows["train"][positions].tolist()) and (np.diff(where) > 0).all()
        assert y.tolist() == labels[got].tolist()
        x2, y2 = inputs.gather(data, "train", positions, sort=False)
        assert x2[:, 0, 0, 0].tolist() == data.rows["train"][positions].tolist()
        assert y2.tolist() == labels[x2[:, 0, 0, 0].astype(int)].tolist()


# ----------------------------------------------------------------------------------------------- PyDataset
def test_py_dataset_read_ahead_is_dropped_at_epoch_end(data: SplitData) -> None:
    """Keras's fit peeks at batch 0 and ends that pseudo-epoch: nothing read ahead for it may leak."""
    reader = batches(data, "train", batch_size=4, shuffle=True, seed=9, backend="numpy", num_parallel_calls=3,
                     max_queue_size=5)
    direct = batches(data, "train", batch_size=4, shuffle=True, seed=9, backend="numpy", num_parallel_calls=0)
    assert reader.workers == 1 and not reader.use_multiprocessing  # Keras's enqueuer stays off
    got, want = _py_epochs(reader, 3, peek=True), _py_epochs(direct, 3, peek=True)
    assert got == want
    assert [sorted(_flat(e)) for e in got] == [sorted(data.rows["train"].tolist())] * 3
    reader.close()


def test_py_dataset_serves_out_of_order_access(data: SplitData) -> None:
    """fit(shuffle=True) permutes a PyDataset's batch indices: read-ahead must not serve the wrong batch."""
    ds = batches(data, "train", batch_size=4, shuffle=True, seed=9, backend="numpy", num_parallel_calls=2)
    ref = batches(data, "train", batch_size=4, shuffle=True, seed=9, backend="numpy", num_parallel_calls=0)
    for i in (0, 1, 5, 2, 3, 6, 4):
        assert _check_batch(*ds[i]) == _check_batch(*ref[i])
    with pytest.raises(IndexError):
        ds[7]


# ----------------------------------------------------------------------------------------------- with Keras
def _tiny_model() -> keras.Model:
    inp = keras.Input((SIZE, SIZE, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inp)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(x))
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["auc"])
    return model


@pytest.mark.parametrize("backend", ["tensorflow", "numpy"])
def test_model_fit_consumes_both_branches(data: SplitData, backend: str) -> None:
    if keras.backend.backend() != "tensorflow":
        pytest.skip("runs under the TensorFlow backend (the PyDataset branch is fed to it too)")
    train = batches(data, "train", batch_size=4, shuffle=True, seed=0, backend=backend)
    val = batches(data, "val", batch_size=4, shuffle=False, seed=0, backend=backend)
    hist = _tiny_model().fit(train, validation_data=val, epochs=2, class_weight={0: 1.0, 1: 2.0}, shuffle=False,
                             verbose=0)
    assert len(hist.history["loss"]) == 2 and np.isfinite(hist.history["val_loss"]).all()


def test_module_imports_no_tensorflow_at_top_level() -> None:
    """The JAX/torch machines have no TensorFlow: only the tf.data branch may import it, lazily."""
    tree = ast.parse(Path(inputs.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not {m for m in names if m and m.split(".")[0] == "tensorflow"}
    assert "medflow.config" not in names  # pydantic and yaml need not be there either


def _stream(ds: object, n_batches: int) -> list[list[int]]:
    it = iter(ds)  # type: ignore[call-overload]
    return [_check_batch(*(t.numpy() for t in next(it))) for _ in range(n_batches)]


@pytest.mark.parametrize("drop", [True, False])
def test_tf_epoch_stream_resumes_with_the_uninterrupted_order(data: SplitData, drop: bool) -> None:
    per_epoch = steps(25, 4, drop)
    full = _stream(batches(data, "train", batch_size=4, shuffle=True, seed=5, drop_remainder=drop,
                           backend="tensorflow", start_epoch=0), 3 * per_epoch)
    resumed = _stream(batches(data, "train", batch_size=4, shuffle=True, seed=5, drop_remainder=drop,
                              backend="tensorflow", start_epoch=2), per_epoch)
    assert resumed == full[2 * per_epoch:]
    rows = data.rows["train"]
    for e in range(3):  # each epoch is epoch_order(seed, e), every row once (sorted within a batch)
        epoch = full[e * per_epoch:(e + 1) * per_epoch]
        order = rows[epoch_order(25, shuffle=True, seed=5, epoch=e)]
        expected = [sorted(order[i:i + 4].tolist()) for i in range(0, per_epoch * 4, 4)]
        assert [sorted(b) for b in epoch] == expected


def test_pydataset_resumes_with_the_uninterrupted_order(data: SplitData) -> None:
    full = batches(data, "train", batch_size=4, shuffle=True, seed=5, backend="numpy", num_parallel_calls=0)
    full.on_epoch_end()
    full.on_epoch_end()
    resumed = batches(data, "train", batch_size=4, shuffle=True, seed=5, backend="numpy", num_parallel_calls=0,
                      start_epoch=2)
    assert [_check_batch(*full[i]) for i in range(len(full))] == [_check_batch(*resumed[i])
                                                                  for i in range(len(resumed))]


# ------------------------------------------------------------------------------------- class-weighted val
WEIGHTS = {0: 0.75, 1: 1.5}


def _hand_loss(model: keras.Model, data: SplitData, split: str, weights: dict[int, float] | None) -> float:
    """mean(w_y * binary cross-entropy) over the split, from the model's probabilities, in numpy."""
    x, y = inputs.gather(data, split, np.arange(len(data.rows[split])), sort=False)
    p = np.clip(model.predict(x, verbose=0).reshape(-1).astype(np.float64), 1e-7, 1 - 1e-7)
    w = np.array([1.0 if weights is None else weights[int(v)] for v in y])
    return float(np.mean(w * -(y * np.log(p) + (1 - y) * np.log(1 - p))))


@pytest.mark.parametrize("backend", ["tensorflow", "numpy"])
def test_weighted_batches_carry_each_example_class_weight(data: SplitData, backend: str) -> None:
    ds = batches(data, "val", batch_size=3, shuffle=False, seed=0, backend=backend, class_weight=WEIGHTS)
    triples = [tuple(np.asarray(t) for t in b) for b in ds] if backend == "tensorflow" else \
        [ds[i] for i in range(len(ds))]
    assert all(len(t) == 3 for t in triples)
    for x, y, w in triples:
        _check_batch(x, y)
        assert w.dtype == np.float32 and w.tolist() == [WEIGHTS[int(v)] for v in y]
    plain = batches(data, "val", batch_size=3, shuffle=False, seed=0, backend=backend)
    first = next(iter(plain)) if backend == "tensorflow" else plain[0]
    assert len(first) == 2  # without class_weight: (images, labels), as before


@pytest.mark.parametrize("backend", ["tensorflow", "numpy"])
def test_keras_val_loss_on_weighted_batches_is_the_hand_computed_weighted_loss(data: SplitData,
                                                                               backend: str) -> None:
    if keras.backend.backend() != "tensorflow":
        pytest.skip("runs under the TensorFlow backend (the PyDataset branch is fed to it too)")
    keras.utils.set_random_seed(3)
    model = _tiny_model()
    model.layers[-1].set_weights([np.linspace(-4, 4, SIZE * SIZE).reshape(-1, 1).astype("float32"),
                                  np.array([0.3], "float32")])  # a spread of probabilities, not all 0.5
    val = batches(data, "val", batch_size=3, shuffle=False, seed=0, backend=backend, class_weight=WEIGHTS)
    weighted = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    unweighted = model.evaluate(batches(data, "val", batch_size=3, shuffle=False, seed=0, backend=backend),
                                verbose=0, return_dict=True)["loss"]
    assert weighted == pytest.approx(_hand_loss(model, data, "val", WEIGHTS), rel=1e-5)
    assert unweighted == pytest.approx(_hand_loss(model, data, "val", None), rel=1e-5)
    assert abs(weighted - unweighted) > 1e-3  # the weights matter on this imbalanced split

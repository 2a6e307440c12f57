"""Training: pure helpers, overfitting one batch, real images end to end, resume after a crash, placements."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, shared_dataset, write_split_csv

from medflow.config import Config, parse_config
from medflow.errors import StepError
from medflow.training import fit as train_mod
from tasks import train as step


def _cfg(**train: object) -> Config:
    base = {"model": "medflow_cnn", "epochs": 2, "batch_size": 8, "early_stopping_patience": 0,
            "reduce_lr_patience": 0}
    base.update(train)
    return parse_config({"dataset": {"name": "t", "labels": {"NEG": 0, "POS": 1}, "channels": 1},
                         "resize": {"size": 32}, "train": base})


def _write_dataset(folder: Path, x: np.ndarray, y: np.ndarray, splits: list[str]) -> tuple[Path, Path]:
    """images.npy + split.csv in the pipeline's formats."""
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images.npy"
    np.save(images, x)
    n = len(x)
    split = write_split_csv(folder / "split.csv", paths=[f"img{i}.png" for i in range(n)],
                            labels=[int(v) for v in y], splits=splits, groups=[f"p{i}" for i in range(n)])
    return images, split


def _synthetic(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positives carry a bright square; negatives are noise only: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, (n, size, size, 1), dtype=np.uint8)
    y = np.arange(n) % 2
    x[y == 1, size // 4: size // 2, size // 4: size // 2] = 250
    return x, y


def test_class_weights_formula() -> None:
    w = train_mod.class_weights(neg=100, pos=300)
    assert w == pytest.approx({0: 2.0, 1: 400 / 600})
    assert w[0] * 100 == pytest.approx(w[1] * 300)  # each class weighs n/2 in total
    with pytest.raises(StepError, match="both classes"):
        train_mod.class_weights(neg=0, pos=3)


def test_schedules() -> None:
    cfg = _cfg(schedule="cosine", epochs=10, learning_rate=0.1)
    sched = train_mod.learning_rate(cfg.train, steps_per_epoch=5)
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(50)) == pytest.approx(0.0, abs=1e-6)
    exp = train_mod.learning_rate(_cfg(schedule="exponential", decay_rate=0.5).train, steps_per_epoch=4)
    assert float(exp(4)) == pytest.approx(0.0005)
    assert train_mod.learning_rate(_cfg().train, 4) == pytest.approx(1e-3)


@pytest.mark.slow
def test_overfits_one_batch() -> None:
    from medflow.training.models import build_model

    x, y = _synthetic(16)
    cfg = _cfg(augment={"rotation_deg": 0, "zoom": 0, "translate": 0, "brightness": 0, "contrast": 0})
    keras.utils.set_random_seed(0)
    model = build_model(cfg.train, input_shape=(32, 32, 1), allow_flips=False, pos=8, neg=8)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    history = model.fit(x, y.astype("float32"), batch_size=16, epochs=150, verbose=0)
    assert history.history["loss"][-1] < 0.05


def _tiny_run(tmp_path: Path, cfg: Config, n: int = 48) -> tuple[keras.Model, dict, Path]:
    x, y = _synthetic(n)
    splits = ["train"] * (n - 16) + ["val"] * 8 + ["test"] * 8
    images, split = _write_dataset(tmp_path / "data", x, y, splits)
    result = step.run(cfg, images=images, split=split, model_dir=tmp_path / "model", live_dir=tmp_path / "live")
    return result.model, result.summary(), images


@pytest.mark.slow
def test_outputs_metadata_and_live_metrics(tmp_path: Path) -> None:
    _, summary, _ = _tiny_run(tmp_path, _cfg(epochs=2))
    model_dir = tmp_path / "model"
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["input_shape"] == [32, 32, 1] and meta["channels"] == 1
    assert meta["class_names"] == {"0": "NEG", "1": "POS"}
    assert meta["placement"]["global_batch"] == 8 and meta["epochs_run"] == 2
    assert len(meta["data_fingerprint"]) == 64 and "keras" in meta["versions"]
    history = pd.read_csv(model_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"loss", "val_loss", "auc", "val_auc", "precision", "recall", "accuracy"} <= set(history.columns)
    live = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert {"train", "val"} <= set(live) and "auc" in live["val"]
    assert (tmp_path / "live" / "plots" / "metrics" / "val" / "loss.tsv").exists()
    assert not any((model_dir / "checkpoints").iterdir())  # a finished run leaves no checkpoint behind
    assert summary["epochs_run"] == 2


@pytest.mark.slow
def test_same_seed_same_initial_weights_and_batches(tmp_path: Path) -> None:
    cfg = _cfg(epochs=1)
    m1, _, _ = _tiny_run(tmp_path / "a", cfg)
    m2, _, _ = _tiny_run(tmp_path / "b", cfg)
    for w1, w2 in zip(m1.get_weights(), m2.get_weights(), strict=True):
        np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-6)


def test_missing_class_in_train_is_an_error(tmp_path: Path) -> None:
    x, _ = _synthetic(24)
    y = np.zeros(24, dtype=int)
    y[20:] = 1
    images, split = _write_dataset(tmp_path, x, y, ["train"] * 16 + ["val"] * 4 + ["test"] * 4)
    with pytest.raises(StepError, match="both classes"):
        step.run(_cfg(), images=images, split=split, model_dir=tmp_path / "m", live_dir=tmp_path / "l")


@pytest.mark.integration
@pytest.mark.slow
def test_two_epochs_on_real_images_reload_identically(tmp_path: Path) -> None:
    from medflow.imaging.decode import load_resized

    src = shared_dataset("chest_xray")
    files = [(p, 0) for p in sorted((src / "NORMAL").iterdir())[:32]]
    files += [(p, 1) for p in sorted((src / "PNEUMONIA").iterdir())[:32]]
    x = np.stack([load_resized(p, size=64, channels=1) for p, _ in files]).astype(np.uint8)
    y = np.array([label for _, label in files])
    splits = (["train"] * 20 + ["val"] * 8 + ["test"] * 4) * 2
    images, split = _write_dataset(tmp_path / "data", x, y, splits)
    cfg = parse_config({"dataset": {"name": "t", "labels": {"NORMAL": 0, "PNEUMONIA": 1}},
                        "resize": {"size": 64}, "train": {"epochs": 2, "batch_size": 16}})
    model = step.run(cfg, images=images, split=split, model_dir=tmp_path / "m", live_dir=tmp_path / "l").model
    reloaded = keras.saving.load_model(tmp_path / "m" / "model.keras")
    np.testing.assert_allclose(train_mod.predict_probabilities(model, x),
                               train_mod.predict_probabilities(reloaded, x), rtol=1e-5, atol=1e-6)


def _params_file(tmp_path: Path, **train: object) -> Path:
    cfg = _cfg(**train)
    data = json.loads(cfg.model_dump_json(by_alias=True))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_resume_after_a_crash(tmp_path: Path) -> None:
    """Kill a training process after its second epoch; the next run continues from the checkpoint."""
    from medflow.config import load_config

    x, y = _synthetic(48)
    images, split = _write_dataset(tmp_path / "data", x, y, ["train"] * 32 + ["val"] * 8 + ["test"] * 8)
    params = _params_file(tmp_path, epochs=30)
    cmd = [sys.executable, "-m", "medflow.cli", "train", "--params", str(params), "--images", str(images),
           "--split", str(split), "--model-dir", str(tmp_path / "m"), "--live-dir", str(tmp_path / "l")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = tmp_path / "m" / "checkpoints" / "state.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if state_file.exists() and json.loads(state_file.read_text())["epoch"] >= 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint was written in time")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = json.loads(state_file.read_text())["epoch"] + 1
    assert 2 <= done < 30, "the run finished before it could be killed"
    assert not (tmp_path / "m" / "model.keras").exists()  # nothing written under the final name yet

    summary = step.run(load_config(params), images=images, split=split, model_dir=tmp_path / "m",
                       live_dir=tmp_path / "l").summary()
    assert summary["resumed_from_epoch"] >= done  # continued, not restarted
    history = pd.read_csv(tmp_path / "m" / "history.csv")
    assert list(history["epoch"]) == list(range(1, 31))
    assert summary["epochs_run"] == 30


def test_fine_tuning_lowers_the_learning_rate() -> None:
    assert train_mod.base_lr(_cfg(learning_rate=0.01).train) == pytest.approx(0.01)  # own CNN, from scratch
    frozen = _cfg(model="resnet50", learning_rate=0.01).train
    assert train_mod.base_lr(frozen) == pytest.approx(0.01)
    tuned = _cfg(model="resnet50", learning_rate=0.01, fine_tune="all", fine_tune_lr_factor=0.1).train
    assert train_mod.base_lr(tuned) == pytest.approx(0.001)

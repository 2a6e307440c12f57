"""Training: pure helpers, overfitting one batch, real images end to end, resume after a crash, placements."""

from __future__ import annotations

import json
import os
import re
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
from medflow.imaging.store import save_array
from medflow.training import fit as train_mod
from tasks import train as step


def _cfg(**train: object) -> Config:
    base = {"model": "medflow_cnn", "epochs": 2, "batch_size": 8, "early_stopping_patience": 0,
            "reduce_lr_patience": 0}
    base.update(train)
    return parse_config({"dataset": {"name": "t", "labels": {"NEG": 0, "POS": 1}, "channels": 1},
                         "resize": {"size": 32}, "train": base})


def _write_dataset(folder: Path, x: np.ndarray, y: np.ndarray, splits: list[str]) -> tuple[Path, Path]:
    """An image store + split.csv in the pipeline's formats."""
    folder.mkdir(parents=True, exist_ok=True)
    images = save_array(folder / "images", x)
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
    model.optimizer.build(model.trainable_variables)
    losses = [float(model.train_on_batch(x, y.astype("float32"))) for _ in range(150)]  # 150 steps on one batch
    assert losses[-1] < 0.05


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


def _flipped_val(folder: Path, n: int = 48) -> tuple[Path, Path]:
    """Val labels the other way round: the better the model fits train, the worse its val loss, so the kept
    epoch (train.select_on val_loss) is an early one, not the last."""
    x, y = _synthetic(n)
    splits = ["train"] * (n - 16) + ["val"] * 8 + ["test"] * 8
    val = np.array(splits) == "val"
    y[val] = 1 - y[val]
    return _write_dataset(folder, x, y, splits)


def _assert_live_is_the_kept_epoch(live_dir: Path, history_csv: Path, epochs_run: int) -> int:
    """metrics.json holds the kept epoch's headline figures, equal to its history.csv row; returns that epoch."""
    live = json.loads((live_dir / "metrics.json").read_text())
    history = pd.read_csv(history_csv)
    kept = int(history["val_loss"].idxmin())  # the first lowest, as kept (select_on: val_loss)
    row = history.iloc[kept]
    assert live == {"epoch": kept + 1, "epochs_run": epochs_run,
                    "train": {"loss": pytest.approx(row["loss"])},
                    "val": {"loss": pytest.approx(row["val_loss"]), "auc": pytest.approx(row["val_auc"])}}
    assert len(history) == epochs_run
    steps = pd.read_csv(live_dir / "plots" / "metrics" / "val" / "loss.tsv", sep="\t")
    assert list(steps["step"]) == list(range(epochs_run))  # the per-epoch plots keep every epoch, in order
    np.testing.assert_allclose(steps["loss"], history["val_loss"], rtol=1e-6)
    return kept + 1


@pytest.mark.slow
def test_live_metrics_report_the_kept_epoch_also_on_resume(tmp_path: Path) -> None:
    """metrics.json (dvc exp show) is the kept epoch, not the last; a resumed run with no better epoch keeps it."""
    from medflow.training import inputs
    from medflow.training.distribute import place

    images, split = _flipped_val(tmp_path / "data")
    cfg = _cfg(epochs=3, learning_rate=3e-3)
    placement, data = place("one_device"), inputs.load_split_data(images, split)
    args = {"placement": placement, "fingerprint": train_mod.run_fingerprint(cfg, images, split),
            "checkpoints": tmp_path / "ckpt", "live_dir": tmp_path / "live"}
    first = train_mod.train_model(cfg, data, **args)  # leaves its checkpoints, as a run killed before the step's end
    kept = _assert_live_is_the_kept_epoch(tmp_path / "live", tmp_path / "ckpt" / "history.csv", 3)
    assert kept == first.state.best_epoch + 1 < 3, "the premise: the kept epoch is not the last"
    assert first.live_metrics() == json.loads((tmp_path / "live" / "metrics.json").read_text())

    (tmp_path / "live" / "metrics.json").write_text('{"step": 2, "val": {"loss": 9.0}}')  # DVCLive's last write
    again = train_mod.train_model(cfg, data, **args)
    assert again.resumed_from_epoch == 3 and again.state.best_epoch + 1 == kept
    assert _assert_live_is_the_kept_epoch(tmp_path / "live", tmp_path / "ckpt" / "history.csv", 3) == kept


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


def _train_cmd(params: Path, images: Path, split: Path, folder: Path) -> list[str]:
    return [sys.executable, "-m", "medflow.cli", "train", "--params", str(params), "--images", str(images),
            "--split", str(split), "--model-dir", str(folder / "m"), "--live-dir", str(folder / "l")]


def _wait_for_epoch(state_file: Path, epoch: int, proc: subprocess.Popen[bytes]) -> None:
    """Until the run's checkpoint has epoch ``epoch`` (0-based) done; fails if the run ends first."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if state_file.exists() and json.loads(state_file.read_text())["epoch"] >= epoch:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before epoch {epoch + 1} was checkpointed")
        time.sleep(0.05)
    pytest.fail("no checkpoint was written in time")


@pytest.mark.slow
def test_resume_after_a_crash_is_exact(tmp_path: Path) -> None:
    """SIGKILL a training run after its second epoch; the next run continues from that epoch boundary and ends
    with the very weights and history of an uninterrupted run (bitwise: the same seed, CPU, thread pool).

    The resumed run also meets an edited params.yaml (a key the train stage lists, edited while it trains): it
    fails naming the key, old -> new, so DVC records nothing; the re-run with the new params is the
    uninterrupted run it is compared with (the edit does not change the training).
    """
    from medflow.config import load_config

    images, split = _flipped_val(tmp_path / "data")  # val_loss worsens: ReduceLROnPlateau acts, after the crash
    params = _params_file(tmp_path, epochs=5, reduce_lr_patience=1)
    run = tmp_path / "run"
    state_file = run / "m" / "checkpoints" / "state.json"
    killed = subprocess.Popen(_train_cmd(params, images, split, run), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for_epoch(state_file, 1, killed)
    finally:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    done = json.loads(state_file.read_text())["epoch"] + 1
    assert 2 <= done < 5, "the run finished before it could be killed"
    assert not (run / "m" / "model.keras").exists()  # nothing written under the final name yet

    log_file = tmp_path / "resumed.log"
    with open(log_file, "wb") as log_out:
        resumed = subprocess.Popen(_train_cmd(params, images, split, run), cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=log_out)
        try:
            _wait_for_epoch(state_file, done, resumed)  # it read its params, and trains on
            edited = yaml.safe_load(params.read_text())
            edited["dataset"]["class_names"] = ["negative", "positive"]
            params.write_text(yaml.safe_dump(edited))
            assert resumed.wait(240) == 2
        finally:
            resumed.kill()
            resumed.wait()
    log = log_file.read_text()
    assert f"resuming after epoch {done}" in log  # continued, not restarted
    assert ("medflow train: error: the params changed while the step ran: dataset.class_names ['NEG', 'POS'] -> "
            "['negative', 'positive']") in log and "re-run the step" in log, log[-2000:]

    fresh = tmp_path / "fresh"
    step.run(load_config(params), images=images, split=split, model_dir=fresh / "m", live_dir=fresh / "l")
    history, uninterrupted = pd.read_csv(run / "m" / "history.csv"), pd.read_csv(fresh / "m" / "history.csv")
    assert list(history["epoch"]) == list(range(1, 6))
    assert history["lr"].iloc[-1] < history["lr"].iloc[0]  # the learning rate was reduced after the crash
    pd.testing.assert_frame_equal(history, uninterrupted, check_exact=True)
    resumed_model = keras.saving.load_model(run / "m" / "model.keras")
    fresh_model = keras.saving.load_model(fresh / "m" / "model.keras")
    for got, want in zip(resumed_model.get_weights(), fresh_model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    _assert_live_is_the_kept_epoch(run / "l", run / "m" / "history.csv", 5)


def test_a_resumed_live_plots_each_checkpointed_epoch_once(tmp_path: Path) -> None:
    """Killed after DVCLive logged epoch 3 but before its checkpoint: the resumed run plots epoch 3 once."""
    from dvclive import Live

    def live(resume: bool) -> Live:
        return Live(dir=str(tmp_path), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)

    first = live(False)
    for loss in (0.9, 0.8, 0.7):
        first.log_metric("val/loss", loss)
        first.next_step()  # metrics.json: step 2, one epoch ahead of the checkpoint below
    resumed = live(True)
    train_mod._resume_live(resumed, train_mod.RunState("f", epoch=1))
    resumed.log_metric("val/loss", 0.75)  # epoch 3 (0-based 2) again, then 4
    resumed.next_step()
    resumed.log_metric("val/loss", 0.6)
    resumed.next_step()
    rows = pd.read_csv(tmp_path / "plots" / "metrics" / "val" / "loss.tsv", sep="\t")
    assert list(rows["step"]) == [0, 1, 2, 3] and list(rows["loss"]) == [0.9, 0.8, 0.75, 0.6]


def test_fine_tuning_lowers_the_learning_rate() -> None:
    assert train_mod.base_lr(_cfg(learning_rate=0.01).train) == pytest.approx(0.01)  # own CNN, from scratch
    frozen = _cfg(model="resnet50", learning_rate=0.01).train
    assert train_mod.base_lr(frozen) == pytest.approx(0.01)
    tuned = _cfg(model="resnet50", learning_rate=0.01, fine_tune="all", fine_tune_lr_factor=0.1).train
    assert train_mod.base_lr(tuned) == pytest.approx(0.001)


# ------------------------------------------------------------------------------ model selection (select_on)
LOGS = {"val_loss": [0.90, 0.70, 0.60, 0.65, 0.55], "val_auc": [0.70, 0.80, 0.75, 0.74, 0.73],
        "val_pr_auc": [0.60, 0.50, 0.40, 0.30, 0.20]}


@pytest.mark.parametrize(("select_on", "best", "stopped_at"), [("val_loss", 4, None), ("val_auc", 1, 3),
                                                               ("val_pr_auc", 0, 2)])
def test_checkpointer_keeps_and_stops_on_the_chosen_criterion(tmp_path: Path, select_on: str, best: int,
                                                              stopped_at: int | None) -> None:
    """Best epoch, best weights, early stopping (patience 2) and the saved state follow train.select_on."""
    from medflow.training import selection

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    state = train_mod.RunState("f", monitor=select_on)
    cb = train_mod._Checkpointer(tmp_path, state, patience=2, is_chief=True, history=[],
                                 criterion=selection.criterion(select_on))
    cb.set_model(model)
    model.stop_training = False  # as fit (and the multi-worker loop) set it before the first epoch
    for epoch in range(5):
        model.set_weights([np.full((2, 1), epoch, "float32"), np.zeros(1, "float32")])  # marks the epoch
        cb.on_epoch_end(epoch, {k: v[epoch] for k, v in LOGS.items()})
        if model.stop_training:
            break
    assert state.best_epoch == best and state.best_value == LOGS[select_on][best]
    assert cb.best_weights is not None and float(cb.best_weights[0][0, 0]) == best
    assert state.stopped == (stopped_at is not None) and state.epoch == (4 if stopped_at is None else stopped_at)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["monitor"] == select_on and saved["best_epoch"] == best


def test_reduce_lr_on_plateau_watches_the_criterion(tmp_path: Path) -> None:
    from medflow.training.distribute import place

    for select_on, mode in (("val_loss", "min"), ("val_auc", "max")):
        cfg = _cfg(select_on=select_on, reduce_lr_patience=2)
        cbs = train_mod._callbacks(cfg, tmp_path, train_mod.RunState("f"), place("one_device"), None, [])
        (plateau,) = [c for c in cbs if isinstance(c, keras.callbacks.ReduceLROnPlateau)]
        assert (plateau.monitor, plateau.mode) == (select_on, mode)


def _imbalanced(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray, list[str]]:
    """64 images, a quarter positive: train 40 (10 positive), val 16 (4 positive), test 8 (2 positive)."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 100, (64, 32, 32, 1), dtype=np.uint8)
    y = (np.arange(64) % 4 == 0).astype(int)
    x[y == 1, 8:16, 8:16] = 250
    splits = ["train"] * 40 + ["val"] * 16 + ["test"] * 8
    images, split = _write_dataset(tmp_path / "data", x, y, splits)
    return images, split, x, y, splits


@pytest.mark.slow
@pytest.mark.parametrize("select_on", ["val_loss", "val_auc"])
def test_weighted_val_loss_is_the_hand_computed_objective_and_selects(tmp_path: Path, select_on: str) -> None:
    images, split, x, y, splits = _imbalanced(tmp_path)
    cfg = _cfg(epochs=3, select_on=select_on)
    result = step.run(cfg, images=images, split=split, model_dir=tmp_path / "m", live_dir=tmp_path / "l")
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    history = pd.read_csv(tmp_path / "m" / "history.csv")
    sel = meta["selection"]
    values = history[select_on].to_numpy()
    best = int(np.argmin(values) if select_on == "val_loss" else np.argmax(values))  # first best, as kept
    assert sel["select_on"] == select_on and sel["best_epoch"] == meta["best_epoch"] == best + 1
    assert sel["best_value"] == pytest.approx(values[best])
    assert sel["class_weights"] == pytest.approx({"0": 40 / 60, "1": 40 / 20})  # n / (2 n_c) on train
    words = {"val_loss": "weighted by the training class weights, negative 0.667, positive 2.000",
             "val_auc": "val ROC AUC"}
    assert words[select_on] in sel["criterion"]
    # The kept weights are the best epoch's: their class-weighted val loss by hand is that epoch's val_loss.
    val = np.array(splits) == "val"
    p = np.clip(train_mod.predict_probabilities(result.model, x[val]), 1e-7, 1 - 1e-7)
    yv = y[val]
    bce = -(yv * np.log(p) + (1 - yv) * np.log(1 - p))
    w = np.where(yv == 1, 40 / 20, 40 / 60)
    assert history["val_loss"][best] == pytest.approx(np.mean(w * bce), rel=1e-4)
    assert abs(np.mean(w * bce) - np.mean(bce)) > 1e-3  # not the unweighted loss
    assert meta["best_val_loss"] == pytest.approx(history["val_loss"][best])


# ------------------------------------------------------------------------ binary class names end to end
def _write_pngs(folder: Path, n: int) -> list[tuple[Path, int]]:
    """PNGs in melanoma/ (label 1, bright square), nevus/ and seborrheic_keratosis/ (label 0)."""
    import cv2

    rng = np.random.default_rng(7)
    files = []
    for i in range(n):
        cls = ("melanoma", "nevus", "seborrheic_keratosis")[i % 3]
        img = rng.integers(0, 90, (40, 40), dtype=np.uint8)
        if cls == "melanoma":
            img[10:26, 10:26] = 240
        path = folder / cls / f"isic_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), img)
        files.append((path, int(cls == "melanoma")))
    return files


@pytest.mark.slow
def test_binary_class_names_reach_metadata_predict_and_report(tmp_path: Path) -> None:
    """Two source classes on label 0 (melanoma-like): the negative class is 'benign' everywhere downstream."""
    from medflow.cli import main
    from medflow.imaging.decode import load_resized
    from tasks import evaluate as evaluate_step

    files = _write_pngs(tmp_path / "raw", 90)
    x = np.stack([load_resized(p, size=32, channels=1) for p, _ in files])
    y = np.array([label for _, label in files])
    splits = ["train", "train", "train", "val", "test"] * 18
    images, split = _write_dataset(tmp_path / "data", x, y, splits)
    cfg = parse_config({"dataset": {"name": "skin", "labels": {"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0},
                                    "class_names": ["benign", "melanoma"], "channels": 1},
                        "resize": {"size": 32},
                        "train": {"epochs": 4, "batch_size": 16, "learning_rate": 0.003, "early_stopping_patience": 0,
                                  "reduce_lr_patience": 0,
                                  "augment": {"rotation_deg": 0, "zoom": 0, "translate": 0, "brightness": 0,
                                              "contrast": 0}},
                        "evaluate": {"bootstrap": 1000, "gradcam_examples": 1}})
    model_dir = tmp_path / "model"
    step.run(cfg, images=images, split=split, model_dir=model_dir, live_dir=tmp_path / "live")
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["class_names"] == {"0": "benign", "1": "melanoma"}
    assert meta["labels"] == {"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0}  # the source classes stay

    evaluate_step.run(cfg, model=model_dir, images=images, split=split, out=tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    actual = re.findall(r"<figcaption>[^<]*actual (\w+) - img", page)
    assert actual and set(actual) <= {"benign", "melanoma"} and "benign" in actual
    card = (tmp_path / "report" / "model_card.md").read_text()
    assert "probability of **melanoma** (label 1) vs benign (label 0)" in card
    assert "benign (0): nevus, seborrheic_keratosis" in card
    assert "selected on `val_loss` = " in card and "weighted by the training class weights" in card

    out = tmp_path / "predictions.csv"
    assert main(["predict", str(tmp_path / "raw"), "--model", str(model_dir), "--out", str(out),
                 "--no-progress"]) == 0
    preds = pd.read_csv(out)
    assert len(preds) == 90 and set(preds["predicted"]) == {0, 1}
    assert (preds["class_name"] == preds["predicted"].map({0: "benign", 1: "melanoma"})).all()


def test_multi_worker_loop_weighs_the_val_loss_as_fit_does(tmp_path: Path) -> None:
    """The custom tf.distribute loop's val_loss equals Keras' on the class-weighted val batches."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the custom loop is TensorFlow's")
    import tensorflow as tf

    from medflow.training import inputs
    from medflow.training.tf_loop import DistributedLoop

    images, split, *_ = _imbalanced(tmp_path)
    data = inputs.load_split_data(images, split)
    weights = train_mod.class_weights(*data.class_counts("train"))
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((32, 32, 1), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=train_mod.make_metrics())
    val = inputs.batches(data, "val", batch_size=8, shuffle=False, seed=0, backend="tensorflow")
    weighted = inputs.batches(data, "val", batch_size=8, shuffle=False, seed=0, backend="tensorflow",
                              class_weight=weights)
    ours = DistributedLoop(model, tf.distribute.get_strategy(), 8, weights)._evaluate(val)
    keras_logs = model.evaluate(weighted, verbose=0, return_dict=True)
    assert ours["val_loss"] == pytest.approx(keras_logs["loss"], rel=1e-5)
    assert ours["val_auc"] == pytest.approx(keras_logs["auc"], abs=0.02)  # Keras' AUC is binned

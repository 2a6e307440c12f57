"""Grouped k-fold cross-validation (the crossval stage): folds of whole patients, pooled out-of-fold figures,
finished folds kept, and the off switch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import write_split_csv
from sklearn.metrics import roc_auc_score

from medflow.config import Config, ConfigError, parse_config
from medflow.errors import StepError
from medflow.evaluation import crossval
from medflow.imaging.store import save_array
from medflow.io import read_csv
from tasks import crossval as step


def _cfg(folds: int = 3, **train: object) -> Config:
    base = {"model": "medflow_cnn", "epochs": 2, "batch_size": 8, "early_stopping_patience": 0,
            "reduce_lr_patience": 0, "select_on": "val_auc"}
    base.update(train)
    return parse_config({"dataset": {"name": "t", "labels": {"NEG": 0, "POS": 1}, "channels": 1},
                         "resize": {"size": 32}, "train": base, "crossval": {"folds": folds},
                         "evaluate": {"bootstrap_by": "patient", "bootstrap": 1000}})


def _groups(n_groups: int, per_group: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and patient ids: ``n_groups`` patients of ``per_group`` images, a patient's images of one class,
    patients of both classes interleaved and their images scattered over the table."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_groups)], per_group)
    labels = np.repeat(np.arange(n_groups) % 2, per_group).astype(np.int8)
    order = rng.permutation(len(groups))
    return labels[order], groups[order]


def test_folds_keep_patients_whole_and_hold_both_classes() -> None:
    labels, groups = _groups(20, 3)
    fold = crossval.assign_folds(labels, groups, 5, seed=7)
    assert set(fold) == set(range(5))
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1, g  # a patient's images share one fold
    for i in range(5):
        assert set(labels[fold == i]) == {0, 1}  # every fold tests and selects on both classes
        assert len(np.unique(groups[fold == i])) == 4  # 20 patients, 4 a fold: stratified, not by chance
    assert (crossval.assign_folds(labels, groups, 5, seed=7) == fold).all()  # seeded
    assert (crossval.assign_folds(labels, groups, 5, seed=8) != fold).any()


def test_each_image_is_tested_once_and_selects_once() -> None:
    labels, groups = _groups(12, 2)
    fold = crossval.assign_folds(labels, groups, 4, seed=0)
    roles = [crossval.fold_roles(fold, 4, i) for i in range(4)]
    for name, times in (("test", 1), ("val", 1), ("train", 2)):
        assert (sum(r[name].astype(int) for r in roles) == times).all(), name
    for r in roles:
        assert not (r["train"] & r["test"]).any() and not (r["train"] & r["val"]).any()


def test_too_few_patients_for_the_folds_names_the_param() -> None:
    labels, groups = _groups(8, 2)  # 4 patients a class
    with pytest.raises(StepError, match=r"crossval\.folds: 5 folds need at least 5 patients/groups of label 0; "
                                        r"the split table has 4"):
        crossval.assign_folds(labels, groups, 5, seed=0)


@pytest.mark.parametrize("folds", [1, 2, -1, 21])
def test_folds_are_off_or_at_least_three(folds: int) -> None:
    with pytest.raises(ConfigError, match="crossval.folds"):
        _cfg(folds)


def _dataset(folder: Path, n_groups: int = 18, per_group: int = 2) -> tuple[Path, Path]:
    """A learnable image store (positives carry a bright square) and its split table, patients of 2 images."""
    labels, groups = _groups(n_groups, per_group)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, (len(labels), 32, 32, 1), dtype=np.uint8)
    x[labels == 1, 8:16, 8:16] = 250
    folder.mkdir(parents=True)
    images = save_array(folder / "images", x)
    split = write_split_csv(folder / "split.csv", paths=[f"img{i}.png" for i in range(len(labels))],
                            labels=labels.tolist(), splits=["train"] * len(labels), groups=groups.tolist())
    return images, split


@pytest.mark.slow
def test_out_of_fold_scores_pooled_kept_and_switched_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, split = _dataset(tmp_path / "data")
    out, cache = tmp_path / "report", tmp_path / "cache"
    cfg = _cfg(3)
    headline = step.run(cfg, images=images, split=split, out=out, cache=cache)

    predictions = read_csv(out / crossval.PREDICTIONS_FILE)
    table = read_csv(split)
    assert predictions["path"].tolist() == table["path"].tolist()  # every image once, in table order
    assert predictions.groupby("group")["fold"].nunique().max() == 1  # scored by a model that never saw its patient
    assert set(predictions["fold"]) == {1, 2, 3}
    metrics = json.loads((out / crossval.METRICS_FILE).read_text())
    assert metrics == json.loads(json.dumps(headline))
    assert metrics["folds"] == 3 and metrics["images"] == 36 and metrics["groups"] == 18
    # the pooled AUC is the AUC of the out-of-fold probabilities written, and the verdict follows its CI
    auc = roc_auc_score(predictions["label"], predictions["probability"])
    assert metrics["roc_auc"]["value"] == pytest.approx(auc, abs=1e-6)
    assert metrics["roc_auc"]["low"] <= auc <= metrics["roc_auc"]["high"]
    assert metrics["at_chance"] == (not metrics["roc_auc"]["low"] > 0.5)
    decided = predictions["probability"] >= predictions["threshold"]
    assert (decided.astype(int) == predictions["predicted"]).all()
    positives = predictions["label"] == 1
    assert metrics["sensitivity"]["value"] == pytest.approx(decided[positives].mean(), abs=1e-6)
    assert metrics["specificity"]["value"] == pytest.approx((~decided[~positives]).mean(), abs=1e-6)
    per_fold = {r["fold"]: r for r in metrics["per_fold"]}
    for i, rows in predictions.groupby("fold"):
        assert rows["threshold"].nunique() == 1  # one threshold a fold, chosen on its val fold
        assert per_fold[i]["n"]["test"] == len(rows) and per_fold[i]["val_fold"] == i % 3 + 1
        if rows["label"].nunique() == 2:
            assert per_fold[i]["test_auc"] == pytest.approx(roc_auc_score(rows["label"], rows["probability"]),
                                                            abs=1e-6)
    summary = (out / crossval.SUMMARY_FILE).read_text()
    assert crossval.verdict_line(metrics) in summary and summary.count("\n| ") >= 3 + 5
    assert sorted(p.name for p in cache.iterdir()) == ["fold-1", "fold-2", "fold-3"]
    assert not list(cache.glob("fold-*/checkpoints/*"))  # a finished fold's checkpoints are cleared

    # the same data and params: every fold is kept, nothing is trained again, the outputs are the same bytes
    scores = {p: p.read_bytes() for p in cache.glob("fold-*/scores.json")}
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    caplog.set_level(logging.INFO)
    step.run(cfg, images=images, split=split, out=out, cache=cache)
    assert caplog.text.count("kept from") == 3 and "train: medflow_cnn on" not in caplog.text
    assert {p: p.read_bytes() for p in cache.glob("fold-*/scores.json")} == scores
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written

    # other train params: each fold is trained again
    caplog.clear()
    step.run(_cfg(3, epochs=1), images=images, split=split, out=out, cache=cache)
    assert "kept from" not in caplog.text and caplog.text.count("train: medflow_cnn on") == 3
    assert all(r["epochs_run"] == 1 for r in json.loads((out / crossval.METRICS_FILE).read_text())["per_fold"])

    # off: outputs that say so, and no folds left behind
    assert step.run(_cfg(0), images=images, split=split, out=out, cache=cache) == {"folds": 0, "run": False}
    assert json.loads((out / crossval.METRICS_FILE).read_text()) == {"folds": 0, "run": False}
    assert "Not run" in (out / crossval.SUMMARY_FILE).read_text() and list(cache.iterdir()) == []
    assert read_csv(out / crossval.PREDICTIONS_FILE).empty

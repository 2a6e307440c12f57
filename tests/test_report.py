"""The report files from synthetic scores (no model): fast checks of what tests/test_evaluate.py covers end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medflow.config import EvaluateConfig
from medflow.evaluation import assess as evaluate
from medflow.evaluation import report
from medflow.evaluation.results import Evaluation, Scores


def _evaluation(tmp_path: Path, n: int = 200, by: str = "image") -> Evaluation:
    rng = np.random.default_rng(0)
    y = (np.arange(n) % 3 == 0).astype(np.int8)
    p = np.clip(0.5 * y + rng.normal(0.3, 0.2, n), 0, 1)
    folder = tmp_path / "model"
    folder.mkdir()
    pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.7, 0.5, 0.4], "val_loss": [0.72, 0.6, 0.55],
                  "auc": [0.6, 0.8, 0.9], "val_auc": [0.6, 0.75, 0.85]}).to_csv(folder / "history.csv", index=False)
    meta = {"input_shape": [32, 32, 1], "class_names": {"0": "NORMAL", "1": "PNEUMONIA"}, "best_epoch": 3,
            "preprocessing": {"size": 32, "channels": 1}, "params": {"train": {"model": "medflow_cnn"}}}
    trained = evaluate.TrainedModel(folder, None, meta)  # type: ignore[arg-type]  # no Grad-CAM: no model needed
    scores = Scores(y, p, np.array([f"p{i // 2}" for i in range(n)]), np.array([f"img{i}.png" for i in
                                                                                        range(n)]))
    ev = EvaluateConfig(bootstrap=1000, gradcam_examples=0, bootstrap_by=by)
    threshold = {"threshold": 0.45, "rule": "fixed", "chosen_on": "val", "how": "fixed in params"}
    out = evaluate.assess("toy", "toy", "test split", trained, scores, threshold, ev, np.zeros((n, 32, 32, 1)))
    out.data = {"counts": pd.DataFrame([{"split": "test", "images": n}]), "group_rule": "filename",
                "rejects": pd.DataFrame([{"path": "a|b.png", "reason": "truncated", "detail": "<cut>"}]),
                "validation": {"success": True, "expectations": 32, "failed": [], "path": "v.json"},
                "card": {"title": "Toy", "intended_use": "Tests.", "limitations": ["Synthetic."]}}
    return out


@pytest.mark.parametrize("by", ["image", "patient"])
def test_write_all(tmp_path: Path, by: str) -> None:
    ev = _evaluation(tmp_path, by=by)
    headline = report.write_all(ev, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["bootstrap"]["by"] == by and m["threshold"] == 0.45
    assert headline["roc_auc"] == m["test"]["roc_auc"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<img") == 6  # ROC, PR, reliability, thresholds, confusion, training curves
    assert "&lt;cut&gt;" in page and "<cut>" not in page  # file names and details are escaped
    assert "<h3>Model card: toy / medflow_cnn</h3>" in page and "Synthetic." in page
    card = (tmp_path / "out" / "model_card.md").read_text()
    assert f"resampled by {by}" in card and f"resamples by {by}" in card
    preds = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(preds) == 200 and set(preds["predicted"]) <= {0, 1}
    roc = pd.read_csv(tmp_path / "out" / "plots" / "roc.csv")
    assert roc["fpr"].iloc[0] == 0 and roc["tpr"].iloc[-1] == 1


def test_fmt_handles_missing_values() -> None:
    assert report.fmt(float("nan")) == "n/a" and report.fmt(None) == "n/a" and report.fmt(0.12345) == "0.123"

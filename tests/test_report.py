"""The report files from synthetic scores (no model): fast checks of what tests/test_evaluate.py covers end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medflow.config import EvaluateConfig
from medflow.evaluation import assess as evaluate
from medflow.evaluation import report
from medflow.evaluation.results import Evaluation, Scores


def _evaluation(tmp_path: Path, n: int = 200, by: str = "image", confidence: float = 0.95,
                class_names: tuple[str, str] = ("NORMAL", "PNEUMONIA")) -> Evaluation:
    rng = np.random.default_rng(0)
    y = (np.arange(n) % 3 == 0).astype(np.int8)
    p = np.clip(0.5 * y + rng.normal(0.3, 0.2, n), 0, 1)
    folder = tmp_path / "model"
    folder.mkdir()
    pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.7, 0.5, 0.4], "val_loss": [0.72, 0.6, 0.55],
                  "auc": [0.6, 0.8, 0.9], "val_auc": [0.6, 0.75, 0.85]}).to_csv(folder / "history.csv", index=False)
    meta = {"input_shape": [32, 32, 1], "class_names": {"0": class_names[0], "1": class_names[1]}, "best_epoch": 3,
            "preprocessing": {"size": 32, "channels": 1}, "params": {"train": {"model": "medflow_cnn"}}}
    trained = evaluate.TrainedModel(folder, None, meta)  # type: ignore[arg-type]  # no Grad-CAM: no model needed
    scores = Scores(y, p, np.array([f"p{i // 2}" for i in range(n)]), np.array([f"img{i}.png" for i in
                                                                                        range(n)]))
    ev = EvaluateConfig(bootstrap=1000, gradcam_examples=0, bootstrap_by=by, confidence=confidence)
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


def _written(ev: Evaluation, out: Path) -> dict[str, str]:
    report.write_all(ev, out)
    return {name: (out / name).read_text() for name in (report.REPORT, report.SUMMARY, report.MODEL_CARD)}


def test_interval_labels_follow_the_confidence(tmp_path: Path) -> None:
    files = _written(_evaluation(tmp_path, confidence=0.9), tmp_path / "out")
    for name, text in files.items():
        assert "90% CI" in text, name
        assert "95%" not in text, name
    assert files[report.REPORT].count("90% CI") >= 3 + 2  # three headline cards, the metrics table's columns
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["bootstrap"]["confidence"] == 0.9
    assert [report.ci_level(c) for c in (0.95, 0.9, 0.975, 0.8)] == ["95%", "90%", "97.5%", "80%"]


def test_hostile_names_and_paths_are_escaped(tmp_path: Path) -> None:
    hostile = "<script>alert(1)</script>"
    ev = _evaluation(tmp_path, class_names=("NORMAL", hostile))
    ev.title = f"toy {hostile}"
    ev.data["rejects"] = pd.DataFrame([{"path": f"raw/{hostile}.png", "reason": "truncated", "detail": hostile}])
    ev.data["validation"]["failed"] = [hostile]
    ev.gradcams = [{"outcome": "TP", "path": '/x/<img src="x" onerror="alert(1)">.png', "label": 1,
                    "probability": 0.9, "image": np.zeros((8, 8, 3), dtype=np.uint8)}]
    page = _written(ev, tmp_path / "out")[report.REPORT]
    assert "<script" not in page and "onerror=\"" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("&lt;script&gt;") >= 5  # title (twice), model card, rejects table, failed expectation
    assert "actual &lt;script&gt;" in page  # the Grad-CAM caption names the class, escaped
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert page.count("<img") == 7  # six figures and the one Grad-CAM overlay, nothing injected


def test_the_template_ships_inside_the_package() -> None:
    from importlib.resources import files

    folder = files("medflow.evaluation") / "templates"
    assert (folder / "report.html.j2").is_file() and (folder / "report.css").is_file()

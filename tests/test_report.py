"""The report files from synthetic scores (no model): fast checks of what tests/test_evaluate.py covers end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from medflow.config import EvaluateConfig
from medflow.evaluation import assess as evaluate
from medflow.evaluation import chance, pseudonym, report
from medflow.evaluation.results import Evaluation, Scores
from medflow.training.selection import cross_entropy


def _evaluation(tmp_path: Path, n: int = 200, by: str = "image", confidence: float = 0.95,
                class_names: tuple[str, str] = ("NORMAL", "PNEUMONIA"), chance: dict | None = None) -> Evaluation:
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
    if chance is not None:
        threshold["chance"] = chance
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
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert details["bootstrap"]["by"] == by and m["threshold"] == details["threshold"] == 0.45
    assert headline["roc_auc"] == m["test"]["roc_auc"] == details["test"]["roc_auc"]
    assert set(m["test"]) == {"roc_auc", "sensitivity", "specificity", "ece"}  # dvc exp show: a few columns
    assert m["test"]["ece"] == details["test"]["ece"]["value"] and set(details["test"]) == set(report.METRICS)
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
    m = json.loads((tmp_path / "out" / "details.json").read_text())
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


# --- the chance guard ------------------------------------------------------------------------------------

EV = EvaluateConfig(bootstrap=1000)


def _val(n: int = 120, prevalence: float = 0.25, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Val labels and the scores of a model that learnt something (AUC about 0.9, calibrated)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(np.int8)
    logit = rng.normal(0, 1, n) + 1.8 * y + np.log(prevalence / (1 - prevalence)) - 0.8
    return y, 1 / (1 + np.exp(-logit))


def test_a_model_that_outputs_the_prevalence_is_at_chance() -> None:
    y, _ = _val()
    verdict = chance.verdict(y, np.full(len(y), 30 / 120), (90, 30), weighted=False, ev=EV)
    assert verdict.at_chance and len(verdict.reasons) == 2  # no better loss, and AUC 0.5 exactly
    assert verdict.val_auc == 0.5 and verdict.val_auc_low == verdict.val_auc_high == 0.5
    assert verdict.train_prevalence == 0.25
    assert verdict.val_loss == pytest.approx(verdict.baseline_loss)
    assert verdict.summary().startswith("the model does not beat chance on val: val loss")
    for constant in (0.25, 0.5):  # trained class-weighted: beats the prevalence in neither weighting
        weighted = chance.verdict(y, np.full(len(y), constant), (90, 30), weighted=True, ev=EV)
        assert weighted.at_chance and len(weighted.reasons) == 2, constant
        # predicting 0.5, as Keras' val_loss weighs it (mean of w * loss): ln 2 times the mean val weight
        assert weighted.baseline_loss_weighted == pytest.approx(np.log(2) * _mean_weight(y, (90, 30)))


def _mean_weight(y: np.ndarray, train_counts: tuple[int, int]) -> float:
    """Mean training class weight n / (2 n_c) over the val labels ``y``."""
    neg, pos = train_counts
    return float(np.mean(np.where(y == 1, (neg + pos) / (2 * pos), (neg + pos) / (2 * neg))))


def test_a_learnt_model_beats_chance() -> None:
    y, p = _val()
    verdict = chance.verdict(y, p, (90, 30), weighted=False, ev=EV)
    assert not verdict.at_chance and verdict.reasons == () and verdict.val_auc_low > 0.7
    assert verdict.val_loss < verdict.baseline_loss
    assert verdict.as_dict()["summary"].startswith("the model beats chance on val")
    assert chance.verdict(y, 1 - p, (90, 30), weighted=False, ev=EV).at_chance  # ranks backwards: AUC < 0.5


def test_a_class_weighted_model_is_judged_by_its_weighted_loss_too() -> None:
    """Class weights pull probabilities towards 0.5: the unweighted loss then loses to the prevalence although
    the model ranks well; the loss it was trained on says it beats a constant."""
    rng = np.random.default_rng(2)
    y = (rng.random(2000) < 0.2).astype(np.int8)
    score = rng.normal(0, 1, len(y)) + 1.2 * y  # AUC about 0.8
    pulled = 1 / (1 + np.exp(-(1.2 * score - 0.72)))  # the posterior at a prior of 0.5, as class weights train
    assert cross_entropy(y, pulled) > cross_entropy(y, np.full(len(y), 0.2))
    verdict = chance.verdict(y, pulled, (1600, 400), weighted=True, ev=EV)
    assert not verdict.at_chance and verdict.weighted and verdict.val_loss > verdict.baseline_loss
    baseline = np.log(2) * _mean_weight(y, (1600, 400))
    assert verdict.val_loss_weighted < verdict.baseline_loss_weighted == pytest.approx(baseline)
    unweighted = chance.verdict(y, pulled, (1600, 400), weighted=False, ev=EV)  # had it been trained unweighted
    assert unweighted.at_chance and unweighted.reasons[0].startswith("val loss") and len(unweighted.reasons) == 1
    calibrated = 1 / (1 + np.exp(-(1.2 * score - 0.72 + np.log(0.25))))  # the same ranking at the prevalence
    assert not chance.verdict(y, calibrated, (1600, 400), weighted=True, ev=EV).at_chance


def test_a_model_at_chance_is_said_so_at_the_top_of_every_file(tmp_path: Path) -> None:
    y, _ = _val()
    verdict = chance.verdict(y, np.full(len(y), 0.25), (90, 30), weighted=False, ev=EV).as_dict()
    ev = _evaluation(tmp_path, chance=verdict)
    files = _written(ev, tmp_path / "out")
    page = files[report.REPORT]
    banner = page.index('<div class="banner" role="alert">AT CHANCE: the model does not beat chance on val')
    assert banner < page.index('<div class="meta">')  # first thing under the title
    for name in (report.SUMMARY, report.MODEL_CARD):
        assert files[name].splitlines()[2].startswith("> **AT CHANCE: the model does not beat chance on val"), name
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["at_chance"] is True
    m = json.loads((tmp_path / "out" / "details.json").read_text())
    assert m["chance"]["at_chance"] is True and m["chance"]["val_auc"] == {"value": 0.5, "low": 0.5, "high": 0.5}
    assert m["chance"]["val_loss"] == pytest.approx(m["chance"]["baseline_loss"]) and m["chance"]["n_val"] == 120
    assert all(not isinstance(v, str) for v in m["chance"].values())  # dvc metrics show: numbers and flags


def test_a_learnt_model_gets_no_banner(tmp_path: Path) -> None:
    y, p = _val()
    ev = _evaluation(tmp_path, chance=chance.verdict(y, p, (90, 30), weighted=False, ev=EV).as_dict())
    files = _written(ev, tmp_path / "out")
    assert 'class="banner"' not in files[report.REPORT] and "AT CHANCE" not in "".join(files.values())
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["at_chance"] is False


def test_a_flagged_shortcut_check_is_a_banner_too(tmp_path: Path) -> None:
    ev = _evaluation(tmp_path)
    ev.data["validation"]["shortcut"] = {"flagged": True, "message": "metadata alone predicts the label: AUC 0.907"}
    files = _written(ev, tmp_path / "out")
    assert '<div class="banner" role="alert">SHORTCUT IN THE DATA: metadata alone predicts' in files[report.REPORT]
    assert "Shortcut check (file metadata alone against the label)" in files[report.REPORT]
    assert "SHORTCUT IN THE DATA" in files[report.SUMMARY] and "AT CHANCE" not in files[report.REPORT]


def test_pseudonymize_hashes_file_names_and_patients_stably_per_project(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the project: its key is made in .dvc/tmp on first use
    ev = _evaluation(tmp_path)
    ev.settings = {**ev.settings, "pseudonymize": True}
    ev.data["rejects"] = pd.DataFrame([{"path": "data/inbox/MRN123456.png", "reason": "truncated",
                                        "detail": "MRN123456.png: image file is truncated"}])
    ev.gradcams = [{"outcome": "TP", "path": "data/MRN777.png", "label": 1, "probability": 0.9,
                    "image": np.zeros((8, 8, 3), dtype=np.uint8)}]
    files = _written(ev, tmp_path / "out")
    files["predictions.csv"] = (tmp_path / "out" / "predictions.csv").read_text()
    for name, text in files.items():
        assert not re.search(r"MRN\d|img\d+\.png|\bp\d+\b", text), name
    preds = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert preds["path"].str.fullmatch(r"img-[0-9a-f]{12}\.png").all() and preds["path"].is_unique
    assert preds["patient"].str.fullmatch(r"pt-[0-9a-f]{12}").all() and preds["patient"].nunique() == 100
    key = (tmp_path / pseudonym.KEY_FILE).read_bytes()
    assert pseudonym.pseudonymizer(True, tmp_path).path("img0.png") == preds["path"][0]  # stable across runs
    assert (tmp_path / pseudonym.KEY_FILE).read_bytes() == key
    other, off = tmp_path / "other", tmp_path / "off"
    other.mkdir(), off.mkdir()
    assert pseudonym.pseudonymizer(True, other).path("img0.png") != preds["path"][0]  # another project: unlinkable
    assert pseudonym.pseudonymizer(False, off).patient("p1") == "p1" and not (off / ".dvc").exists()


def test_label_conflicts_are_named_in_the_data_section() -> None:
    rows = [{"path": "raw/NORMAL/a.png", "reason": "truncated", "detail": "cut"}] * 3
    rows += [{"path": "raw/NORMAL/x.png", "reason": "label_conflict",
              "detail": "same content as raw/PNEUMONIA/y.png labelled PNEUMONIA"}]
    ev = SimpleNamespace(data={"rejects": pd.DataFrame(rows)})  # the data section reads only ev.data
    text = "\n".join(report._data_markdown(ev))  # type: ignore[arg-type]  # in summary.md and model_card.md
    assert "Quarantined files (listed, never deleted): 4 (1 label_conflict, 3 truncated)." in text
    assert "Label conflicts: 1 files" in text
    assert "- `raw/NORMAL/x.png`: same content as raw/PNEUMONIA/y.png labelled PNEUMONIA" in text
    shown, _ = report._reject_summary(ev)  # type: ignore[arg-type]  # the HTML table's rows
    assert shown is not None and list(shown["reason"]) == ["label_conflict", *["truncated"] * 3]
    from medflow.imaging import quality  # the report keeps the reason's name without the decoder imports

    assert report._LABEL_CONFLICT == quality.LABEL_CONFLICT

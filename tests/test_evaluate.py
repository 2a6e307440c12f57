"""The evaluate stage, the report, Grad-CAM and `medflow predict` / `medflow evaluate` on a small trained model.

The fixture writes real PNG files (positives carry a bright square), preprocesses them with the resize
step's decoder into an image store, splits them, and trains medflow_cnn for a few epochs with the real trainer.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import write_split_csv
from sklearn.metrics import roc_auc_score

from medflow import inference as predict
from medflow.cli import main
from medflow.config import Config, parse_config
from medflow.errors import StepError
from medflow.evaluation import assess as evaluate
from medflow.evaluation import gradcam
from medflow.evaluation.metrics import METRICS
from medflow.imaging.decode import load_resized
from medflow.imaging.store import save_array
from medflow.io import ImageStore, read_json
from tasks import train as train_step

pytestmark = pytest.mark.slow  # trains a small model once (about 20 s), then reuses it

SIZE = 32
SQUARE = slice(8, 20)  # where positives are bright (in model pixels)


@dataclass(frozen=True)
class Trained:
    cfg: Config
    root: Path
    files: list[Path]
    labels: np.ndarray
    images: Path
    split: Path
    model: Path


def _params(tmp: Path) -> dict[str, object]:
    return {"dataset": {"name": "toy", "labels": {"NEG": 0, "POS": 1}, "channels": 1, "group_rule": "filename",
                        "card": {"title": "Toy squares", "limitations": ["Synthetic images."]}},
            "resize": {"size": SIZE},
            "train": {"model": "medflow_cnn", "epochs": 6, "batch_size": 16, "early_stopping_patience": 0,
                      "reduce_lr_patience": 0, "learning_rate": 0.003,
                      "augment": {"rotation_deg": 0, "zoom": 0, "translate": 0, "brightness": 0, "contrast": 0}},
            "evaluate": {"bootstrap": 1000, "gradcam_examples": 1}}


def write_images(folder: Path, n: int, seed: int) -> tuple[list[Path], np.ndarray]:
    """``n`` 48-px PNGs in NEG/ and POS/ class folders; positives have a bright square."""
    rng = np.random.default_rng(seed)
    files, labels = [], []
    for i in range(n):
        label = i % 2
        img = rng.integers(0, 90, (48, 48), dtype=np.uint8)
        if label:
            img[12:30, 12:30] = 240
        path = folder / ("POS" if label else "NEG") / f"s{seed}_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), img)
        files.append(path)
        labels.append(label)
    return files, np.array(labels)


def _dataset(root: Path, files: list[Path], labels: np.ndarray) -> tuple[Path, Path]:
    images = root / "images"
    save_array(images, np.stack([load_resized(f, size=SIZE, channels=1) for f in files]))
    n = len(files)
    splits = np.array(["train"] * n, dtype=object)
    splits[np.arange(n) % 5 == 3] = "val"
    splits[np.arange(n) % 5 == 4] = "test"
    split = write_split_csv(root / "split.csv", paths=[str(f) for f in files],
                            labels=[int(v) for v in labels], splits=list(splits))
    return images, split


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("evaluate")
    cfg = parse_config(_params(root))
    files, labels = write_images(root / "raw", 160, seed=1)
    images, split = _dataset(root, files, labels)
    train_step.run(cfg, images=images, split=split, model_dir=root / "model", live_dir=root / "live")
    return Trained(cfg, root, files, labels, images, split, root / "model")


@pytest.fixture(scope="module")
def stage(trained: Trained) -> Path:
    """Run the evaluate stage once, as dvc.yaml does (the CLI loads tasks/evaluate.py); return its report folder."""
    import yaml

    rejects = trained.root / "rejects.csv"
    rejects.write_text("path,reason,detail,sha256,bytes\nraw/POS/bad.png,truncated,image file is truncated,,10\n")
    params = trained.root / "params.yaml"
    params.write_text(yaml.safe_dump(_params(trained.root)))
    out = trained.root / "report"
    assert main(["evaluate", "--params", str(params), "--model", str(trained.model), "--images",
                 str(trained.images), "--split", str(trained.split), "--rejects", str(rejects),
                 "--validation", str(trained.root / "absent.json"), "--out", str(out)]) == 0
    return out


# --- the evaluate stage --------------------------------------------------------------------------------


def test_stage_writes_every_output(stage: Path, trained: Trained) -> None:
    for name in ("report.html", "summary.md", "model_card.md", "metrics.json", "predictions.csv",
                 "plots/roc.csv", "plots/pr.csv", "plots/calibration.csv", "plots/thresholds.csv"):
        assert (stage / name).is_file(), name
    assert not [p for p in stage.rglob(".*tmp*")], "temporary files left behind"
    threshold = read_json(trained.model / "threshold.json")
    assert threshold["rule"] == "target_sensitivity" and threshold["chosen_on"] == "val"


def test_threshold_is_chosen_on_val(stage: Path, trained: Trained) -> None:
    threshold = read_json(trained.model / "threshold.json")["threshold"]
    val = evaluate.score_split(trained.model, trained.images, trained.split, "val")
    sens = ((val.p >= threshold) & (val.y == 1)).sum() / (val.y == 1).sum()
    assert sens >= 0.95
    # the highest such threshold: one step up loses sensitivity
    above = np.sort(val.p[val.p > threshold])
    if len(above):
        assert ((val.p >= above[0]) & (val.y == 1)).sum() / (val.y == 1).sum() < 0.95


def test_metrics_json_matches_the_predictions(stage: Path, trained: Trained) -> None:
    m = read_json(stage / "details.json")
    assert read_json(stage / "metrics.json")["test"]["roc_auc"] == m["test"]["roc_auc"]
    preds = pd.read_csv(stage / "predictions.csv")
    n_test = int((pd.read_csv(trained.split)["split"] == "test").sum())
    assert len(preds) == m["n"] == n_test
    assert set(m["test"]) == set(METRICS)
    for name, iv in m["test"].items():
        if iv["value"] is not None:
            assert iv["low"] <= iv["value"] <= iv["high"], name
    assert m["test"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(preds["label"], preds["probability"]),
                                                          abs=1e-5)
    assert m["test"]["roc_auc"]["value"] > 0.9, "the toy task is learnable"
    c = m["confusion"]
    assert c["tp"] == int(((preds["predicted"] == 1) & (preds["label"] == 1)).sum())
    assert (preds["predicted"] == (preds["probability"] >= m["threshold"]).astype(int)).all()


def test_report_is_self_contained(stage: Path) -> None:
    page = (stage / "report.html").read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs[:5]
    assert "<script" not in page and "@import" not in page and "url(" not in page
    preds = pd.read_csv(stage / "predictions.csv")
    outcomes = {(int(p), int(y)) for p, y in zip(preds["predicted"], preds["label"], strict=True)}
    assert page.count("<img") == 6 + len(outcomes)  # figures + one Grad-CAM per outcome that occurs
    for heading in ("Operating threshold", "Metrics", "Grad-CAM", "Data", "Model card", "Quarantined files (1)"):
        assert heading in page
    card = (stage / "model_card.md").read_text()
    for section in ("## Intended use", "## Data", "## Operating threshold", "## Limitations", "Synthetic images."):
        assert section in card
    assert "95% CI" in (stage / "summary.md").read_text()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def test_report_renders_in_headless_chromium(stage: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (the README's test command installs it)")
        pytest.skip("chromium is not installed")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--proxy-server=127.0.0.1:9", "--hide-scrollbars", "--window-size=1200,2600",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    (stage / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (2600, 1200)
    # matplotlib's first colour (#1f77b4, BGR 180,119,31) draws the ROC/PR curves: rendered figures show it
    blue = np.all(np.abs(img.astype(int) - [180, 119, 31]) < 30, axis=-1).sum()
    assert blue > 2000, f"only {blue} curve pixels: the embedded figures did not render"
    assert (img < 200).any(axis=-1).mean() > 0.02, "the page is almost blank"


# --- the chance guard ----------------------------------------------------------------------------------


def test_the_learnt_model_beats_chance(stage: Path, trained: Trained) -> None:
    verdict = read_json(trained.model / "threshold.json")["chance"]
    assert not verdict["at_chance"] and verdict["val_loss"] < verdict["baseline_loss"] and verdict["val_auc_low"] > 0.5
    assert verdict["weighted"] is True  # the default trains class-weighted, and the losses follow it
    assert read_json(stage / "metrics.json")["at_chance"] is False
    assert "AT CHANCE" not in (stage / "report.html").read_text() + (stage / "model_card.md").read_text()


def test_a_model_that_outputs_the_prevalence_is_flagged(trained: Trained, tmp_path: Path) -> None:
    """A model folder like the train stage's whose network outputs the training prevalence for every image."""
    import keras

    folder = tmp_path / "constant"
    shutil.copytree(trained.model, folder, ignore=shutil.ignore_patterns("checkpoints", "threshold.json"))
    prevalence = float(pd.read_csv(trained.split).query("split == 'train'")["label"].mean())
    inputs = keras.Input(tuple(read_json(folder / "metadata.json")["input_shape"]))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([np.zeros((1, 1), np.float32), np.array([np.log(prevalence / (1 - prevalence))],
                                                                          np.float32)])
    model.save(folder / "model.keras")
    out = tmp_path / "report"
    assert main(["evaluate", "--params", str(_params_file(tmp_path)), "--model", str(folder), "--images",
                 str(trained.images), "--split", str(trained.split), "--out", str(out)]) == 0
    assert read_json(out / "metrics.json")["at_chance"] is True
    m = read_json(out / "details.json")
    assert m["chance"]["at_chance"] is True and m["chance"]["val_auc"]["value"] == 0.5
    assert m["chance"]["train_prevalence"] == pytest.approx(prevalence)
    stored = read_json(folder / "threshold.json")["chance"]
    assert stored["at_chance"] and len(stored["reasons"]) == 2
    page = (out / "report.html").read_text()
    assert '<div class="banner" role="alert">AT CHANCE: the model does not beat chance on val' in page
    for name in ("summary.md", "model_card.md"):
        assert "> **AT CHANCE: the model does not beat chance on val" in (out / name).read_text(), name


def _params_file(folder: Path) -> Path:
    import yaml

    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump(_params(folder)))
    return params


# --- Grad-CAM ------------------------------------------------------------------------------------------


def test_gradcam_looks_at_the_square(trained: Trained) -> None:
    model = evaluate.load_trained(trained.model).model
    x = ImageStore(trained.images)[:][trained.labels == 1][:8]
    cams = gradcam.gradcam(model, x)
    assert cams.shape == (8, SIZE, SIZE) and cams.min() >= 0 and cams.max() <= 1
    inside = cams[:, SQUARE, SQUARE].mean()
    mask = np.ones((SIZE, SIZE), dtype=bool)
    mask[SQUARE, SQUARE] = False
    assert inside > cams[:, mask].mean()


def test_pick_examples_takes_the_most_confident() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.9, 0.6, 0.7, 0.1, 0.2, 0.4])
    picked = evaluate.pick_examples(y, p, 0.5, 1)
    assert picked["TP"].tolist() == [0] and picked["FP"].tolist() == [2]
    assert picked["TN"].tolist() == [3] and picked["FN"].tolist() == [4]


# --- medflow predict ---------------------------------------------------------------------------------


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_folder_with_a_corrupt_file(stage: Path, trained: Trained, tmp_path: Path) -> None:
    folder = tmp_path / "new"
    folder.mkdir()
    test_rows = pd.read_csv(trained.split).query("split == 'test'").head(6)
    for p in test_rows["path"]:
        shutil.copy(p, folder / Path(p).name)
    good = Path(test_rows["path"].iloc[0]).read_bytes()
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(test_rows["path"].iloc[0]))
    (folder / "truncated.jpg").write_bytes(bytes(jpeg)[: len(jpeg) // 2])
    (folder / "notes.jpeg").write_text("not an image")
    assert ok and good
    out = tmp_path / "preds.csv"
    assert main(["predict", str(folder), "--model", str(trained.model), "--out", str(out), "--no-progress"]) == 0
    rows = {Path(r["path"]).name: r for r in _read(out)}
    assert len(rows) == 8
    assert rows["truncated.jpg"]["error"] and rows["truncated.jpg"]["probability"] == ""
    assert rows["notes.jpeg"]["error"]
    # exactly the evaluate stage's scores: same decoder, same model
    stage_preds = pd.read_csv(stage / "predictions.csv").set_index("path")
    threshold = read_json(trained.model / "threshold.json")["threshold"]
    for p in test_rows["path"]:
        row = rows[Path(p).name]
        assert float(row["probability"]) == pytest.approx(stage_preds.loc[p, "probability"], abs=1e-5)
        assert int(row["predicted"]) == int(float(row["probability"]) >= threshold)
        assert row["class_name"] == ("POS" if row["predicted"] == "1" else "NEG")


def test_predict_archives_and_globs(trained: Trained, tmp_path: Path) -> None:
    src = trained.files[:4]
    with zipfile.ZipFile(tmp_path / "batch.zip", "w") as zf:
        for f in src:
            zf.write(f, f"scans/{f.name}")
        zf.writestr("__MACOSX/scans/._x.png", b"junk")
    with tarfile.open(tmp_path / "batch.tar.gz", "w:gz") as tf:
        for f in src:
            tf.add(f, f"scans/{f.name}")
    items = predict.collect([str(tmp_path / "batch.zip"), str(tmp_path / "batch.tar.gz"),
                             str(trained.files[0].parent / "s1_00*.png")])
    names = [i.name for i in items]
    assert len(items) == 4 + 4 + len(list(trained.files[0].parent.glob("s1_00*.png")))
    zipped = predict.shown_name(f"{tmp_path / 'batch.zip'}!scans/{src[0].name}", tmp_path / "batch.zip")
    assert zipped in names and not any(Path(n).is_absolute() for n in names)  # never an absolute path
    rows, _ = predict.predict_items(evaluate.load_trained(trained.model), items, 0.5, batch_size=3,
                                    progress=False)
    by_name = {r["path"]: r["probability"] for r in rows}
    assert not [r for r in rows if r["error"]]
    assert by_name[zipped] == by_name[zipped.replace("batch.zip", "batch.tar.gz")]


def test_predict_errors_name_the_input(stage: Path, trained: Trained, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``stage``: the evaluate stage has stored the threshold, so each error below is about the input."""
    assert main(["predict", str(tmp_path / "nowhere"), "--model", str(trained.model)]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "*.png"), "--model", str(trained.model)]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert main(["predict", str(trained.files[0]), "--model", str(tmp_path)]) == 2
    assert "model.keras: not found" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(trained.model, bare, ignore=shutil.ignore_patterns("threshold.json"))
    assert main(["predict", str(trained.files[0]), "--model", str(bare)]) == 2
    assert "no operating threshold" in capsys.readouterr().err
    assert main(["predict", str(trained.files[0]), "--model", str(bare), "--threshold", "0.5",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ",".join(predict.COLUMNS) and len(out) == 2


# --- medflow evaluate on an external folder -----------------------------------------------------------


def test_evaluate_external_folder_at_the_stored_threshold(stage: Path, trained: Trained, tmp_path: Path) -> None:
    folder = tmp_path / "external"
    write_images(folder, 40, seed=7)
    (folder / "POS" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "ext_report"
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(_params(tmp_path)))
    assert main(["evaluate", "--params", str(params), "--images", str(folder), "--model", str(trained.model),
                 "--out", str(out)]) == 0
    m = read_json(out / "metrics.json")
    assert m["threshold"] == pytest.approx(read_json(trained.model / "threshold.json")["threshold"])
    assert m["n"] == 40 and m["test"]["roc_auc"]["value"] > 0.9
    page = (out / "report.html").read_text()
    assert "broken.png" in page and "external folder" in page


def test_evaluate_needs_a_split_for_an_array(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--images", str(trained.images), "--model", str(trained.model)]) == 2
    assert "needs --split" in capsys.readouterr().err


def test_score_split_checks_the_image_shape(trained: Trained, tmp_path: Path) -> None:
    wrong = tmp_path / "images"
    save_array(wrong, np.zeros((len(trained.files), 16, 16, 1), dtype=np.uint8))
    with pytest.raises(StepError, match="re-run resize"):
        evaluate.score_split(trained.model, wrong, trained.split, "test")


def test_predict_defaults_to_the_champion(stage: Path, trained: Trained, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import yaml

    from medflow.lifecycle import registry

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(_params(tmp_path)))
    latest = tmp_path / "models" / "toy"
    shutil.copytree(trained.model, latest, ignore=shutil.ignore_patterns("checkpoints"))
    registry.promote(latest, registry.register(latest, trained.model))  # champion: the stored threshold
    (latest / "threshold.json").write_text(json.dumps({"threshold": 0.999}))  # the latest model's own
    assert main(["predict", str(trained.files[0]), "--no-progress"]) == 0
    champion_threshold = read_json(trained.model / "threshold.json")["threshold"]
    row = capsys.readouterr().out.splitlines()[1].split(",")
    assert float(row[predict.COLUMNS.index("threshold")]) == pytest.approx(champion_threshold)
    assert main(["predict", str(trained.files[0]), "--model", str(latest), "--no-progress"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split(",")
    assert float(row[predict.COLUMNS.index("threshold")]) == 0.999


# --- external validation in the evaluate stage (evaluate.external) -------------------------------------


def _stage_with_external(trained: Trained, tmp_path: Path, external: list[str]) -> tuple[int, Path]:
    import yaml

    params = _params(tmp_path)
    params["evaluate"] = {**params["evaluate"], "external": external}  # type: ignore[dict-item]
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    model = tmp_path / "model"
    shutil.copytree(trained.model, model, ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "report"
    code = main(["evaluate", "--params", str(tmp_path / "params.yaml"), "--model", str(model), "--images",
                 str(trained.images), "--split", str(trained.split), "--out", str(out)])
    return code, out


def test_the_stage_scores_external_sets_beside_the_test_split(stage: Path, trained: Trained, tmp_path: Path) -> None:
    later = tmp_path / "later_collection"
    write_images(later, 40, seed=7)
    split = pd.read_csv(trained.split)
    for path in split.loc[split["split"] == "train", "path"].head(3):  # 3 images of training patients
        shutil.copy(path, later / Path(path).parent.name / Path(path).name)
    other = tmp_path / "other"
    write_images(other / "hospital_b", 20, seed=8)
    with zipfile.ZipFile(tmp_path / "hospital_b.zip", "w") as zf:
        for f in sorted((other / "hospital_b").rglob("*.png")):
            zf.write(f, f"hospital_b/{f.relative_to(other / 'hospital_b')}")
    code, out = _stage_with_external(trained, tmp_path, [str(later), str(tmp_path / "hospital_b.zip")])
    assert code == 0
    m, details = read_json(out / "metrics.json"), read_json(out / "details.json")
    assert set(m["external"]) == {"later_collection", "hospital_b"}
    # the threshold is the one chosen on val, whatever the external sets are
    assert read_json(tmp_path / "model" / "threshold.json")["threshold"] == pytest.approx(
        read_json(stage / "metrics.json")["threshold"])
    later_m = m["external"]["later_collection"]
    assert later_m["n"] == 43 and later_m["train_patient_images"] == 3
    assert later_m["auc_gap"] == pytest.approx(later_m["roc_auc"]["value"] - m["test"]["roc_auc"]["value"], abs=1e-5)
    assert later_m["unseen_roc_auc"]["value"] is not None and m["external"]["hospital_b"]["train_patient_images"] == 0
    assert [r["name"] for r in details["external"]] == ["later_collection", "hospital_b"]
    for name, n in (("later_collection", 43), ("hospital_b", 20)):
        preds = pd.read_csv(out / "external" / name / "predictions.csv")
        assert len(preds) == n and (out / "external" / name / "report.html").is_file()
        assert m["external"][name]["roc_auc"]["value"] == pytest.approx(
            roc_auc_score(preds["label"], preds["probability"]), abs=1e-5)
    page = (out / "report.html").read_text()
    assert "Internal and external validation" in page and "hospital_b" in page
    assert "3 images (AUC without them" in page
    assert "patients also in training" in (out / "summary.md").read_text()
    assert "3 image(s) of 3 patient(s) who also have training images" in (
        out / "external" / "later_collection" / "summary.md").read_text()
    assert "hospital_b.zip" in (out / "external" / "index.md").read_text()
    assert not list(tmp_path.glob("medflow-external-*")), "the archive's temporary folder is removed"


def test_external_sets_are_checked_before_anything_is_written(trained: Trained, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _stage_with_external(trained, tmp_path, [str(tmp_path / "nowhere")])
    assert code == 2 and "evaluate.external: " in (err := capsys.readouterr().err) and "nowhere" in err
    assert not out.exists()
    stored = tmp_path / "model" / "threshold.json"
    assert stored.exists() == (trained.model / "threshold.json").exists()  # not written: the copy's own, if any
    twins = [tmp_path / "a" / "set", tmp_path / "b" / "set"]
    for folder in twins:
        write_images(folder, 4, seed=9)
    code, _ = _stage_with_external(trained, tmp_path / "again", [str(t) for t in twins])
    assert code == 2 and "two external sets are named 'set'" in capsys.readouterr().err

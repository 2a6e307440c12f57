"""End to end: `dvc repro` on the real Kermany images, served as a zip from a loopback HTTP server.

Then new files land in the dataset's inbox (a truncated copy, an exact duplicate, a re-encoded near
duplicate and two new images): they are quarantined, grouped and, with everything else cached, only they
are decoded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import pandas as pd
import pytest
import yaml
from conftest import ROOT, shared_dataset

from medflow.io import read_csv, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "tasks", ".dvc/config",
                 ".dvc/.gitignore", "data/inbox"]


def _make_project(dest: Path) -> Path:
    """A fresh git + DVC checkout of the pipeline files (the code runs from the installed package)."""
    dest.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=dest,
                   check=True)
    return dest


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=1200)


def _zip_folder(src: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                zf.write(path, Path("chest_xray") / "train" / path.relative_to(src))


def _set_source(project: Path, url: str, sha256: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"]["sources"] = [{"url": url, "sha256": sha256}]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_repro_then_new_data_lands(tmp_path: Path, file_server: tuple[str, Path]) -> None:
    src = shared_dataset("chest_xray")
    base_url, served = file_server
    archive = served / "chest_xray.zip"
    _zip_folder(src, archive)
    archive_sha = sha256_file(archive)
    project = _make_project(tmp_path / "project")
    _set_source(project, f"{base_url}/chest_xray.zip", archive_sha)

    run = _dvc(project, "repro", "validate")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    interim, processed = project / "data/interim/pneumonia", project / "data/processed/pneumonia"
    filt = _json(interim / "filter.json")
    # The shared Kermany train set holds no corrupt file but two byte-identical pairs
    # (person1430_bacteria_3695/3696, person1619_bacteria_4267/4268): each kept once.
    assert filt["in"] == 1566 and filt["rejected"] == 2 and filt["clean"] == 1564
    assert filt["by_reason"]["duplicate"] == 2
    split = read_csv(processed / "split.csv")
    assert len(split) == 1564
    assert (split.groupby("group")["split"].nunique() == 1).all(), "a patient is in two splits"
    assert (split.groupby("dup_group")["split"].nunique() == 1).all()
    assert set(split["split"]) == {"train", "val", "test"}
    assert _json(processed / "resize.json")["shape"] == [1564, 224, 224, 1]
    assert sha256_file(archive) == archive_sha  # the source archive is untouched
    status = _dvc(project, "status", "validate")
    assert "up to date" in status.stdout, status.stdout

    # New data lands in the inbox: a truncated copy, an exact duplicate, a re-encoded near duplicate.
    first = src / "PNEUMONIA" / sorted(os.listdir(src / "PNEUMONIA"))[0]
    landed = project / "data/inbox/pneumonia/landed/PNEUMONIA"
    landed.mkdir(parents=True)
    data = first.read_bytes()
    (landed / "person90001_bacteria_1.jpeg").write_bytes(data[: len(data) * 6 // 10])
    (landed / "person90002_bacteria_1.jpeg").write_bytes(data)
    cv2.imwrite(str(landed / "person90003_bacteria_1.jpeg"), cv2.imread(str(first)),
                [cv2.IMWRITE_JPEG_QUALITY, 70])
    normal = sorted((src / "NORMAL").iterdir())
    shutil.copy(normal[0], landed.parent / "tmp.jpeg")  # outside a class folder: skipped
    (landed.parent / "NORMAL").mkdir()
    for i, path in enumerate(normal[:2]):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(landed.parent / "NORMAL" / f"NORMAL9-IM-900{i}-0001.jpeg"), cv2.flip(img, 0))

    run = _dvc(project, "repro", "validate")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    filt = _json(interim / "filter.json")
    assert filt["in"] == 1566 + 5
    # only the new contents were decoded (the exact duplicate's content was already known)
    assert filt["decoded"] == 4 and filt["cached"] == 1564
    rejects = read_csv(interim / "rejects.csv")
    reasons = {Path(p).name: r for p, r in zip(rejects["path"], rejects["reason"], strict=True)}
    assert reasons["person90001_bacteria_1.jpeg"] == "truncated"
    assert reasons["person90002_bacteria_1.jpeg"] == "duplicate"
    assert len(reasons) == 4
    resize = _json(processed / "resize.json")
    assert resize["decoded"] == 3 and resize["images"] == 1564 + 3
    split = read_csv(processed / "split.csv")
    split["name"] = split["path"].map(lambda p: Path(p).name)
    near = split[split["name"].isin([first.name, "person90003_bacteria_1.jpeg"])]
    assert len(near) == 2 and near["dup_group"].nunique() == 1 and near["split"].nunique() == 1
    assert (split.groupby("group")["split"].nunique() == 1).all()
    assert isinstance(pd.read_json(project / "reports/pneumonia/validation.json", typ="series"), pd.Series)


def test_repro_through_training_on_a_small_local_folder(tmp_path: Path) -> None:
    """The whole DAG on 120 real images dropped into the inbox: model, report, metrics, plots, clean status."""
    src = shared_dataset("chest_xray")
    project = _make_project(tmp_path / "project")
    inbox = project / "data/inbox/pneumonia/small"
    for cls, n in (("NORMAL", 40), ("PNEUMONIA", 80)):
        (inbox / cls).mkdir(parents=True)
        for path in sorted((src / cls).iterdir())[:n]:
            shutil.copy(path, inbox / cls / path.name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"]["sources"] = []
    params["resize"]["size"] = 64
    params["validate"] = {"split_tolerance": 0.2, "class_ratio_tolerance": 0.25}
    params["train"].update(epochs=2, batch_size=16)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run = _dvc(project, "repro")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    meta = _json(project / "models/pneumonia/metadata.json")
    assert meta["input_shape"] == [64, 64, 1] and meta["epochs_run"] == 2
    assert (project / "models/pneumonia/model.keras").stat().st_size > 0
    metrics = _dvc(project, "metrics", "show", "--json")
    assert metrics.returncode == 0 and "val" in metrics.stdout and "auc" in metrics.stdout
    evaluation = project / "reports/pneumonia/evaluation"
    report = _json(evaluation / "metrics.json")
    assert report["n"] == int((pd.read_csv(project / "data/processed/pneumonia/split.csv")["split"] == "test").sum())
    assert report["threshold"] == _json(project / "models/pneumonia/threshold.json")["threshold"]
    assert "roc_auc" in metrics.stdout and "threshold" in metrics.stdout
    assert "data:image/png;base64," in (evaluation / "report.html").read_text()
    plots = _dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr[-2000:]
    for name in ("roc.csv", "pr.csv", "calibration.csv", "predictions.csv", "Sensitivity and specificity"):
        assert name in plots.stdout, name
    status = _dvc(project, "status")
    assert "up to date" in status.stdout, status.stdout
    again = _dvc(project, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout

"""End to end: `dvc repro` on the real Kermany images, served as a zip from a loopback HTTP server.

Then new files land in the dataset's inbox (a truncated copy, an exact duplicate, a re-encoded near
duplicate and two new images): they are quarantined, grouped and, with everything else cached, only they
are decoded. Two datasets of the catalog (pneumonia, malaria) run through `dvc repro evaluate@<ds>` in one
checkout, each into its own outputs. After every run `git status` shows nothing but dvc.lock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import cv2
import pandas as pd
import pytest
import yaml
from conftest import ROOT, copy_shipped, shared_dataset

from medflow.io import read_csv, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = ["download", "extract", "manifest", "filter", "resize", "split", "validate", "train", "evaluate"]

PROJECT_FILES = ["dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "tasks", "medflow", ".dvc/config",
                 ".dvc/.gitignore", "data/inbox"]  # + params.yaml and datasets/ as committed (copy_shipped)


def _make_project(dest: Path) -> Path:
    """A fresh git + DVC checkout of the pipeline files (dvc.yaml hashes this checkout's medflow/ and tasks/)."""
    dest.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    copy_shipped(dest)
    _commit(dest)
    return dest


def _commit(dest: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=dest,
                   check=True)


def _git_changes(project: Path) -> list[str]:
    """What `git status` reports besides dvc.lock (the run's record, committed with the code by the user):
    every derived file must be a DVC output or git-ignored, so this is empty after a run."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line[3:] != "dvc.lock"]


def _edit_yaml(path: Path, edit: Any) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


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
    _edit_yaml(project / "datasets/pneumonia.yaml",
               lambda entry: entry["dataset"].update(sources=[{"url": url, "sha256": sha256}]))


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

    _commit(project)  # the source is part of the checkout
    run = _dvc(project, "repro", "validate@pneumonia")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert _git_changes(project) == []

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
    status = _dvc(project, "status", "validate@pneumonia")
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

    run = _dvc(project, "repro", "validate@pneumonia")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert _git_changes(project) == []  # the landed files are inbox data (git-ignored)

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
    validation = _json(project / "reports/pneumonia/validation.json")
    assert validation["success"] is True and validation["failed"] == [], validation["failed"]
    # the manifest, split and image suites, and one derived table per grouping (one split per group)
    suites = validation["suites"]
    assert set(suites) == {"manifest", "patients", "near_duplicates", "split_units", "splits", "images"}
    for name, suite in suites.items():
        stats = suite["statistics"]
        assert suite["success"] and stats["unsuccessful_expectations"] == 0, (name, stats)
        assert stats["evaluated_expectations"] == stats["successful_expectations"] >= 1, (name, stats)
    assert sum(s["statistics"]["evaluated_expectations"] for s in suites.values()) == 32


SMALL_RUN = {"resize": {"size": 64}, "validate": {"split_tolerance": 0.2, "class_ratio_tolerance": 0.25},
             "train": {"epochs": 2, "batch_size": 16}}


def _small_project(tmp_path: Path) -> Path:
    """A checkout whose datasets read their inbox only, with small-run shared params."""
    project = _make_project(tmp_path / "project")
    for entry in (project / "datasets").glob("*.yaml"):
        _edit_yaml(entry, lambda e: e["dataset"].update(sources=[]))
    _edit_yaml(project / "params.yaml", lambda p: [p[k].update(v) for k, v in SMALL_RUN.items()])
    _commit(project)
    return project


def _copy_images(src: Path, dest: Path, counts: dict[str, int]) -> None:
    for cls, n in counts.items():
        (dest / cls).mkdir(parents=True)
        for path in sorted((src / cls).iterdir())[:n]:
            shutil.copy(path, dest / cls / path.name)


def test_repro_through_training_on_a_small_local_folder(tmp_path: Path) -> None:
    """The whole DAG on 120 real images dropped into the inbox: model, report, metrics, plots, clean status."""
    src = shared_dataset("chest_xray")
    project = _small_project(tmp_path)
    _copy_images(src, project / "data/inbox/pneumonia/small", {"NORMAL": 40, "PNEUMONIA": 80})

    run = _dvc(project, "repro", "evaluate@pneumonia")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert _git_changes(project) == []
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
    for name in ("roc.csv", "pr.csv", "calibration.csv", "predictions.csv",
                 "pneumonia, sensitivity and specificity"):
        assert name in plots.stdout, name
    assert _git_changes(project) == []  # dvc_plots/ and every report is ignored
    stages = [f"{s}@pneumonia" for s in STEPS]
    status = _dvc(project, "status", "--json", *stages)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    lock = (project / "dvc.lock").read_bytes()
    again = _dvc(project, "repro", "evaluate@pneumonia")
    assert again.returncode == 0 and (project / "dvc.lock").read_bytes() == lock


def test_two_datasets_of_the_catalog_in_one_checkout(tmp_path: Path) -> None:
    """malaria (3 channels, 128 px from its catalog file, shrunk to 64 here) beside pneumonia: each stage
    writes its own dataset's outputs, and one dataset's run leaves the other's stages alone."""
    cells, xrays = shared_dataset("malaria_cells"), shared_dataset("chest_xray")
    project = _small_project(tmp_path)
    _copy_images(cells, project / "data/inbox/malaria/slice", {"Parasitized": 60, "Uninfected": 60})
    _copy_images(xrays, project / "data/inbox/pneumonia/small", {"NORMAL": 40, "PNEUMONIA": 80})
    _edit_yaml(project / "datasets/malaria.yaml", lambda e: e["resize"].update(size=48))
    _commit(project)

    run = _dvc(project, "repro", "evaluate@malaria")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    locked = set(yaml.safe_load((project / "dvc.lock").read_text())["stages"])
    assert locked == {f"{s}@malaria" for s in STEPS}  # pneumonia's stages did not run
    assert not (project / "data/processed/pneumonia").exists()
    run = _dvc(project, "repro", "evaluate@pneumonia")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert _git_changes(project) == []

    malaria, pneumonia = (_json(project / f"models/{d}/metadata.json") for d in ("malaria", "pneumonia"))
    assert malaria["input_shape"] == [48, 48, 3] and pneumonia["input_shape"] == [64, 64, 1]
    assert malaria["task"] == "malaria" and pneumonia["task"] == "pneumonia"
    split = read_csv(project / "data/processed/malaria/split.csv")
    assert len(split) == 120 and set(split["class_name"]) == {"Parasitized", "Uninfected"}
    assert (split.groupby("group")["split"].nunique() == 1).all()  # NIH patients P<n> stay in one split
    assert split["group"].str.fullmatch(r"P\d+").all()
    for ds in ("malaria", "pneumonia"):
        report = _json(project / f"reports/{ds}/evaluation/metrics.json")
        assert report["n"] > 0 and "roc_auc" in json.dumps(report)
    status = _dvc(project, "status", "--json")  # both datasets up to date; the other two never ran
    assert status.returncode == 0
    stale = set(json.loads(status.stdout))
    assert not any(s.endswith(("@malaria", "@pneumonia")) for s in stale), stale

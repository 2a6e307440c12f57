"""Flow tests under Prefect's test harness (a temporary local API): the train and retrain flows on a real
DVC project copy. Training is tiny (medflow CNN, 64 px, 6 epochs; the tutorial CNN does not learn at all in so few).

- train flow: every dvc.yaml stage as a task; afterwards `dvc status` is clean and `dvc repro` has nothing
  to do; a second run recomputes nothing; artifacts are posted; a failed validation fails the run with
  the reason and nothing after it runs.
- retrain flow (real Kermany images from ../shared/data): unchanged source -> "no new data"; new images ->
  split extended (old assignments kept), challenger trained and promoted; a deliberately worse challenger
  (one epoch at a learning rate of 1e-7: effectively untrained) -> not promoted, champion unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from conftest import ROOT, shared_dataset

pytestmark = [pytest.mark.slow]

PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "tasks", "datasets",
                 ".dvc/config", ".dvc/.gitignore", "data/inbox"]
TINY_TRAIN = {"model": "medflow_cnn", "epochs": 6, "batch_size": 16, "early_stopping_patience": 0,
              "reduce_lr_patience": 0}


# ------------------------------------------------------------------------------------------ helpers
def make_project(dest: Path, **overrides: dict[str, Any]) -> Path:
    """A fresh git + DVC checkout of the pipeline files with small-run params (sources: the inbox only)."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["dataset"]["sources"] = []
    params["resize"]["size"] = 64
    params["validate"] = {"split_tolerance": 0.2, "class_ratio_tolerance": 0.25}
    params["train"].update(TINY_TRAIN)
    params["evaluate"].update(bootstrap=1000, gradcam_examples=0)
    params["retrain"].update(tolerance=0.25, bootstrap=1000)  # ~30 test images: wide intervals
    for section, values in overrides.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=dest,
                   check=True)
    return dest


def set_params(project: Path, section: str, **values: Any) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=1200)


def assert_dvc_clean(project: Path) -> None:
    status = dvc(project, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    again = dvc(project, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout[-3000:]


def generated_images(inbox: Path, n_patients: int = 24, per_patient: int = 2, seed: int = 0) -> None:
    """Tiny learnable X-ray-like images: positives carry a bright blob; ids follow the Kermany rule."""
    rng = np.random.default_rng(seed)
    for i in range(n_patients):
        positive = i % 3 != 0
        cls = "PNEUMONIA" if positive else "NORMAL"
        (inbox / cls).mkdir(parents=True, exist_ok=True)
        for j in range(per_patient):
            img = rng.normal(90, 25, (72, 72)).clip(0, 255)
            if positive:
                cv2.circle(img, (int(rng.integers(20, 52)), int(rng.integers(20, 52))), 10, 230, -1)
            pid = seed * 1000 + i
            name = f"person{pid}_bacteria_{j}.jpeg" if positive else f"IM-{pid:04d}-{j:04d}.jpeg"
            cv2.imwrite(str(inbox / cls / name), img.astype(np.uint8))


def real_images(inbox: Path, src: Path, start: int, counts: dict[str, int]) -> None:
    """Copy real Kermany images (files start .. start+n of each class, sorted by name) into the inbox."""
    for cls, n in counts.items():
        (inbox / cls).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / cls).iterdir())[start:start + n]:
            shutil.copy(path, inbox / cls / path.name)


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:  # the newest artifact under the key (the default order is not)
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC)
    return found[0] if found else None


# ------------------------------------------------------------------------------------------- tests
def test_plan_checks_only_changed_stages_and_those_downstream(tmp_path: Path) -> None:
    from flows import stages

    (tmp_path / "in.txt").write_text("1")
    (tmp_path / "other.txt").write_text("1")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "cp in.txt a.txt", "deps": ["in.txt"], "outs": ["a.txt"]},
        "b": {"cmd": "cp a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
        "c": {"cmd": "cp other.txt c.txt", "deps": ["other.txt"], "outs": ["c.txt"]}}}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc(tmp_path, "init", "-q").returncode == 0
    assert stages.plan(tmp_path) == [("a", True), ("b", True), ("c", True)]
    assert dvc(tmp_path, "repro").returncode == 0
    assert stages.plan(tmp_path) == [("a", False), ("b", False), ("c", False)]
    (tmp_path / "in.txt").write_text("2")
    assert stages.plan(tmp_path) == [("a", True), ("b", True), ("c", False)]
    result = stages.repro_stage(tmp_path, "a")
    assert result.ran and not stages.repro_stage(tmp_path, "a").ran


def test_train_flow_runs_the_dvc_stages_and_agrees_with_dvc(tmp_path: Path, harness: None) -> None:
    from flows.train import train_flow
    from medflow.lifecycle import registry

    project = make_project(tmp_path / "project")
    generated_images(project / "data/inbox/pneumonia/batch1")
    result = train_flow(dataset="pneumonia", project_dir=str(project))
    stages_run = [r["stage"] for r in result["stages"] if r["ran"]]
    assert stages_run[:2] == ["download", "extract"] and "train" in stages_run
    assert result["decision"]["promote"]  # the first model becomes champion
    champ = registry.champion(project / "models/pneumonia")
    assert champ and (project / "models/pneumonia/versions" / champ["version"] / "model.keras").is_file()
    assert_dvc_clean(project)
    summary = _artifact("pneumonia-train-summary")
    assert summary is not None and "Headline metrics" in summary.data and "| train | ran |" in summary.data
    assert _artifact("pneumonia-quarantine") is not None

    start = time.perf_counter()
    again = train_flow(dataset="pneumonia", project_dir=str(project))
    assert not any(r["ran"] for r in again["stages"]), again["stages"]  # DVC's cache: nothing recomputed
    assert again["decision"]["reason"].startswith("unchanged")
    print(f"no-op train flow: {time.perf_counter() - start:.1f} s")


def test_failed_validation_fails_the_run_with_the_reason(tmp_path: Path, harness: None) -> None:
    from flows.train import train_flow

    project = make_project(tmp_path / "project", validate={"split_tolerance": 0.0, "class_ratio_tolerance": 0.0})
    generated_images(project / "data/inbox/pneumonia/batch1", n_patients=13, per_patient=3)
    state = train_flow(dataset="pneumonia", project_dir=str(project), return_state=True)
    assert state.is_failed()
    assert "medflow validate: error" in state.message, state.message
    assert not (project / "models/pneumonia/model.keras").exists()  # nothing downstream ran


def test_deployment_for_another_dataset_refuses_with_a_clear_message(tmp_path: Path, harness: None) -> None:
    from flows.train import train_flow

    project = make_project(tmp_path / "project")
    state = train_flow(dataset="malaria", project_dir=str(project), return_state=True)
    assert state.is_failed() and "selects dataset 'pneumonia'" in state.message and "datasets/malaria.yaml" in (
        state.message)


def test_retrain_is_skipped_while_another_run_holds_the_dataset(tmp_path: Path, harness: None) -> None:
    from flows.retrain import retrain_flow
    from medflow.lifecycle.retrain import dataset_lock

    project = make_project(tmp_path / "project")
    generated_images(project / "data/inbox/pneumonia/batch1")
    with dataset_lock(project, "pneumonia", wait=False):  # a run in progress
        result = retrain_flow(dataset="pneumonia", project_dir=str(project))
    assert result["status"] == "skipped: busy"
    assert not (project / "dvc.lock").exists() and not (project / "models").exists()  # nothing was touched


@pytest.mark.integration
def test_retrain_skips_promotes_and_rejects(tmp_path: Path, harness: None) -> None:
    from flows.retrain import NO_NEW_DATA, retrain_flow
    from flows.train import train_flow
    from medflow.io import read_csv
    from medflow.lifecycle import registry

    src = shared_dataset("chest_xray")
    project = make_project(tmp_path / "project")
    inbox = project / "data/inbox/pneumonia"
    real_images(inbox / "batch1", src, 0, {"NORMAL": 50, "PNEUMONIA": 100})
    train_flow(dataset="pneumonia", project_dir=str(project))
    models = project / "models/pneumonia"
    first = registry.champion(models)["version"]

    # Nothing new since training: the first retrain ingests (all cached), the second finds nothing new.
    assert retrain_flow(dataset="pneumonia", project_dir=str(project))["status"] == "no new model"
    start = time.perf_counter()
    assert retrain_flow(dataset="pneumonia", project_dir=str(project))["status"] == NO_NEW_DATA
    assert time.perf_counter() - start < 15

    # New images land: old assignments kept, challenger trained and promoted.
    before = read_csv(project / "data/processed/pneumonia/split.csv")
    real_images(inbox / "batch2", src, 50, {"NORMAL": 20, "PNEUMONIA": 40})
    result = retrain_flow(dataset="pneumonia", project_dir=str(project))
    assert result["status"] == "promoted", result["decision"]
    second = registry.champion(models)["version"]
    assert second != first and result["decision"]["champion"] == first
    after = read_csv(project / "data/processed/pneumonia/split.csv")
    kept = after.merge(before[["path", "split"]], on="path", suffixes=("", "_before"))
    assert len(kept) == len(before) and (kept["split"] == kept["split_before"]).all()
    assert len(after) > len(before)
    assert_dvc_clean(project)
    decision = _artifact("pneumonia-retrain-decision")
    assert decision is not None and "| roc_auc |" in decision.data

    # A deliberately worse challenger (effectively untrained): not promoted, champion unchanged.
    set_params(project, "train", epochs=1, learning_rate=1e-7)
    real_images(inbox / "batch3", src, 70, {"NORMAL": 10, "PNEUMONIA": 20})
    result = retrain_flow(dataset="pneumonia", project_dir=str(project))
    assert result["status"] == "not promoted", result["decision"]
    assert registry.champion(models)["version"] == second
    assert len(registry.list_versions(models)) == 3
    assert_dvc_clean(project)

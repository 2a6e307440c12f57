"""Flow tests under Prefect's test harness (a temporary local API): the train and retrain flows on a real
DVC project copy. Training is tiny (medflow CNN, 64 px, 6 epochs; the tutorial CNN does not learn at all in so few).

- one `dvc repro` for a run of stages, read stage by stage (the flows' route);
- train flow: every dvc.yaml stage of the dataset (download@pneumonia ...) as a task, and no other dataset's;
  afterwards `dvc status` is clean, `dvc repro` has nothing to do and `git status` is clean; a second run
  recomputes nothing; artifacts are posted (the quarantine table lists the rejected files); a failed
  validation fails the run with the reason and nothing after it runs; every catalog dataset opens.
- retrain flow (real Kermany images from ../shared/data): unchanged source -> "no new data"; new images ->
  split extended (old assignments kept), challenger trained and promoted; a deliberately worse challenger
  (one epoch at a learning rate of 1e-7: effectively untrained) -> not promoted, champion unchanged.
"""

from __future__ import annotations

import importlib.util
import json
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
from conftest import copy_project, git_commit_all, shared_dataset, small_run_catalog

pytestmark = [pytest.mark.slow]

TINY_TRAIN = {"model": "medflow_cnn", "epochs": 6, "batch_size": 16, "early_stopping_patience": 0,
              "reduce_lr_patience": 0}
SMALL_RUN: dict[str, dict[str, Any]] = {
    "resize": {"size": 64},
    "validate": {"split_tolerance": 0.2, "class_ratio_tolerance": 0.25},
    "train": TINY_TRAIN,
    "evaluate": {"bootstrap": 1000, "gradcam_examples": 0},
    "retrain": {"tolerance": 0.25, "bootstrap": 1000},  # ~30 test images: wide intervals
}


# ------------------------------------------------------------------------------------------ helpers
def make_project(dest: Path, **overrides: dict[str, Any]) -> Path:
    """A fresh git + DVC checkout of the pipeline with small-run shared params; every dataset of the catalog
    reads its inbox only (``sources: []``). The code is this checkout's (dvc.yaml hashes medflow/ and tasks/)."""
    copy_project(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in [*SMALL_RUN.items(), *overrides.items()]:
        params[section] = {**params[section], **values}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for entry_file in (dest / "datasets").glob("*.yaml"):
        entry = yaml.safe_load(entry_file.read_text())
        entry["dataset"]["sources"] = []
        entry_file.write_text(yaml.safe_dump(entry, sort_keys=False))
    small_run_catalog(dest / "datasets", {**SMALL_RUN, **overrides})
    git_commit_all(dest)
    return dest


def set_params(project: Path, section: str, **values: Any) -> None:
    """Change shared params and commit them, as a user does (git status then shows only what runs change)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", f"params: {section}"],
                   cwd=project, check=True)


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=1200)


def assert_dvc_clean(project: Path, dataset: str = "pneumonia") -> None:
    """DVC agrees with the run: the dataset's stages are up to date, `dvc repro` changes nothing in dvc.lock,
    and git sees no change (every derived file is a DVC output or ignored)."""
    status = dvc(project, "status", "--json", *(f"{s}@{dataset}" for s in STEPS))
    assert status.returncode == 0 and json.loads(status.stdout) == {f"download@{dataset}": ["always changed"]}, \
        status.stdout + status.stderr  # download lists the inbox on every repro (dvc.yaml always_changed)
    lock = (project / "dvc.lock").read_bytes()
    again = dvc(project, "repro", f"evaluate@{dataset}")
    assert again.returncode == 0 and (project / "dvc.lock").read_bytes() == lock, again.stdout[-3000:]
    assert_git_clean(project)


def assert_git_clean(project: Path) -> None:
    """git sees nothing but dvc.lock (the run's record, committed with the code): every file a run derives is
    a DVC output or git-ignored."""
    porcelain = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project,
                               capture_output=True, text=True, check=True).stdout
    changes = [line for line in porcelain.splitlines() if line[3:] != "dvc.lock"]
    assert changes == [], "untracked or changed after the run:\n" + "\n".join(changes[:50])


STEPS = ["download", "extract", "manifest", "filter", "resize", "split", "validate", "train", "evaluate", "crossval"]


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


def _upstream_of(flow_state: Any, stage: str) -> set[str]:
    """The task runs a stage's task run waited for (its graph edges in the Prefect UI), by name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    by_id = {str(r.id): r.name for r in runs}
    (run,) = [r for r in runs if r.name == stage]
    return {by_id[str(i.id)] for i in run.task_inputs.get("wait_for", [])}


MARKER = "MARKER_home_x"  # in the path of a test project: no shared output may name it


def assert_no_marker_in_artifacts_or_events(project: Path) -> None:
    """Every artifact on the Prefect API (read back through its client) and a data-landed event of ``project``
    name no folder above the project (issue 18: no absolute path in what users share)."""
    from prefect.client.orchestration import get_client

    from flows.events import landed_event
    from medflow.config import load_config
    from medflow.lifecycle.watch import InboxWatcher

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    assert artifacts
    for a in artifacts:
        text = json.dumps([a.key, a.description, a.data], default=str)
        assert MARKER not in text and str(project.parent) not in text, (a.key, text[:2000])
    watcher = InboxWatcher(load_config(project / "params.yaml", "pneumonia"), project / "data/inbox/pneumonia",
                           project / "models/pneumonia")
    (project / "data/inbox/pneumonia/batch1/NORMAL/new.jpeg").write_bytes(b"not yet an image")
    payload = watcher.check(settle=False)
    (project / "data/inbox/pneumonia/batch1/NORMAL/new.jpeg").unlink()
    assert payload is not None and MARKER in payload["inbox"]  # what the watcher has ...
    event = json.dumps(landed_event("pneumonia", project, payload))
    assert MARKER not in event and '"inbox": "data/inbox/pneumonia"' in event, event  # ... is not what it sends


# ------------------------------------------------------------------------------------------- tests
def test_one_dvc_repro_runs_the_stages_and_reports_each_of_them(tmp_path: Path) -> None:
    """The flows' route (issue 13, overhead): one `dvc repro --single-item` for a run of stages, read stage by
    stage: each gets its own output and ran/skipped verdict from DVC; a failure names its stage and the step's
    error; a retry of the failed stage starts DVC again from there."""
    from flows import stages

    (tmp_path / "in.txt").write_text("1")
    (tmp_path / "other.txt").write_text("1")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "cp in.txt a.txt", "deps": ["in.txt"], "outs": ["a.txt"]},
        "b": {"cmd": "cp a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
        "c": {"cmd": "cp other.txt c.txt", "deps": ["other.txt"], "outs": ["c.txt"]},
        # like download: runs on every repro; it counts as run only when its record in dvc.lock changed
        "d": {"cmd": "cp other.txt d.txt", "always_changed": True, "outs": [{"d.txt": {"cache": False}}]},
        "e": {"cmd": "cp d.txt e.txt", "deps": ["d.txt"], "outs": ["e.txt"]},
        "x": {"cmd": "test -f ok.txt && cp ok.txt x.txt || { echo 'medflow x: error: ok.txt is missing'; exit 2; }",
              "outs": ["x.txt"]},
        "y": {"cmd": "cp x.txt y.txt", "deps": ["x.txt"], "outs": ["y.txt"]}}}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc(tmp_path, "init", "-q").returncode == 0
    names = ["a", "b", "c", "d", "e"]
    assert [s.always_changed for s in stages.pipeline(tmp_path) if s.name in names] == [False] * 3 + [True, False]

    def run() -> dict[str, Any]:
        with stages.Repro(tmp_path, names, always_changed={"d"}) as repro:
            return {n: repro.stage(n) for n in names}

    first = run()
    assert all(r.ran for r in first.values()), first
    assert "> cp in.txt a.txt" in first["a"].output and "cp in.txt" not in first["b"].output  # each its own share
    assert first["e"].output.startswith("Running stage 'e'")
    again = run()
    assert not any(r.ran for r in again.values()), again  # d ran again, with the same record: not counted
    assert "Stage 'a' didn't change, skipping" in again["a"].output
    (tmp_path / "in.txt").write_text("2")
    assert [n for n, r in run().items() if r.ran] == ["a", "b"]  # b: its dep changed
    (tmp_path / "a.txt").unlink()  # DVC restores it from its run cache instead of running the stage
    lock = stages.lock_entry(tmp_path, "a")
    restored = run()
    assert not any(r.ran for r in restored.values()) and "'a' is cached - skipping run" in restored["a"].output
    assert (tmp_path / "a.txt").read_text() == "2" and stages.lock_entry(tmp_path, "a") == lock

    with stages.Repro(tmp_path, ["a", "x", "y"]) as repro:
        assert not repro.stage("a").ran
        with pytest.raises(stages.StageFailed, match=r"^stage 'x' failed: medflow x: error: ok.txt is missing$"):
            repro.stage("x")
        (tmp_path / "ok.txt").write_text("ok")
        assert repro.stage("x").ran and repro.stage("y").ran  # the retry: DVC again, from x on
    assert (tmp_path / "y.txt").read_text() == "ok"


def _quarantine_rows() -> list[dict[str, str]]:
    artifact = _artifact("pneumonia-quarantine")
    assert artifact is not None
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return list(data)


def test_failed_validation_fails_the_run_with_the_reason(tmp_path: Path, harness: None) -> None:
    """Run on prefect-dask's DaskTaskRunner (a 1-worker LocalCluster) where the dask extra is installed: the
    filter and resize stages decode on the run's cluster (README, "Dask")."""
    from flows.common import dask_runner
    from flows.train import train_flow

    project = make_project(tmp_path / "project", validate={"split_tolerance": 0.0, "class_ratio_tolerance": 0.0})
    generated_images(project / "data/inbox/pneumonia/batch1", n_patients=13, per_patient=3)
    on_dask = importlib.util.find_spec("prefect_dask") is not None
    flow = train_flow.with_options(task_runner=dask_runner(n_workers=1)) if on_dask else train_flow
    state = flow(dataset="pneumonia", project_dir=str(project), return_state=True)
    if on_dask:  # resize decoded on the run's cluster
        stats = json.loads((project / "data/processed/pneumonia/resize.json").read_text())
        assert stats["decoded_on"] == "dask", stats
    assert state.is_failed()
    assert "medflow validate: error: validation failed" in state.message, state.message
    assert "\n  - splits: " in state.message, state.message  # the failed expectation itself, not only a count
    assert not (project / "models/pneumonia/model.keras").exists()  # nothing downstream ran
    failure = _artifact("pneumonia-failure")  # what failed, for the UI: the stage, its message, its log's tail
    assert failure is not None and "# Failed: validate@pneumonia" in failure.data, failure
    assert "validation failed" in failure.data and "splits" in failure.data and "lines of its log" in failure.data


def test_every_catalog_dataset_opens_with_its_own_paths(tmp_path: Path) -> None:
    from flows.common import open_project

    project = make_project(tmp_path / "project")
    for ds in yaml.safe_load((project / "params.yaml").read_text())["datasets"]:
        opened = open_project(str(project), ds)
        assert opened.cfg.dataset.name == ds and [s.name for s in opened.stages] == [f"{s}@{ds}" for s in STEPS]
        assert opened.model_root == project / "models" / ds
        assert opened.path("download", "--inbox") == project / "data/inbox" / ds
        assert opened.path("evaluate", "--out") == project / "reports" / ds / "evaluation"
    # The flows run each stage with `dvc repro --single-item`, which skips download's preflight: open_project's
    # own preflight refuses a typo before any DVC call, so no stage's outputs are deleted (issue 12, Parameters)
    from medflow.config import ConfigError

    set_params(project, "train", epochs="ten")
    with pytest.raises(ConfigError, match=r"params.yaml: train.epochs: .*valid integer.*'ten'"):
        open_project(str(project), "pneumonia")


def test_unknown_dataset_fails_the_run_listing_the_catalog(tmp_path: Path, harness: None) -> None:
    from flows.train import train_flow

    project = make_project(tmp_path / "project")
    state = train_flow(dataset="pneumonia2", project_dir=str(project), return_state=True)
    assert state.is_failed() and "unknown dataset 'pneumonia2'" in state.message
    assert "covid_ct, malaria, melanoma, pneumonia" in state.message


def test_retrain_is_skipped_while_another_run_holds_the_dataset(tmp_path: Path, harness: None) -> None:
    from flows.retrain import retrain_flow
    from medflow.lifecycle.retrain import dataset_lock

    project = make_project(tmp_path / "project")
    generated_images(project / "data/inbox/pneumonia/batch1")
    with dataset_lock(project, "pneumonia", wait=False):  # a run in progress
        state = retrain_flow(dataset="pneumonia", project_dir=str(project), on_busy="skip", return_state=True)
    assert state.name == "Skipped: busy" and state.result()["status"] == "skipped: busy", state
    assert not (project / "dvc.lock").exists() and not (project / "models").exists()  # nothing was touched


def test_a_busy_retrain_waits_for_the_lock_and_a_scheduled_one_without_data_completes(tmp_path: Path,
                                                                                        harness: None) -> None:
    """The default: a trigger that finds the dataset busy waits for the lock (its event is not lost), then decides;
    with no source and an empty inbox there is nothing to train, and the run completes with "no data"."""
    import threading

    from flows.retrain import NO_DATA, retrain_flow
    from medflow.lifecycle.retrain import dataset_lock

    project = make_project(tmp_path / "project")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with dataset_lock(project, "pneumonia", wait=False):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    threading.Timer(3.0, release.set).start()
    start = time.perf_counter()
    state = retrain_flow(dataset="pneumonia", project_dir=str(project), return_state=True)
    waited = time.perf_counter() - start
    thread.join()
    assert state.is_completed() and state.name == "No data" and state.result()["status"] == NO_DATA, state
    assert "no data" in state.message and "data/inbox/pneumonia/ holds no file" in state.message, state.message
    assert waited >= 2.5, f"the run did not wait for the lock ({waited:.1f} s)"
    assert not (project / "dvc.lock").exists()  # nothing ran


@pytest.mark.integration
def test_train_then_retrain_skips_promotes_and_rejects(tmp_path: Path, harness: None) -> None:
    """The train flow on real images (with a truncated file and a duplicate), then the retrain flow: nothing
    new, new images promoted, a worse challenger kept out."""
    from flows.retrain import NO_NEW_DATA, retrain_flow
    from flows.train import train_flow
    from medflow.io import read_csv
    from medflow.lifecycle import registry

    src = shared_dataset("chest_xray")
    project = make_project(tmp_path / MARKER / "project")  # a home folder: it must show in no artifact or event
    inbox = project / "data/inbox/pneumonia"
    real_images(inbox / "batch1", src, 0, {"NORMAL": 50, "PNEUMONIA": 100})
    kept = sorted((inbox / "batch1/PNEUMONIA").iterdir())[0]
    truncated, duplicate = (inbox / "batch1/PNEUMONIA" / f"person{n}_bacteria_0.jpeg" for n in (9900, 9901))
    truncated.write_bytes(kept.read_bytes()[:kept.stat().st_size * 6 // 10])
    duplicate.write_bytes(kept.read_bytes())  # an exact copy of another patient's image

    # The train flow: the dataset's own stages in dvc.yaml's graph, the first model promoted, DVC agrees.
    state = train_flow(dataset="pneumonia", project_dir=str(project), return_state=True)
    result = state.result()
    assert state.name == "Promoted", state  # the runs list says what happened
    assert [r["stage"] for r in result["stages"]] == [f"{s}@pneumonia" for s in STEPS]  # this dataset only
    assert _upstream_of(state, "train@pneumonia") == {"resize@pneumonia", "split@pneumonia", "validate@pneumonia"}
    assert _upstream_of(state, "download@pneumonia") == set()  # the UI's graph is dvc.yaml's
    assert all(r["ran"] for r in result["stages"]), result["stages"]
    assert result["decision"]["promote"]  # the first model becomes champion
    models = project / "models/pneumonia"
    first = registry.champion(models)["version"]
    assert (models / "versions" / first / "model.keras").is_file()
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == {f"{s}@pneumonia" for s in STEPS}
    assert_dvc_clean(project)
    summary = _artifact("pneumonia-train-summary")
    assert summary is not None and "## Test metrics" in summary.data and "| train@pneumonia | ran |" in summary.data
    report = _artifact("pneumonia-report")  # the evaluate stage's summary.md, readable in the web UI
    assert report is not None and "| ROC AUC |" in report.data and "](report.html)" not in report.data
    assert "Chance guard: " in summary.data and f"(/artifacts/artifact/{report.id})" in summary.data
    rows = {Path(r["path"]).name: r["reason"] for r in _quarantine_rows()}
    assert result["quarantined"] == len(rows) >= 2
    assert rows[truncated.name] == "truncated"
    assert {rows.get(duplicate.name), rows.get(kept.name)} >= {"duplicate"}  # one of the pair kept
    assert_no_marker_in_artifacts_or_events(project)

    start = time.perf_counter()
    again = train_flow(dataset="pneumonia", project_dir=str(project))
    assert not any(r["ran"] for r in again["stages"]), again["stages"]  # DVC's cache: nothing recomputed
    assert again["decision"]["reason"].startswith("unchanged")
    print(f"no-op train flow: {time.perf_counter() - start:.1f} s")

    # Nothing new since training: the train flow recorded what it ingested, so a retrain finds nothing new.
    lock = (project / "dvc.lock").read_bytes()
    start = time.perf_counter()
    state = retrain_flow(dataset="pneumonia", project_dir=str(project), return_state=True)
    assert state.name == "No new data" and state.result()["status"] == NO_NEW_DATA, state
    print(f"retrain with no new data: {time.perf_counter() - start:.1f} s")
    assert (project / "dvc.lock").read_bytes() == lock and len(registry.list_versions(models)) == 1

    # New images land: old assignments kept, challenger trained and promoted.
    before = read_csv(project / "data/processed/pneumonia/split")
    real_images(inbox / "batch2", src, 50, {"NORMAL": 20, "PNEUMONIA": 40})
    state = retrain_flow(dataset="pneumonia", project_dir=str(project), return_state=True)
    result = state.result()
    assert result["status"] == "promoted" and state.name == "Promoted", (state, result["decision"])
    second = registry.champion(models)["version"]
    assert second != first and result["decision"]["champion"] == first
    after = read_csv(project / "data/processed/pneumonia/split")
    kept = after.merge(before[["path", "split"]], on="path", suffixes=("", "_before"))
    assert len(kept) == len(before) and (kept["split"] == kept["split_before"]).all()
    assert len(after) > len(before)
    assert_dvc_clean(project)
    decision = _artifact("pneumonia-retrain-decision")
    assert decision is not None and "| ROC AUC |" in decision.data

    # A deliberately worse challenger (effectively untrained): not promoted, champion unchanged.
    set_params(project, "train", epochs=1, learning_rate=1e-7)
    real_images(inbox / "batch3", src, 70, {"NORMAL": 10, "PNEUMONIA": 20})
    result = retrain_flow(dataset="pneumonia", project_dir=str(project))
    assert result["status"] == "not promoted", result["decision"]
    assert registry.champion(models)["version"] == second
    assert len(registry.list_versions(models)) == 3
    assert_dvc_clean(project)

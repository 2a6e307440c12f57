"""Faults of a run, injected for real (issue 19): a concurrent run of the same dataset, DVC's busy message.

A params.yaml edited mid-run and a run killed by SIGKILL are injected in tests/test_train.py's
``test_resume_after_a_crash_is_exact`` (it reuses that training run instead of starting another).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT

from flows import stages
from medflow import cli
from medflow.lifecycle.retrain import TOKEN_ENV, Busy, dataset_lock

HOLDER = """
import sys, time
from pathlib import Path
from medflow.lifecycle.retrain import dataset_lock
with dataset_lock(Path(sys.argv[1]), sys.argv[2], wait=False):
    print("locked", flush=True)
    time.sleep(120)
"""


def _scratch_project(dest: Path) -> Path:
    """The project's own dvc.yaml, params.yaml, catalog and tasks/: enough for ``medflow STEP --dataset``."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "datasets", "tasks"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    return dest


def test_a_stage_outside_the_holders_run_fails_naming_it_and_one_inside_proceeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A flow (another process) holds the dataset: a stage command run by hand stops at once, before reading
    anything, naming the holder's pid; the flow's own stages (its token in their environment) go on."""
    project = _scratch_project(tmp_path / "p")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MEDFLOW_PROJECT", str(project))
    roots = tmp_path / "roots.json"
    roots.write_text("[]")
    argv = ["manifest", "--dataset", "pneumonia", "--roots-json", str(roots), "--out", str(tmp_path / "m.csv")]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(project), "pneumonia"], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "medflow manifest: error: dataset pneumonia is busy" in err and f"pid {holder.pid}" in err, err
        assert "re-run it (dvc repro)" in err and not (tmp_path / "m.csv").exists()
    finally:
        holder.kill()
        holder.wait(10)
    with dataset_lock(project, "pneumonia", wait=False):  # as a flow: its children inherit the token
        assert os.environ.get(TOKEN_ENV + "pneumonia")
        cli.main(argv)
        assert "busy" not in capsys.readouterr().err  # past the lock (the step itself may refuse no roots)
        with pytest.raises(Busy), dataset_lock(project, "pneumonia", wait=False):  # without the token: held
            pass
    assert TOKEN_ENV + "pneumonia" not in os.environ


STAGE = """
import sys, time
from pathlib import Path
from medflow.lifecycle.retrain import stage_lock
while len(sys.argv) > 2 and not Path(sys.argv[2]).exists():
    time.sleep(0.05)
with stage_lock(Path(".").resolve(), "ds"):
    Path(sys.argv[1]).write_text("x")
"""


def test_a_manual_dvc_repro_keeps_the_dataset_between_its_stages(tmp_path: Path) -> None:
    """A real ``dvc repro`` of two stages: its first stage takes the lock (as every ``medflow STEP`` does) and
    exits; while the second runs, a trigger finds the dataset busy, naming that dvc; when dvc is done it is
    free. The second stage (the same dvc) was not refused."""
    project = tmp_path / "p"
    project.mkdir()
    gate = tmp_path / "gate"
    (project / "stage.py").write_text(STAGE)
    spec = {"stages": {"first": {"cmd": f"{sys.executable} stage.py a", "outs": ["a"]},
                       "second": {"cmd": f"{sys.executable} stage.py b {gate}", "deps": ["a"], "outs": ["b"]}}}
    (project / "dvc.yaml").write_text(json.dumps(spec))
    for cmd in (["git", "init", "-q"], [stages.dvc_executable(), "init", "-q"]):
        subprocess.run(cmd, cwd=project, check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(TOKEN_ENV + "ds", None)
    repro = subprocess.Popen([stages.dvc_executable(), "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        while not (project / "a").exists():  # the first stage held the lock and wrote its output
            assert repro.poll() is None, repro.communicate()[0]
            time.sleep(0.05)
        with pytest.raises(Busy, match=f"dvc pid {repro.pid}"), dataset_lock(project, "ds", wait=False):
            pass
        gate.touch()
        out = repro.communicate(timeout=120)[0]
        assert repro.returncode == 0, out
        assert (project / "b").read_text() == "x"
        with dataset_lock(project, "ds", wait=False):  # dvc exited: the dataset is free
            pass
    finally:
        gate.touch()
        repro.kill()
        repro.wait(10)


def test_failure_reason_keeps_dvcs_whole_busy_message(tmp_path: Path) -> None:
    """DVC's own rwlock refusal (its real text) keeps the blocking PID and command in the run's reason."""
    from dvc.fs import LocalFileSystem
    from dvc.lock import LockError
    from dvc.rwlock import rwlock

    fs, path = LocalFileSystem(), str(tmp_path / "out")
    with (rwlock(str(tmp_path), fs, "dvc repro train@x", [], [path], False), pytest.raises(LockError) as refused,
          rwlock(str(tmp_path), fs, "dvc repro --single-item download@x", [], [path], False)):
        pass
    output = f"Running stage 'train@x':\nERROR: {refused.value}\n"
    reason = stages.failure_reason(output)
    assert reason == f"ERROR: {refused.value}"
    assert f"(PID {os.getpid()}): dvc repro train@x" in reason and "is being blocked by:" in reason
    assert "If there are no processes with such PIDs" in reason
    assert textwrap.dedent(reason).count("\n") >= 2


def test_a_stage_locks_the_project_it_runs_in_not_the_code_checkout(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC runs a stage at its project's root; ``$MEDFLOW_PROJECT`` may name another checkout (where the code
    is): the dataset lock is the working directory's project's, so two projects never block each other."""
    project = _scratch_project(tmp_path / "p")
    monkeypatch.setenv("MEDFLOW_PROJECT", str(ROOT))
    monkeypatch.chdir(project)
    assert cli.stage_root() == project.resolve()
    monkeypatch.chdir(tmp_path)  # not inside a project: $MEDFLOW_PROJECT's
    assert cli.stage_root() == ROOT.resolve()

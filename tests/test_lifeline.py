"""medflow.lifeline: a command dies with the process that started it, directly or through a ``sh -c``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import os, sys, time
from medflow import lifeline
lifeline.exit_on_sigterm()
lifeline.die_with_parent()
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(60)
"""
OUTER = """
import subprocess, sys, time
subprocess.Popen([sys.argv[1], "-c", sys.argv[2]])
time.sleep(60)
"""


def _started(shell: str, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    """An outer process that starts ``shell -c 'python CHILD'``, as DVC starts a stage; and the child."""
    (tmp_path / "child.py").write_text(CHILD)
    pid_file = tmp_path / "pid"
    cmd = f"{sys.executable} {tmp_path / 'child.py'} {pid_file}"
    outer = subprocess.Popen([sys.executable, "-c", OUTER, shell, cmd], env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    return outer, psutil.Process(int(pid_file.read_text()))


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_a_child_started_through_a_shell_dies_with_the_shells_parent(shell: str, tmp_path: Path) -> None:
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outer, child = _started(path, tmp_path, env)
    try:
        execs = child.ppid() == outer.pid
        assert execs == (shell == "bash"), "bash execs a single command; dash forks and waits"
        os.kill(outer.pid, signal.SIGKILL)
        outer.wait()
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert not alive, f"the child outlived {shell}'s parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(outer.pid, signal.SIGKILL)


def test_the_switch_turns_the_guard_off(tmp_path: Path) -> None:
    """The control: with ``MEDFLOW_DIE_WITH_PARENT=0`` the same child survives, so the test above can fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDFLOW_DIE_WITH_PARENT": "0"}
    outer, child = _started(shutil.which("dash") or "/bin/sh", tmp_path, env)
    try:
        os.kill(outer.pid, signal.SIGKILL)
        outer.wait()
        gone, alive = psutil.wait_procs([child], timeout=2)
        assert alive, "the child died although the guard was off"
    finally:
        child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(outer.pid, signal.SIGKILL)

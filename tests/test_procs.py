"""medflow.procs: a started process group logs to its file; stop() takes the whole group down, SIGKILL when
SIGTERM is ignored; a group already gone is no error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from medflow import procs

# A leader that starts a child of its own and prints both ids; with "ignore", both ignore SIGTERM.
SCRIPT = """
import signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\\n"
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN) if sys.argv[1] == 'ignore' else None\\n"
                          "print('child up', flush=True)\\ntime.sleep(300)", sys.argv[1]])
print("pids", child.pid, flush=True)
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    """The process has ended (within 10 s: a signalled child that is not ours to wait on dies on its own time)."""
    for _ in range(200):
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped yet


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    log = tmp_path / f"{mode}.log"
    proc = procs.start([sys.executable, "-c", SCRIPT, mode], tmp_path, dict(os.environ), log)
    while "child up" not in log.read_text():  # both up (bounded by the test run's own timeout)
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    child = int(log.read_text().split("pids ", 1)[1].split()[0])
    return proc, child, log


def test_stop_takes_the_group_down(tmp_path: Path) -> None:
    proc, child, _ = _start(tmp_path, "plain")
    procs.stop(proc)
    assert proc.returncode == -signal.SIGTERM
    assert _gone(child)


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    proc, child, _ = _start(tmp_path, "ignore")
    procs.stop(proc, timeout_s=0.5)
    assert proc.returncode == -signal.SIGKILL
    assert _gone(child)
    procs.stop(proc)  # already stopped: nothing to do
    procs.kill_group(proc)  # the group is gone: no error

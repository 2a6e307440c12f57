"""Child processes in their own process group: started with their output in a log file, stopped as a group.

A server, a runner or a worker starts processes of its own (flow runs, DVC, the stage commands); signalling
the group reaches them all, so nothing outlives a stop. Used by the tests and benchmarks that start servers,
and by the flows to take a stage's DVC process down with its command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any


def start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` in ``cwd`` as the leader of a new process group, stdout and stderr into ``log``."""
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (a group already gone is no error)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc``'s process group at once."""
    signal_group(proc, signal.SIGKILL)


def stop(proc: subprocess.Popen[Any], timeout_s: float = 20, sig: int = signal.SIGTERM) -> None:
    """Stop ``proc``'s process group: ``sig`` (SIGTERM; PostgreSQL's fast shutdown is SIGINT), then SIGKILL if its
    leader is still running after ``timeout_s``. A leader that has exited (and been reaped: its id may be reused)
    is left alone."""
    if proc.poll() is not None:
        return
    signal_group(proc, sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait(10)

"""A command dies with the process that started it: no step keeps writing after DVC (or a flow) is gone.

DVC runs a stage's ``cmd`` through ``$SHELL -c``, or ``/bin/sh -c`` where ``$SHELL`` is unset (CI, cron,
systemd). bash ``exec``\\ s a single command, so ``medflow`` is DVC's own child; Debian's ``/bin/sh`` (dash
0.5.12) does not: it forks, waits, and outlives a killed DVC. A SIGKILLed DVC cannot stop its children, and
an orphaned ``medflow train`` used to finish and write model.keras that no dvc.lock records.
:func:`die_with_parent` asks Linux to signal this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``,
inherited by nothing, kept across ``exec``), then checks the parent pid once more: a parent that died before
the call is caught too. Where the parent is a ``sh -c`` shell, a watcher thread also follows the shell's own
parent (:func:`_watch_shell`): when the shell is orphaned (its parent pid changes), the signal is sent, and
the shell ends with its only child.

The ``medflow`` CLI installs it for every step and model command with SIGTERM and :func:`exit_on_sigterm`:
the signal raises SystemExit in the main thread, so ``finally`` blocks run (temporary outputs are removed),
and a process still alive :data:`GRACE_S` seconds later (a thread blocked in a read) is SIGKILLed. The
decoding worker processes get SIGKILL (their writes are crash-safe by design, see
:mod:`medflow.imaging.store`). ``MEDFLOW_DIE_WITH_PARENT=0`` turns the guard off (a ``medflow`` command
started with ``nohup`` from a shell that then exits; ``nohup dvc repro &`` needs no such switch).
Elsewhere than Linux it does nothing. Standard library only: worker processes import it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "busybox"})
WATCH_S = 0.5  # how often the watcher of a shell parent checks that the shell still has its parent
GRACE_S = 5.0  # after SIGTERM: seconds left for cleanup before the process kills itself
ENV_SWITCH = "MEDFLOW_DIE_WITH_PARENT"


def enabled() -> bool:
    """Whether the guard applies here: Linux, and not switched off with ``MEDFLOW_DIE_WITH_PARENT=0``."""
    return sys.platform.startswith("linux") and os.environ.get(ENV_SWITCH, "1") != "0"


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Have ``sig`` sent to this process when its parent dies; True when installed.

    ``parent`` is the parent pid this process was started by (default: the current one). If the parent is
    already gone when the call returns (its pid changed), ``sig`` is sent at once.
    """
    if not enabled():
        return False
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # no libc prctl: nothing to install
        return False
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os.kill(os.getpid(), sig)
    elif _is_command_shell(parent):
        _watch_shell(parent, sig)
    return True


def _proc_ppid(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (None when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ...": comm may hold spaces


def _is_command_shell(pid: int) -> bool:
    """Whether ``pid`` is a shell running one command string (``sh -c CMD``), as DVC starts a stage."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) >= 2 and os.path.basename(argv[0]).decode(errors="replace") in SHELLS and argv[1] == b"-c"


def _watch_shell(shell: int, sig: int) -> None:
    """Send ``sig`` to this process once ``shell`` loses its parent (a daemon thread polls /proc)."""
    grandparent = _proc_ppid(shell)
    if grandparent is None or grandparent <= 1:  # already orphaned, or started by init: nothing to follow
        return

    def watch() -> None:
        while _proc_ppid(shell) == grandparent:
            time.sleep(WATCH_S)
        if os.getppid() == shell or _proc_ppid(shell) is None:  # the shell was orphaned (or is gone)
            os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="medflow-lifeline", daemon=True).start()


def exit_on_sigterm(grace_s: float = GRACE_S) -> None:
    """On SIGTERM raise SystemExit(143) in the main thread (cleanup runs); SIGKILL self after ``grace_s``."""
    def handler(signum: int, frame: FrameType | None) -> None:
        timer = threading.Timer(grace_s, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one exit is enough
        print(f"medflow: terminated (signal {signum}: the parent process died or asked it to stop)",
              file=sys.stderr)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)

"""A command dies with the process that started it: no step keeps writing after DVC (or a flow) is gone.

DVC runs a stage's ``cmd`` through ``$SHELL -c``; for a single command (every stage of dvc.yaml) the shell
``exec``\\ s it, so ``medflow`` is DVC's own child (measured: its parent pid is DVC's). A SIGKILLed DVC cannot
stop its children, and an orphaned ``medflow train`` used to finish and write model.keras that no dvc.lock
records. :func:`die_with_parent` asks Linux to signal this process when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, inherited by nothing, kept across ``exec``), then checks the parent pid once
more: a parent that died before the call is caught too.

The ``medflow`` CLI installs it for every step and model command with SIGTERM and :func:`exit_on_sigterm`:
the signal raises SystemExit in the main thread, so ``finally`` blocks run (temporary outputs are removed),
and a process still alive :data:`GRACE_S` seconds later (a thread blocked in a read) is SIGKILLed. The
decoding worker processes get SIGKILL (their writes are crash-safe by design, see
:mod:`medflow.imaging.cache`). ``MEDFLOW_DIE_WITH_PARENT=0`` turns the guard off (a ``medflow`` command
started with ``nohup`` from a shell that then exits; ``nohup dvc repro &`` needs no such switch).
Elsewhere than Linux it does nothing. Standard library only: worker processes import it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from types import FrameType

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
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
    return True


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

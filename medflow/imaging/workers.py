"""How the steps that decode in parallel (filter, resize) start their worker processes.

Workers are forked by a ``forkserver`` that has preloaded the modules they run (:data:`PRELOAD`), never
from the caller: a forked copy of a process whose OpenCV thread pool has started deadlocks in its first
OpenCV threading call (seen here in ``cv2.setNumThreads``), and Prefect callers run other threads too.
The server starts once per process (about 0.4 s here: the preloaded modules import NumPy, OpenCV and
Pillow, not pandas or pydantic); each worker then starts in about 5-15 ms instead of the 1.5-2 s a
``spawn`` child needs to import its step. Each worker calls :func:`worker_started` first: it is SIGKILLed
when the step's process dies, so a killed step leaves no decoder behind (and the fork server and
resource tracker, which wait for the workers, exit after them). This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
import types
from collections.abc import Iterator
from multiprocessing.context import ForkServerContext

from medflow import lifeline

# What the fork server imports once, for every worker it forks. One list for every step: the server is
# one per process and takes its preload list when it starts, whichever step starts it first.
PRELOAD = ["medflow.imaging.parallel", "medflow.imaging.verdict"]


def mp_context() -> ForkServerContext:
    """The multiprocessing context for worker processes: the fork server, with :data:`PRELOAD` preloaded."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def worker_started() -> None:
    """First call of a worker process's initialiser: die (SIGKILL) with the step's process.

    The fork server is the worker's parent and waits for its workers before it exits, so a parent-death
    signal alone would wait for it: a daemon thread also waits on the multiprocessing sentinel of the
    process that created the pool (readable once that process is gone, also when it already was).
    """
    lifeline.die_with_parent(signal.SIGKILL)
    parent = mp.parent_process()
    if parent is not None and parent.sentinel is not None and lifeline.enabled():
        threading.Thread(target=_kill_self_after, args=(parent.sentinel,), name="die-with-step",
                         daemon=True).start()


def _kill_self_after(sentinel: int) -> None:
    mp_connection.wait([sentinel])
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def main_hidden() -> Iterator[None]:
    """Start worker processes without making each of them re-run the caller's ``__main__`` module.

    multiprocessing re-imports the parent's main script or module in every spawn and forkserver child
    (CPython 3.11's forkserver ``"__main__"`` preload never receives the path, so it cannot help): that is
    pydantic under the ``medflow`` CLI, pandas under a script, all of Prefect under a flow run, about 0.3
    to 2 s per worker on a small machine, and a script without an ``if __name__ == "__main__":`` guard
    would even run again. Workers need nothing from it (their code and their work items are in the
    preloaded modules), so an empty ``__main__`` stands in while they are started. Code in other threads
    that looks up ``__main__`` during those milliseconds (unpickling a function defined in a script, say)
    would see the empty module.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main

"""How the steps that decode in parallel (filter, resize) start their worker processes.

Workers are forked by a ``forkserver`` that has preloaded the modules they run (:data:`PRELOAD`), never
from the caller: a forked copy of a process whose OpenCV thread pool has started deadlocks in its first
OpenCV threading call (seen here in ``cv2.setNumThreads``), and Prefect callers run other threads too.
The server starts once per process (about 0.4 s here: the preloaded modules import NumPy, OpenCV and
Pillow, not pandas or pydantic); each worker then starts in about 5-15 ms instead of the 1.5-2 s a
``spawn`` child needs to import its step. This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import types
from collections.abc import Iterator
from multiprocessing.context import ForkServerContext

# What the fork server imports once, for every worker it forks. One list for every step: the server is
# one per process and takes its preload list when it starts, whichever step starts it first.
PRELOAD = ["medflow.imaging.parallel", "medflow.imaging.verdict"]


def mp_context() -> ForkServerContext:
    """The multiprocessing context for worker processes: the fork server, with :data:`PRELOAD` preloaded."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


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

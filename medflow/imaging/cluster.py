"""Decoding on a Dask cluster (the ``dask`` extra): the filter and resize fan-out sent to a ``dask.distributed``
scheduler instead of this machine's worker processes.

Chosen by ``compute.dask_address`` (params.yaml, or a dataset's catalog file), else by the environment variable
dask itself reads, ``DASK_SCHEDULER_ADDRESS`` (a Prefect flow run passes its cluster's address that way); with
neither, the steps use their local process pool (:mod:`medflow.imaging.workers`). The work is sent as chunks
of images in row order (:func:`results`); the workers run the same functions as the local pool
(:mod:`medflow.imaging.parallel`, :mod:`medflow.imaging.verdict`), so the outputs are the same bytes.

Workers read the images and write the resize output and cache shards themselves: they need medflow (the
same version) installed and the project folder and the data at the same absolute paths (a shared
filesystem). They are not this step's children: the cluster's lifetime belongs to whoever started it (the
user's ``dask scheduler`` / ``dask worker`` services, or a flow run's DaskTaskRunner). When the step dies, the
scheduler drops its queued chunks once the client's connection is gone; a chunk already running finishes and
writes to an unlinked temporary output and to shard bytes no index record points to, which are never read.
This module imports only the standard library; dask is imported when an address is set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from medflow.errors import StepError

ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"  # dask's own variable (dask.config "scheduler-address")
CONNECT_TIMEOUT_S = 30.0
T = TypeVar("T")
R = TypeVar("R")


def scheduler_address(param: str | None) -> str | None:
    """The Dask scheduler to decode on: the parameter, else ``$DASK_SCHEDULER_ADDRESS``, else None (local pool)."""
    return param or os.environ.get(ADDRESS_ENV) or None


@contextlib.contextmanager
def connected(address: str) -> Iterator[Any]:
    """A ``distributed.Client`` connected to ``address``, closed on exit; StepError naming the address (and
    the setting that chose it) when the extra is missing or the scheduler cannot be reached."""
    try:
        from distributed import Client
    except ImportError:
        raise StepError(f"Dask scheduler {address} (compute.dask_address or ${ADDRESS_ENV}): the dask extra is "
                        "not installed (uv sync --extra dask)") from None
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise StepError(f"Dask scheduler {address} (compute.dask_address or ${ADDRESS_ENV}): cannot connect: "
                        f"{e}") from None
    try:
        yield client
    finally:
        client.close()


def slots(client: Any) -> int:
    """The cluster's worker threads now (at least 1: workers that join later get work too)."""
    return max(1, sum(client.nthreads().values()))


def results(client: Any, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    """``fn(item)`` for every item on the cluster, all submitted at once; yielded in ``items`` order.

    On an error or an early exit the work not yet done is cancelled. A worker that died on a chunk (the
    scheduler retries it on others, then gives up) is a StepError.
    """
    from distributed import KilledWorker

    futures = client.map(fn, items, pure=False)  # pure=False: every chunk is run, none deduplicated
    try:
        for future in futures:
            yield future.result()
    except KilledWorker as e:
        raise StepError("a Dask worker died while decoding (out of memory, or a decoder crashed on a file); "
                        f"re-run without compute.dask_address to find the file: {e}") from None
    finally:
        client.cancel(futures)


def absolute(path: str) -> str:
    """``path`` as the workers must see it: absolute (their working directory is not this step's)."""
    return os.path.abspath(path)

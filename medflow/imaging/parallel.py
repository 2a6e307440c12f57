"""The chunked decode fan-out: images the store lacks decoded in parallel, each written into its slot of a part.

Uncached images are decoded by ``resize.workers`` decoders (0 = all cores): this process and
``workers - 1`` worker processes, each single-threaded in OpenCV. The work goes out in row order, in
chunks whose decoding cost (pixels) shrinks towards the end so that the decoders finish together
(:func:`_chunks`); this process starts on the first chunk at once and then takes the next chunk in line
whenever it is free (:class:`_Shared`), while a worker process takes 10-15 ms to start. A decoder writes
each resized image itself into its slot of a part file of the image store (the plan decides the slot, so the
shards are the same however many decoders: :class:`medflow.imaging.store.SlotWriter`), once however many rows
it fills, and hands back only where the bytes went (:class:`Written`): the pixels never cross a
pipe. Workers are forked by the fork server of :mod:`medflow.imaging.workers`, which
has preloaded this module, never from the caller, and they do not re-run the caller's main module.
Nothing this module imports imports pandas or pydantic, so the server starts in about 0.4 s instead of
1.5. Fewer than ``POOL_MIN_IMAGES`` new images (new data landing) are decoded by threads of this process
alone (libjpeg-turbo, OpenCV and Pillow release the GIL while decoding): processes would cost more to
start than they save. With a Dask scheduler set (``compute.dask_address`` or ``$DASK_SCHEDULER_ADDRESS``,
:mod:`medflow.imaging.cluster`) the same chunks and the same decoder body run on the cluster's workers instead
(:func:`_on_cluster`), whatever the number of images.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import NamedTuple, TypeVar

import cv2

from medflow.errors import StepError
from medflow.imaging import cluster
from medflow.imaging.decode import decode_image, read_image
from medflow.imaging.store import SlotWriter, Task
from medflow.imaging.workers import main_hidden, mp_context, worker_started

log = logging.getLogger(__name__)
T = TypeVar("T")

# Fewer uncached images than this are decoded by threads in-process: processes would cost more to start
# (the fork server takes about 0.4 s in a fresh process, the workers about 15 ms; 64 images 50-250 ms).
POOL_MIN_IMAGES = 64
_MAX_CHUNK = 32  # images per task sent to a worker, at most
_CHUNKS_PER_WORKER = 4  # a chunk is at most 1/(this * workers) of the work left (guided scheduling)


class Written(NamedTuple):
    """One decoded image, written into its slot of a part file of the image store."""

    key: str  # its cache key
    reduced: bool  # a JPEG decoded at a reduced DCT scale
    shard: str  # name of the part file its bytes were written to, under shards/
    offset: int  # where in that file


class Failed(NamedTuple):
    """A file that the clean table lists (the filter passed it) and that cannot be read or decoded now (it changed
    after the filter read it, or a decoder disagrees with the filter's). Its row(s) of the store have no
    pixels (read as zeros) and nothing is stored: the resize step lists it in its rejects."""

    key: str  # its cache key
    error: str  # the decoder's message: names the file once and says what is wrong


Result = Written | Failed


@contextlib.contextmanager
def decoding(todo: list[Task], *, size: int, channels: int, workers: int, cache: str,
             run_id: str, shard_rows: int, dask_address: str | None = None) -> Iterator[Iterator[Result]]:
    """Start decoding ``todo`` into ``out`` at once; yield an iterator over the results as they finish
    (:class:`Written`, or :class:`Failed` for a file that cannot be decoded: one file never stops the run).

    ``cache`` is the image store whose part files the decoders write to, under names with ``run_id``,
    ``shard_rows`` images to a part (:class:`medflow.imaging.store.SlotWriter`). Fewer than
    POOL_MIN_IMAGES images (new data landing, typically) are decoded by threads of this process:
    libjpeg-turbo, OpenCV and Pillow release the GIL while decoding, and processes would take longer to
    start. Otherwise ``workers - 1`` worker processes and this process decode (see :class:`_Shared`). On
    an error or an early exit the queued work is dropped (the caller removes the part files).
    With a Dask scheduler (``dask_address``, else ``$DASK_SCHEDULER_ADDRESS``) its workers decode everything
    (:func:`_on_cluster`) and ``workers`` is not used.
    """
    address = cluster.scheduler_address(dask_address)
    if address is not None and todo:
        with cluster.connected(address) as client:
            found = _on_cluster(client, todo, size=size, channels=channels, cache=cache, run_id=run_id,
                                shard_rows=shard_rows)
            try:
                yield found
            finally:
                found.close()  # cancels what is not done yet, before the client closes
        return
    job = partial(_decode_chunk, size=size, channels=channels, cache=cache, run_id=run_id, shard_rows=shard_rows)
    chunks = _chunks(todo, max(1, workers), cost=_task_cost)
    in_process = workers <= 1 or len(todo) < POOL_MIN_IMAGES
    log.debug("decoding %d images in %d chunks: %d %s", len(todo), len(chunks), max(1, workers),
              "thread(s) of this process" if in_process else "decoders (this process and worker processes)")
    if in_process:
        threads = ThreadPoolExecutor(max(1, workers))
        try:
            done = as_completed([threads.submit(job, chunk) for chunk in chunks])
            yield _unbroken(result for future in done for result in future.result())
        finally:
            threads.shutdown(wait=True, cancel_futures=True)
        return
    pool = ProcessPoolExecutor(workers - 1, mp_context=mp_context(), initializer=_worker_init)
    shared = None
    try:
        shared = _Shared(chunks, job, pool, processes=workers - 1)
        yield _unbroken(shared.results())
    except BaseException:  # drop the queued work instead of finishing it
        if shared is not None:
            shared.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    # Every result is in: the workers exit on their own (about 25 ms) while this process finishes up.
    pool.shutdown(wait=False)


def _decode_chunk(tasks: list[Task], *, size: int, channels: int, cache: str, run_id: str,
                  shard_rows: int) -> list[Result]:
    """Decoder body: decode a chunk of images and write each into its slot of a part file of the store.

    Only (key, part, offset) is returned: the pixels never travel through a pipe. Where an image goes follows
    from its place in the plan (:class:`medflow.imaging.store.SlotWriter`), not from this decoder, so the
    shards are the same whoever decodes. A file that cannot be decoded is a :class:`Failed` result; a write
    error stops the chunk.
    """
    results: list[Result] = []
    nbytes = size * size * channels
    with SlotWriter(cache, run_id, shard_rows, nbytes) as slots:
        for task in tasks:
            job = task.job
            try:
                img, reduced = decode_image(read_image(job.path), size=size, channels=channels,
                                            info=job.info, name=job.path)
            except StepError as e:
                results.append(Failed(job.key, str(e)))
                continue
            part, offset = slots.write(task.seq, img.reshape(-1).data)  # contiguous uint8: one flat buffer
            results.append(Written(job.key, reduced, part, offset))
    return results


def _on_cluster(client: object, todo: list[Task], *, size: int, channels: int, cache: str,
                run_id: str, shard_rows: int) -> Generator[Result, None, None]:
    """Decode ``todo`` on a Dask cluster: the local pool's chunks (sized for the cluster's threads) and decoder
    body (:func:`_decode_remote`), results in row order. Paths go out absolute; a failed file's message names
    it as the local pool's would (as the clean table does), so the rejects are the same bytes too."""
    named = {task.job.key: (cluster.absolute(task.job.path), task.job.path) for task in todo}
    remote = [task._replace(job=task.job._replace(path=named[task.job.key][0])) for task in todo]
    job = partial(_decode_remote, size=size, channels=channels, cache=cluster.absolute(cache), run_id=run_id,
                  shard_rows=shard_rows)
    chunks = _chunks(remote, cluster.slots(client), cost=_task_cost)
    log.debug("decoding %d images in %d chunks on the Dask cluster", len(todo), len(chunks))
    for results in cluster.results(client, job, chunks):
        for result in results:
            if isinstance(result, Failed):
                absolute, given = named[result.key]
                result = Failed(result.key, result.error.replace(absolute, given))
            yield result


def _decode_remote(tasks: list[Task], *, size: int, channels: int, cache: str, run_id: str,
                   shard_rows: int) -> list[Result]:
    """Decoder body on a Dask worker: :func:`_decode_chunk`, OpenCV single-threaded (one task per worker thread).
    Its slots are the same as the local pool's (the plan decides them), disjoint from every other worker's."""
    cv2.setNumThreads(1)
    return _decode_chunk(tasks, size=size, channels=channels, cache=cache, run_id=run_id, shard_rows=shard_rows)


def _worker_init() -> None:
    """Initialiser of each worker process."""
    worker_started()
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _chunks(todo: list[T], workers: int, cost: Callable[[T], float] = lambda _: 1.0) -> list[list[T]]:
    """Split the work, in row order, into chunks that shrink towards the end (guided scheduling).

    A chunk costs at most ``1 / (_CHUNKS_PER_WORKER * workers)`` of the cost left (and holds at most
    ``_MAX_CHUNK`` items, at least one): big chunks early keep the per-task overhead small; single images
    at the end make the workers finish together instead of one of them decoding a last big chunk while
    the others wait. Costs, not counts: the first rows of a dataset sorted by class may be the largest
    images. Row order (rather than, say, the biggest files first) makes a chunk consecutive rows, which
    its worker writes into consecutive slots of a part file: a shard's slots follow its rows.
    """
    costs = [cost(item) for item in todo]
    left = sum(costs)
    chunks, i = [], 0
    while i < len(todo):
        budget, j, spent = left / (_CHUNKS_PER_WORKER * workers), i + 1, costs[i]
        while j < len(todo) and j - i < _MAX_CHUNK and spent + costs[j] <= budget:
            spent += costs[j]
            j += 1
        chunks.append(todo[i:j])
        left -= spent
        i = j
    return chunks


def _task_cost(task: Task) -> float:
    """Relative decoding cost of a task for chunking: its pixels (1 Mpx when the header is unknown)."""
    info = task.job.info
    return float(info.width * info.height) if info else 1e6


_Finished = Future[list[Result]] | list[Result] | BaseException


class _Shared:
    """Chunks handed out in order to the worker processes and to a thread of this process.

    This process counts as one of the ``resize.workers``: its thread takes the next chunk in line
    whenever it is free, from the start (a worker process takes 10-15 ms to start, the first one about
    0.4 s more to start the fork server, and this thread keeps decoding meanwhile), and its results
    cross no pipe. The pool is kept two chunks ahead per worker process (one running, one queued, so no
    worker waits between chunks); the guided, cost-sized chunks keep everyone finishing together.
    """

    def __init__(self, chunks: list[list[Task]], job: Callable[[list[Task]], list[Result]],
                 pool: Executor, *, processes: int) -> None:
        self._pending = deque(chunks)
        self._total, self._job, self._pool, self._depth = len(chunks), job, pool, 2 * processes
        self._in_flight = 0
        self._done: queue.SimpleQueue[_Finished] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._help, name="resize-helper", daemon=True)
        self._thread.start()
        try:
            with main_hidden():  # the first submissions start the worker processes (all of them)
                self._feed()
        except BaseException:
            self.stop()
            raise

    def results(self) -> Iterator[Result]:
        """Every chunk's results as they finish; the first error (a worker's, or this thread's) raised."""
        for _ in range(self._total):
            item = self._done.get()
            if isinstance(item, Future):
                self._in_flight -= 1
                self._feed()
                item = item.result()
            if isinstance(item, BaseException):
                raise item
            yield from item

    def stop(self) -> None:
        """Make this process's thread stop after its current chunk, and wait for it."""
        self._stopped.set()
        self._thread.join()

    def _feed(self) -> None:
        while self._in_flight < self._depth and (chunk := self._take()) is not None:
            self._pool.submit(self._job, chunk).add_done_callback(self._done.put)
            self._in_flight += 1

    def _take(self) -> list[Task] | None:
        try:
            return self._pending.popleft()  # atomic: the thread and the feeder never get the same chunk
        except IndexError:
            return None

    def _help(self) -> None:
        while not self._stopped.is_set() and (chunk := self._take()) is not None:
            try:
                self._done.put(self._job(chunk))
            except BaseException as e:  # handed to results(), which raises it
                self._done.put(e)
                return


def _unbroken(results: Iterator[Result]) -> Iterator[Result]:
    """Turn a dead worker (killed for memory, or a decoder crash) into an actionable StepError."""
    try:
        yield from results
    except BrokenProcessPool as e:
        raise StepError("a resize worker process died (out of memory, or a decoder crashed on a file); "
                        "re-run with resize.workers: 1 to find the file") from e

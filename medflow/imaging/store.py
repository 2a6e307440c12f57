"""The image store's writer: the resize step's output and its cache are one set of immutable shard files.

The format (one folder: ``index.json`` and ``shards/<name>.bin``) and its reader are
:class:`medflow.io.ImageStore`. The store lives in the resize step's ``--cache`` folder (persistent, not
cached by DVC); each run publishes it to ``--out`` (the DVC-tracked folder the other stages read) as hard
links of its shards and a copy of its index: no image is written twice, and DVC finds each unchanged shard
under the inode it hashed before (its state database), so it hashes and caches only new shards.

Every resized image is known by the key ``sha256(image sha256, size, channels, RESIZE_VERSION)``
(:func:`cache_key`). A run decodes only the rows whose key the store's index does not hold
(:func:`plan_run`); each decoder (a worker process, or a thread) appends its images to a part file of its
own (:class:`ShardAppender`), and once every result is in the run names each part after the keys it holds
(:func:`finish_shards`) and writes the new index atomically (:func:`write_index`). An increment thus adds
a few new shards (one per decoder that had work) and a new index; old shards stay byte-identical.

Why a shard is named by the digest of its keys, not of its bytes: each key is already the content address
of the pixels (the source file's digest, the output geometry and the preprocessing's version), so the list
of keys names the bytes; hashing every new byte again would cost a full read of the new data in the step,
on top of the md5 DVC computes of each new file anyway (and checks the cache with).

Crash safety. Until the index is replaced the old one holds: a crash (or an exception) at any moment leaves
the previous store and its published copy readable and whole, plus at worst part files no index points to;
those are removed by the next run (and this run's own on an error), with the shards the new index no longer
references (:func:`collect_garbage`: the store owns its shards). The cost is the time of the interrupted
run's decoding, never correctness. A damaged or foreign index is replaced by an empty one (every image is
decoded again); a shard shorter than the index says loses its rows (decoded again). One run at a time per
store (a lock file). This module imports neither pandas nor pydantic: the resize worker processes import it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from medflow.errors import StepError
from medflow.imaging.decode import RESIZE_VERSION, ImageInfo
from medflow.io import (
    MISSING,
    SHARD_SUFFIX,
    STORE_FORMAT,
    STORE_INDEX,
    STORE_SHARDS,
    STORE_VERSION,
    atomic_dir,
    atomic_open,
    read_store_index,
)

log = logging.getLogger(__name__)

PART_PREFIX = ".part-"  # a decoder's shard while the run writes it: never read, removed unless it completes
LOCK_NAME = ".lock"  # held by the run writing the store
_LEGACY = ("index.sqlite", "index.sqlite-journal")  # the resize cache of medflow before the store
_LOCK_TIMEOUT_S = 60.0  # how long to wait for another run that is writing to the same store
_O_BINARY = getattr(os, "O_BINARY", 0)


class Entry(NamedTuple):
    """Where one key's pixels live: slot ``slot`` (row ``slot`` of ``nbytes``) of the shard named ``shard``."""

    shard: str
    slot: int


class Job(NamedTuple):
    """One output row to fill: its image's cache key, file and header facts."""

    key: str  # cache key
    path: str
    info: ImageInfo | None  # None: probe the header when decoding


class Task(NamedTuple):
    """One distinct image to decode, and the output rows it fills (several when files are identical)."""

    job: Job
    rows: tuple[int, ...]


class Plan(NamedTuple):
    """What a run does: rows found in the store (row -> entry), and images decoded (in row order)."""

    hits: dict[int, Entry]
    todo: list[Task]


def cache_key(sha256: str, size: int, channels: int) -> str:
    """Content address of one resized image: changes with the file, the output geometry and the code."""
    return hashlib.sha256(f"{sha256}:{size}:{channels}:{RESIZE_VERSION}".encode()).hexdigest()


def plan_run(jobs: Sequence[Job], known: dict[str, Entry]) -> Plan:
    """Split the rows of a run into those the store holds and distinct images to decode, in row order."""
    hits: dict[int, Entry] = {}
    rows_of: dict[str, list[int]] = {}
    first: dict[str, Job] = {}
    for row, job in enumerate(jobs):
        entry = known.get(job.key)
        if entry is None:
            rows_of.setdefault(job.key, []).append(row)
            first.setdefault(job.key, job)
        else:
            hits[row] = entry
    return Plan(hits, [Task(first[key], tuple(rows)) for key, rows in rows_of.items()])


# ---------------------------------------------------------------------------------------------------------
# Reading the store back: what it holds
# ---------------------------------------------------------------------------------------------------------


def known_entries(store: Path, geometry: tuple[int, int, int]) -> dict[str, Entry]:
    """key -> entry of every image the store holds at ``geometry`` (height, width, channels) whose bytes are
    all in their shard; empty for a new store, another geometry, or a damaged index (a warning: every image is
    then decoded again, which costs time, never correctness)."""
    if not (store / STORE_INDEX).is_file():
        return {}
    try:
        index = read_store_index(store)
    except StepError as e:
        log.warning("%s: starting a new image store, every image is decoded (%s)", store, e)
        return {}
    if tuple(index["shape"][1:]) != geometry:
        return {}
    nbytes = geometry[0] * geometry[1] * geometry[2]
    sizes = [_file_size(store / STORE_SHARDS / str(name)) for name in index["shards"]]
    found: dict[str, Entry] = {}
    for key, shard, slot in zip(index.get("keys", []), index["shard"], index["slot"], strict=False):
        if shard != MISSING and 0 <= shard < len(sizes) and slot >= 0 and (slot + 1) * nbytes <= sizes[shard]:
            found[key] = Entry(index["shards"][shard], slot)
    return found


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


# ---------------------------------------------------------------------------------------------------------
# Writing: part files, named shards, the index, the published copy, garbage
# ---------------------------------------------------------------------------------------------------------


class ShardAppender:
    """The part file of one decoder (a process or a thread) of one run, to append resized bytes to.

    A context manager that opens the file (created on first use) and closes it. Its name,
    ``.part-<run>-<pid>-<thread>``, is unique to the decoder, so no two writers share a file and no lock is
    needed. :meth:`append` returns where the bytes went; :func:`finish_shards` names the file once the run
    has every result.
    """

    def __init__(self, store: str, run_id: str) -> None:
        self.name = f"{PART_PREFIX}{run_id}-{os.getpid()}-{threading.get_ident()}"
        self.path = os.path.join(store, STORE_SHARDS, self.name)
        self._fd, self._offset = -1, 0

    def __enter__(self) -> ShardAppender:
        self._fd = open_fd(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "cannot write to the image store")
        self._offset = os.fstat(self._fd).st_size
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def append(self, data: bytes | memoryview) -> int:
        """Append ``data``; the offset in the part file at which it starts."""
        offset = self._offset
        try:
            _write_all(self._fd, data)
        except OSError as e:
            raise StepError(f"{self.path}: cannot write to the image store: {e.strerror or e}") from e
        self._offset += len(data)
        return offset


def finish_shards(store: Path, written: Iterable[tuple[str, str, int]], nbytes: int) -> dict[str, Entry]:
    """Name each part file of this run after its keys: (key, part name, offset) -> key -> entry.

    A part holds its keys' rows back to back; it becomes ``shards/<sha256 of its keys>.bin`` (an existing
    file of that name holds the same keys: it is replaced). StepError naming a part whose size is not its
    rows' (a write that failed half-way).
    """
    parts: dict[str, list[tuple[int, str]]] = {}
    for key, part, offset in written:
        parts.setdefault(part, []).append((offset, key))
    entries: dict[str, Entry] = {}
    for part, items in parts.items():
        items.sort()
        path = store / STORE_SHARDS / part
        if [o for o, _ in items] != [i * nbytes for i in range(len(items))] or \
                _file_size(path) != len(items) * nbytes:
            raise StepError(f"{path}: holds {_file_size(path)} bytes, not the {len(items)} images recorded")
        keys = [k for _, k in items]
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest() + SHARD_SUFFIX
        os.replace(path, store / STORE_SHARDS / name)
        entries.update((k, Entry(name, slot)) for slot, k in enumerate(keys))
    return entries


def write_index(store: Path, shape: tuple[int, int, int, int], keys: Sequence[str],
                entries: Sequence[Entry | None]) -> dict[str, Any]:
    """Write the store's index (atomically) for rows ``keys`` at ``entries`` (None: no pixels); return it."""
    shards = sorted({e.shard for e in entries if e is not None})
    number = {name: i for i, name in enumerate(shards)}
    index = {"format": STORE_FORMAT, "version": STORE_VERSION, "shape": list(shape), "dtype": "uint8",
             "shards": shards,
             "shard": [MISSING if e is None else number[e.shard] for e in entries],
             "slot": [0 if e is None else e.slot for e in entries],
             "keys": list(keys)}
    # Not fsynced: a crash of this process leaves the old index or the new one; after a power loss DVC's
    # hash check catches a damaged published copy, and a damaged store index starts a new store.
    with atomic_open(store / STORE_INDEX, "w", encoding="utf-8", fsync=False) as f:
        json.dump(index, f, separators=(",", ":"))  # the same bytes for the same rows: DVC sees no change
    return index


def publish(store: Path, out: Path, shards: Iterable[str]) -> None:
    """Replace ``out`` (whole, atomically) by the store's index and hard links of ``shards``: no byte copied.

    Where a hard link is refused (another filesystem) the shard is copied, with a warning.
    """
    copied = 0
    with atomic_dir(out) as tmp:
        try:
            (tmp / STORE_SHARDS).mkdir()
            for name in shards:
                copied += _link_or_copy(store / STORE_SHARDS / name, tmp / STORE_SHARDS / name)
            shutil.copyfile(store / STORE_INDEX, tmp / STORE_INDEX)
        except OSError as e:  # a full disk where a link is refused: the half-made copy is removed
            raise StepError(f"{out}: cannot write the output: {e.strerror or e}") from e
    if copied:
        log.warning("%s: %d shard(s) copied, not linked, from %s (another filesystem?): each image is stored "
                    "twice", out, copied, store)


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to ``dst``; copy it where links are refused. True when copied."""
    try:
        os.link(src, dst)
        return False
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    shutil.copyfile(src, dst)
    return True


def collect_garbage(store: Path, keep: set[str]) -> int:
    """Remove the shards ``keep`` does not name, part files of earlier runs and a legacy cache index (the
    caller holds the store's lock: no other run writes here); how many files were removed."""
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(store / STORE_SHARDS) as it:
        for entry in it:
            if entry.name not in keep and (entry.name.endswith(SHARD_SUFFIX) or entry.name.startswith(PART_PREFIX)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    for name in _LEGACY:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store / name)
    return removed


def remove_parts(store: Path, run_id: str) -> None:
    """Remove this run's part files (a run that stops keeps nothing half-done)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(store / STORE_SHARDS) as it:
        for entry in it:
            if entry.name.startswith(f"{PART_PREFIX}{run_id}-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Create the store's folders and hold its lock file for the block (another run waits up to a minute);
    StepError naming the store when it cannot be written or stays locked."""
    try:
        (store / STORE_SHARDS).mkdir(parents=True, exist_ok=True)
        fd = os.open(store / LOCK_NAME, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
    except OSError as e:
        raise StepError(f"{store}: cannot write to the image store: {e.strerror or e}") from e
    try:
        _lock(fd, store)
        yield
    finally:
        os.close(fd)  # drops the lock


def _lock(fd: int, store: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: one run at a time is then the user's to keep
        return
    deadline = time.monotonic() + _LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StepError(f"{store}: the image store is locked by another resize run for over "
                                f"{_LOCK_TIMEOUT_S:.0f} s ({store / LOCK_NAME})") from None
            time.sleep(0.1)


def open_fd(path: str, flags: int, what: str) -> int:
    """``os.open`` (mode 0644 when it creates); StepError ``"<path>: <what>: <reason>"`` when it fails."""
    try:
        return os.open(path, flags | _O_BINARY, 0o644)
    except OSError as e:
        raise StepError(f"{path}: {what}: {e.strerror or e}") from e


def _write_all(fd: int, data: bytes | memoryview) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                done += os.write(fd, rest)


def save_array(path: Path | str, images: Any, *, shard_rows: int = 0) -> Path:
    """Write the uint8 array ``images`` ``(N, height, width, channels)`` as an image store at ``path``, in
    shards of ``shard_rows`` rows (0: one shard), replacing what is there; the path.

    For tests, benchmarks and tools that have the pixels in memory; the resize step writes its own store.
    """
    import numpy as np  # the workers have it already (OpenCV); here only for the array's checks

    array = np.ascontiguousarray(images)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise StepError(f"{path}: an image store holds uint8 (N, height, width, channels), got "
                        f"{array.dtype} {array.shape}")
    path = Path(path)
    step = shard_rows or max(1, len(array))
    keys = [hashlib.sha256(row.tobytes()).hexdigest() for row in array]
    entries: list[Entry | None] = []
    with store_lock(path):
        for start in range(0, len(array), step):
            part = array[start:start + step]
            name = hashlib.sha256("\n".join(keys[start:start + step]).encode()).hexdigest() + SHARD_SUFFIX
            with atomic_open(path / STORE_SHARDS / name, "wb", fsync=False) as f:
                f.write(part.tobytes())
            entries += [Entry(name, slot) for slot in range(len(part))]
        index = write_index(path, array.shape, keys, entries)
        collect_garbage(path, set(index["shards"]))
    return path

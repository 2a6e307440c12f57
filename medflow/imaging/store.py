"""The image store's writer: the resize step's output and its cache are one set of immutable shard files.

The format (one folder: ``index.json`` and ``shards/<name>.bin``) and its reader are
:class:`medflow.io.ImageStore`. The store lives in the resize step's ``--cache`` folder (persistent, not
cached by DVC); each run publishes it to ``--out`` (the DVC-tracked folder the other stages read) as hard
links of its shards and a copy of its index: no image is written twice, and DVC finds each unchanged shard
under the inode it hashed before (its state database), so it hashes and caches only new shards.

Every resized image is known by the key ``sha256(image sha256, size, channels, RESIZE_VERSION)``
(:func:`cache_key`). A run decodes only the rows whose key the store's index does not hold
(:func:`plan_run`); the decoders (worker processes, threads, or a Dask cluster's workers) write each new
image into its slot of a part file, the slot given by its place in the plan (:class:`SlotWriter`: 64 MB of
images per part), and once every result is in the run names each part after the keys it holds
(:func:`finish_shards`) and writes the new index atomically (:func:`write_index`). An increment thus adds
a few new shards (the same files however many decoders) and a new index; old shards stay byte-identical.

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
    """One distinct image to decode, the output rows it fills (several when files are identical), and its place
    in the run's plan (``seq``), which alone decides its new shard and slot (:class:`SlotWriter`)."""

    job: Job
    rows: tuple[int, ...]
    seq: int = 0


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
    return Plan(hits, [Task(first[key], tuple(rows), seq) for seq, (key, rows) in enumerate(rows_of.items())])


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


SHARD_BYTES = 64 * 1024 * 1024  # a new shard holds at most this much: few files for DVC, small increments apart


def rows_per_shard(nbytes: int) -> int:
    """How many images of ``nbytes`` bytes a new shard holds: :data:`SHARD_BYTES`' worth, at least one."""
    return max(1, SHARD_BYTES // nbytes)


def part_name(run_id: str, part: int) -> str:
    """The file name of part ``part`` of run ``run_id`` while the run writes it (never read)."""
    return f"{PART_PREFIX}{run_id}-{part:06d}"


class SlotWriter:
    """Where a decoder writes each new image: slot ``seq % rows`` of part ``seq // rows`` of the run.

    The layout follows the plan alone (each image's ``seq``, its place among the run's new images), never which
    decoder took which chunk: a run makes the same shard files with one decoder or many, threads, processes or
    the machines of a Dask cluster. Decoders write disjoint slots of a part with ``pwrite`` (as they wrote
    rows of one ``images.npy`` before the store), each opening a part once. A context manager: files are closed
    on exit. :func:`finish_shards` names the parts once the run has every result.
    """

    def __init__(self, store: str, run_id: str, rows: int, nbytes: int) -> None:
        self.folder = os.path.join(store, STORE_SHARDS)
        self.run_id, self.rows, self.nbytes = run_id, rows, nbytes
        self._fds: dict[str, int] = {}

    def __enter__(self) -> SlotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def write(self, seq: int, data: bytes | memoryview) -> tuple[str, int]:
        """Write the image of plan position ``seq``; (its part file's name, the offset it starts at)."""
        part, slot = divmod(seq, self.rows)
        name = part_name(self.run_id, part)
        path = os.path.join(self.folder, name)
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = open_fd(path, os.O_WRONLY | os.O_CREAT, "cannot write to the image store")
        offset = slot * self.nbytes
        try:
            _pwrite_all(fd, data, offset)
        except OSError as e:
            raise StepError(f"{path}: cannot write to the image store: {e.strerror or e}") from e
        return name, offset


def finish_shards(store: Path, todo: Sequence[Task], written: Iterable[tuple[str, str, int]], nbytes: int,
                  run_id: str, rows: int) -> dict[str, Entry]:
    """Name each part file of this run after its slots' keys: key -> entry of every image written.

    Part ``p`` holds the ``rows`` slots of plan positions ``p * rows ...`` (:class:`SlotWriter`); a slot whose image
    failed to decode stays zeros (no index entry points to it) and its key is marked in the name, so the
    name says exactly what the file holds. A part becomes ``shards/<sha256 of its slots' keys>.bin``, sized to
    all its slots; an existing file of that name holds the same bytes and is replaced. StepError naming a part
    whose images are not where the decoders said or that is longer than its slots (a stray writer).
    """
    done = {item[0]: item for item in written}  # key -> (key, part, offset): no tuple made per image
    entries: dict[str, Entry] = {}
    for first in range(0, len(todo), rows):
        slots = todo[first:first + rows]
        ok = [task.job.key in done for task in slots]
        if not any(ok):
            continue  # every image of the part failed: no file to keep (remove_parts drops it)
        part = part_name(run_id, first // rows)
        path = store / STORE_SHARDS / part
        for slot, task in enumerate(slots):
            if task.job.key in done and done[task.job.key][1:] != (part, slot * nbytes):
                raise StepError(f"{path}: image {task.job.path} is not in its slot {slot}")
        if _file_size(path) > len(slots) * nbytes:
            raise StepError(f"{path}: holds {_file_size(path)} bytes, more than its {len(slots)} images")
        os.truncate(path, len(slots) * nbytes)  # trailing failed slots: zeros, like the others
        label = "\n".join(task.job.key if kept else f"-{task.job.key}" for task, kept in zip(slots, ok, strict=True))
        name = hashlib.sha256(label.encode()).hexdigest() + SHARD_SUFFIX
        os.replace(path, store / STORE_SHARDS / name)
        entries.update((task.job.key, Entry(name, slot)) for slot, task in enumerate(slots) if task.job.key in done)
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


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                done += os.pwrite(fd, rest, offset + done)


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

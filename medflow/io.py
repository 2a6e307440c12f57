"""File I/O at the edges: atomic writes, CSV/JSON helpers, hashing, worker counts.

Every output is written to a temporary file in the destination folder and renamed into place, so a
crash never leaves a half-written file behind under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from medflow.errors import StepError

if TYPE_CHECKING:
    import pandas as pd

CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) files; outputs get the modes a plain open() would give them
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(dest: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    Temporary names start with ``.<name>.tmp.``, so leftovers of a killed process are easy to recognise.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # With a suffix (for writers that check the extension, e.g. ".keras") the name still ends in it.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp.", suffix=suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        _raise_if_full(e, dest)
        raise


@contextlib.contextmanager
def atomic_open(dest: Path | str, mode: str = "w", *, fsync: bool = True, **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``dest`` for writing; it replaces ``dest`` when the block ends cleanly.

    ``fsync=False`` skips forcing the data to disk before the rename (1-5 ms here): a crash of the process
    still leaves the old file or the new one, but after a power loss the new name may hold an empty file.
    """
    with atomic_path(dest) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(dest: Path | str, tmp_dir: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; it replaces ``dest`` (whole) when the block succeeds.

    ``tmp_dir``: build it there instead (on the same filesystem, for the rename), named
    ``<pid>.<dest name>.<random>.tmp`` so a later run can tell one left by a killed process."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}." if tmp_dir is None else f"{os.getpid()}.{dest.name}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=tmp_dir or dest.parent))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_full(e, dest)
        raise


def _raise_if_full(error: BaseException, dest: Path) -> None:
    """A full disk (or quota) while ``dest`` was written: StepError naming it and the cause, not a traceback."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StepError(f"{dest}: cannot write: {os.strerror(error.errno)} (the temporary file was removed)") \
            from error


def write_json(path: Path | str, data: Any, *, fsync: bool = True) -> None:
    with atomic_open(path, fsync=fsync) as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def read_json(path: Path | str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_csv(path: Path | str, df: pd.DataFrame) -> None:
    with atomic_open(path, newline="") as f:
        df.to_csv(f, index=False)


# Id-like columns that must stay text (all-digit ids and hex hashes keep their leading zeros).
_STRING_COLUMNS = ("path", "relpath", "root", "class_name", "group", "source_split", "sha256", "mode", "format",
                   "phash", "dup_group", "split_group", "split", "reason", "detail")


def read_csv(path: Path | str) -> pd.DataFrame:
    """Read a CSV written by medflow; string columns stay strings (ids like '0001' keep their zeros)."""
    import pandas as pd  # not at the top: about 1 s to import, and most steps never read a CSV

    return pd.read_csv(path, dtype={c: str for c in _STRING_COLUMNS}, keep_default_na=False, na_values=[""])


def open_images(path: Path | str) -> np.ndarray:
    """Memory-map an images.npy written by the resize step; StepError naming the file when it cannot be read."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise StepError(f"{path}: images array not found (run the resize step first)") from None
    except (ValueError, OSError) as e:
        raise StepError(f"{path}: not a readable .npy array: {e}") from None


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def n_workers(requested: int) -> int:
    """0 means all cores available to this process."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)

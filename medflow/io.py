"""File I/O at the edges: atomic writes, CSV/JSON helpers, hashing, worker counts.

Every output is written to a temporary file in the destination folder and renamed into place, so a
crash never leaves a half-written file behind under the final name.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from medflow.errors import StepError

if TYPE_CHECKING:
    import pandas as pd

CHUNK = 1 << 20


# A manifest path under a source root outside the project: "@<label>/<path under the root>" (label: the
# root folder's name). roots.json, which the extract step writes and the steps that open files read, maps
# labels to the folders on this machine (:func:`source_roots`, :func:`readable_path`).
SOURCE_ROOT = "@"


def is_outside(shown: str) -> bool:
    """Whether a :func:`display_path` result lies outside its root (climbs with ``..`` or stayed absolute)."""
    return shown == ".." or shown.startswith("../") or Path(shown).is_absolute()


def root_labels(roots: Iterable[str]) -> dict[str, str]:
    """Root (as in roots.json) -> label, for the roots outside the project: the folder's name, with a short
    hash of the root added where two outside roots share a name. The one mapping manifest writes with and
    :func:`source_roots` reads with."""
    outside = [r for r in dict.fromkeys(roots) if is_outside(display_path(r))]
    names = [Path(r).name or "root" for r in outside]
    return {r: n if names.count(n) == 1 else f"{n}-{hashlib.sha256(Path(r).as_posix().encode()).hexdigest()[:8]}"
            for r, n in zip(outside, names, strict=True)}


def source_roots(roots_json: Path | str | None) -> dict[str, Path]:
    """Label -> folder of the outside source roots listed in ``roots_json`` (none when it is None)."""
    if roots_json is None:
        return {}
    try:
        entries = read_json(roots_json)
        return {label: Path(root) for root, label in root_labels(str(e["root"]) for e in entries).items()}
    except FileNotFoundError:
        raise StepError(f"{roots_json}: not found (run the extract step first)") from None
    except (ValueError, TypeError, KeyError) as e:
        raise StepError(f"{roots_json}: not a list of image roots ({e})") from None


def readable_path(path: str, roots: Mapping[str, Path]) -> str:
    """A manifest path as a path this machine can open: ``@<label>/<rest>`` through ``roots``
    (:func:`source_roots`); any other path is project-relative already."""
    if not path.startswith(SOURCE_ROOT):
        return path
    label, _, rest = path[len(SOURCE_ROOT):].partition("/")
    if label not in roots:
        known = ", ".join(roots) or "none outside the project"
        raise StepError(f"{path}: source root {label!r} is not in roots.json ({known}); re-run the manifest step")
    return str(roots[label] / rest)


def display_path(path: Path | str, root: Path | str | None = None) -> str:
    """``path`` relative to ``root`` (default: the working directory, the project root under DVC), POSIX style.

    Lexical: symbolic links are not resolved, so a folder linked into the inbox stays
    ``data/inbox/<ds>/<link>/...``, not its target. A path outside ``root`` climbs with ``..`` from it (still
    readable by every step, and the part of the path both share, the home folder among it, never shows);
    only a path on another drive (Windows) stays absolute.
    """
    base = os.path.abspath(root if root is not None else os.getcwd())
    full = os.path.abspath(os.path.join(base, os.fspath(path)))
    try:
        return Path(os.path.relpath(full, base)).as_posix()
    except ValueError:
        return Path(full).as_posix()


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

    Temporary names are ``.<name>.tmp.<pid>.<random>``: a killed process's leftovers are recognised, and
    removed by the next step run (:func:`remove_stale_temps`) once that pid is gone.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # With a suffix (for writers that check the extension, e.g. ".keras") the name still ends in it.
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=suffix or ".tmp", dir=dest.parent)
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
    prefix = _temp_prefix(dest) if tmp_dir is None else f"{os.getpid()}.{dest.name}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=tmp_dir or dest.parent))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
        if dest.exists():  # a folder, or a file (a table that was one CSV) replaced by a folder
            old = dest.with_name(f".{dest.name}.old")
            _remove(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_full(e, dest)
        raise


def _remove(path: Path) -> None:
    """Remove ``path``, a folder or a file, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.tmp.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (signal 0; another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temps(paths: Iterable[Path | str]) -> list[Path]:
    """Remove the temporary files and folders that killed writers left beside ``paths`` (``.<name>.tmp.<pid>.*``
    of :func:`atomic_path` / :func:`atomic_dir` whose pid no longer runs); return what was removed.

    A step calls it for its outputs before it writes them, so a SIGKILL (which no cleanup can catch) costs
    disk only until the next run. A live writer's temporary files are never touched.
    """
    removed: list[Path] = []
    for dest in map(Path, paths):
        if not dest.parent.is_dir():
            continue
        for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.tmp.*"):
            pid = tmp.name[len(dest.name) + 6:].split(".", 1)[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
                removed.append(tmp)
    return removed


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


# --- Tables: the manifest, clean and split tables are folders of CSV parts, one part per source root -------
# A part is an ordinary CSV with the table's header; the table is its parts in order (``<ordinal>-<root>.csv``,
# ordinal = the root's first row in the table). An increment that adds a source root adds a part and leaves the
# others byte-identical, so DVC's cache stores the new rows alone (one whole CSV was stored again each run).
# :func:`read_csv` reads a table or a single CSV file; a table reads as one CSV (one header, parts in order).
TABLE_PART_SUFFIX = ".csv"
TABLE_PARTITION = "root"  # the column a table is partitioned by
_EMPTY_PART = "00000-empty.csv"  # a table of no rows: its header alone


def _part_name(ordinal: int, key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key).name or "root").strip("._")[:48] or "root"
    return f"{ordinal:05d}-{slug}{TABLE_PART_SUFFIX}"


def table_parts(path: Path | str) -> list[Path]:
    """The CSV files of the table at ``path``, in order: ``path`` itself when it is a file, else its parts.
    FileNotFoundError when it is neither; StepError naming the folder when it holds no part."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "no such table", str(path))
        return [path]
    parts = sorted(p for p in path.iterdir() if p.suffix == TABLE_PART_SUFFIX and not p.name.startswith("."))
    if not parts:
        raise StepError(f"{path}: a table folder with no {TABLE_PART_SUFFIX} part (written by another tool?)")
    return parts


class TableText:
    """The parts of a table as one CSV text stream: the first part's header, then every part's rows.

    For ``pd.read_csv`` (``read``) and the csv module (iteration: lines). StepError naming the part whose
    header differs from the first's."""

    def __init__(self, path: Path | str) -> None:
        self._parts = iter(table_parts(path))
        self._file: IO[str] | None = None
        self._pending = ""
        self.header: str | None = None

    def _next_part(self) -> bool:
        if self._file is not None:
            self._file.close()
        part = next(self._parts, None)
        if part is None:
            self._file = None
            return False
        self._file = open(part, newline="", encoding="utf-8")  # noqa: SIM115 (closed at its end, or by close())
        header = self._file.readline()
        if self.header is None:
            self.header, self._pending = header, header
        elif header != self.header:
            raise StepError(f"{part}: its header differs from the first part's of {part.parent} "
                            f"({header.strip()[:80]!r} against {self.header.strip()[:80]!r})")
        return True

    def read(self, size: int | None = -1) -> str:
        if size is None or size < 0:
            return "".join(self)
        while self._file is not None or self._next_part():
            assert self._file is not None
            text, self._pending = self._pending + self._file.read(size), ""
            if text:
                return text
            self._next_part()
        return ""

    def __iter__(self) -> Iterator[str]:
        while self._file is not None or self._next_part():
            assert self._file is not None
            if self._pending:
                yield self._pending
                self._pending = ""
            yield from self._file
            self._next_part()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TableText:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TableWriter:
    """Writes a table folder atomically, chunk by chunk: each chunk's rows go to the part of their
    :data:`TABLE_PARTITION` value (parts in the order the values first appear). Used as a context manager:
    the folder replaces ``dest`` when the block ends cleanly; an error leaves the previous table whole."""

    def __init__(self, dest: Path | str) -> None:
        self.dest = Path(dest)
        self.rows = 0
        self._parts: dict[str, Path] = {}
        self._order: dict[str, int] = {}
        self._linked: set[str] = set()
        self._columns: list[str] | None = None
        self._tmp: contextlib.AbstractContextManager[Path] | None = None
        self._folder: Path | None = None

    def __enter__(self) -> TableWriter:
        self._tmp = atomic_dir(self.dest)
        self._folder = self._tmp.__enter__()
        return self

    def reserve(self, keys: Iterable[str]) -> None:
        """Give the parts of ``keys`` their places first, in this order (a key that gets no row has no part)."""
        self._order = {key: i for i, key in enumerate(dict.fromkeys(keys))}

    def _new_part(self, key: str) -> Path:
        assert self._folder is not None, "TableWriter is used as a context manager"
        if key in self._parts:
            raise ValueError(f"{self.dest}: the part of {key!r} is written already")
        ordinal = self._order.get(key, len(self._order) + len(self._parts))
        part = self._parts[key] = self._folder / _part_name(ordinal, key)
        return part

    def add_part(self, key: str, source: Path, rows: int) -> None:
        """The part of ``key``: the file ``source`` (a part of an earlier table, its ``rows`` rows) as it is,
        hard-linked where it can be (parts are never written in place), else copied."""
        with open(source, newline="", encoding="utf-8") as f:
            columns = next(csv.reader([f.readline()]), [])
        if self._columns is None:
            self._columns = columns
        elif columns != self._columns:
            raise ValueError(f"{source}: its columns {columns} differ from the table's {self._columns}")
        part = self._new_part(key)
        self._linked.add(key)
        try:
            os.link(source, part)
        except OSError:
            shutil.copyfile(source, part)
        self.rows += rows

    def part_names(self) -> dict[str, str]:
        """Key -> file name of each part written so far."""
        return {key: part.name for key, part in self._parts.items()}

    def write(self, df: pd.DataFrame) -> None:
        assert self._folder is not None, "TableWriter is used as a context manager"
        if self._columns is None:
            self._columns = list(df.columns)
        elif list(df.columns) != self._columns:
            raise ValueError(f"{self.dest}: a chunk's columns {list(df.columns)} differ from {self._columns}")
        if not len(df):
            return
        keys = df[TABLE_PARTITION].astype(str)
        for key in keys.unique():  # in the order of first appearance
            rows = df[(keys == key).to_numpy()]
            part = self._parts.get(key)
            new = part is None
            if part is None:
                part = self._new_part(key)
            elif key in self._linked:
                raise ValueError(f"{self.dest}: rows for {key!r}, whose part was added whole")
            with open(part, "a", newline="", encoding="utf-8") as f:
                rows.to_csv(f, index=False, header=new)
        self.rows += len(df)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        assert self._tmp is not None and self._folder is not None
        if kind is None:
            try:
                if not self._parts:  # no rows: the header alone (none at all without a chunk: a header-less CSV)
                    (self._folder / _EMPTY_PART).write_text(",".join(self._columns or []) + "\n", encoding="utf-8")
                for part in self._folder.iterdir():
                    with open(part, "rb") as f:
                        os.fsync(f.fileno())
            except BaseException as e:  # noqa: BLE001 (handed to atomic_dir, which removes the folder)
                self._tmp.__exit__(type(e), e, e.__traceback__)
                raise
        self._tmp.__exit__(kind, error, tb)


def write_table(dest: Path | str, df: pd.DataFrame) -> None:
    """``df`` as a table folder (:class:`TableWriter`), atomically."""
    with TableWriter(dest) as writer:
        writer.write(df)


# Id-like columns that must stay text (all-digit ids and hex hashes keep their leading zeros).
_STRING_COLUMNS = ("path", "relpath", "root", "class_name", "group", "source_split", "sha256", "mode", "format",
                   "phash", "dup_group", "split_group", "split", "reason", "detail")


_READ_CHUNK_ROWS = 4096  # rows parsed at a time: one parse of a whole table held its text's tokens beside the frame


def read_csv(path: Path | str, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """Read a CSV or a table folder written by medflow (:func:`table_parts`); string columns stay strings (ids
    like '0001' keep their zeros). ``columns``: read only those of them the file has (None: all).
    FileNotFoundError when ``path`` does not exist.

    Parsed :data:`_READ_CHUNK_ROWS` rows at a time and joined (the split table of 27,558 images: 33 -> 23 MB
    at the read's peak); where the chunks' column types differ (a column blank in one chunk, or numbers in one
    and text in another), the file is parsed again whole, so the frame is always the one a single parse gives."""
    import pandas as pd  # not at the top: about 1 s to import, and most steps never read a CSV

    options = _csv_options(columns, {c: str for c in _STRING_COLUMNS})
    with TableText(path) as text:
        chunks = list(pd.read_csv(text, chunksize=_READ_CHUNK_ROWS, **options))
    if len(chunks) == 1:
        return _shared_ids(chunks[0])
    if all(chunk.dtypes.equals(chunks[0].dtypes) for chunk in chunks[1:]):
        return _shared_ids(pd.concat(chunks, ignore_index=True))
    del chunks
    with TableText(path) as text:
        return _shared_ids(pd.read_csv(text, **options))


def table_columns(path: Path | str) -> list[str]:
    """The column names of a CSV or table folder (its header line). FileNotFoundError when it does not exist."""
    with TableText(path) as text:
        return next(csv.reader([next(iter(text), "")]), [])


def text_chunks(path: Path | str, columns: Sequence[str]) -> Iterator[pd.DataFrame]:
    """``columns`` of a CSV or table folder as text, exactly as written (blank cells NaN),
    :data:`_READ_CHUNK_ROWS` rows at a time, each chunk indexed by its rows' positions in the table: for columns a
    step only carries through (written again as they were read, never parsed into numbers)."""
    import pandas as pd

    with TableText(path) as text:
        yield from pd.read_csv(text, chunksize=_READ_CHUNK_ROWS, **_csv_options(columns, str))


def _csv_options(columns: Iterable[str] | None, dtype: Any) -> dict[str, Any]:
    """``pd.read_csv`` options of medflow's tables: blank cells (only) are NaN; ``columns`` those of them the file
    has (None: all)."""
    wanted = None if columns is None else set(columns)
    return {"dtype": dtype, "keep_default_na": False, "na_values": [""],
            "usecols": None if wanted is None else wanted.__contains__}


# (column, column whose equal values it takes): a near-duplicate group is named by its first member's sha256, a
# split unit by its smallest patient id, and most images are their own near-duplicate group and most patients
# their own unit.
_SHARED = (("dup_group", "sha256"), ("split_group", "group"))


def _shared_ids(df: pd.DataFrame) -> pd.DataFrame:
    """Where an id equals the one it is named after (:data:`_SHARED`), it becomes the very string of that one: one
    string object a row less each (about 110 bytes for a sha256, 50 for a patient id)."""
    for column, source in _SHARED:
        if column in df.columns and source in df.columns and len(df):
            same = (df[column] == df[source]).fillna(False).to_numpy(dtype=bool)
            df[column] = df[column].where(~same, df[source])
    return df


# --- The image store: the resize step's output, read by validate, train, evaluate, predict and challenge ----
# A folder: ``index.json`` (the row index) and ``shards/<name>.bin``, immutable files of raw C-ordered uint8
# rows of one image geometry each. Row ``i`` of the store (= row ``i`` of the clean table) is slot ``slot[i]`` of
# shard ``shard[i]`` (an index into ``shards``), or missing (shard -1: a file resize could not decode, read
# as zeros). The writer is medflow.imaging.store; this is the one definition of the format.
STORE_FORMAT = "medflow-image-store"
STORE_VERSION = 1
STORE_INDEX = "index.json"
STORE_SHARDS = "shards"
SHARD_SUFFIX = ".bin"
MISSING = -1  # the shard of a row without pixels (resize_rejects.csv lists it): it reads as zeros


class ImageStore:
    """The resize step's images, read-only: each shard memory-mapped, never copied into one array.

    Behaves like the ``(N, height, width, channels)`` uint8 array it stands for where the readers need it:
    ``shape``, ``dtype``, ``ndim``, ``len()`` and ``store[rows]`` (an int, a slice or an integer array; a
    new array, rows in the order asked). :meth:`locations` orders rows so that a gather reads each shard's
    rows together (training sorts its shuffled batches by it). StepError naming the file when the index is
    missing or unreadable, or a shard is missing or shorter than the index says.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        index = read_store_index(self.path)
        self.shape: tuple[int, int, int, int] = index["shape"]
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self.shard = np.asarray(index["shard"], dtype=np.int64)
        self.slot = np.asarray(index["slot"], dtype=np.int64)
        self.shard_names: list[str] = index["shards"]
        self._row_bytes = int(np.prod(self.shape[1:]))
        self._maps: dict[int, np.memmap] = {}
        self._slots = self._check_shards()
        self._stride = int(self._slots.max(initial=0)) + 1  # (shard, slot) -> one sortable number

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r}, shape={self.shape}, shards={len(self.shard_names)})"

    def shard_path(self, shard: int) -> Path:
        return self.path / STORE_SHARDS / self.shard_names[shard]

    def locations(self, rows: np.ndarray) -> np.ndarray:
        """A sort key of ``rows`` by where they lie (shard, then slot): rows of one shard sort together."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.shard[rows] * self._stride + self.slot[rows]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            return self[np.array([rows])][0]
        index = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        if index.size == 0:
            index = index.astype(np.int64)
        if index.dtype == bool or index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise TypeError(f"{self.path}: rows must be an int, a slice or a 1-d integer array")
        index = np.where(index < 0, index + len(self), index)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"{self.path}: row out of range 0..{len(self) - 1}")
        return self._gather(index)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """One copy per row out of the shards' page cache where rows of one shard are next to each other (a
        batch sorted by :meth:`locations`): ``np.take(out=, mode="clip")`` writes straight into the result
        (it does not buffer in that mode; the index was checked). Otherwise one temporary per shard."""
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        if not len(rows):
            return out
        shards, slots = self.shard[rows], self.slot[rows]
        if np.all(shards[1:] >= shards[:-1]):
            cuts = (np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist()
            for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True):
                self._take(int(shards[a]), slots[a:b], out[a:b])
            return out
        for shard in np.unique(shards).tolist():
            where = np.flatnonzero(shards == shard)
            part = np.empty((len(where), *self.shape[1:]), np.uint8)
            self._take(shard, slots[where], part)
            out[where] = part
        return out

    def _take(self, shard: int, slots: np.ndarray, out: np.ndarray) -> None:
        if shard == MISSING:
            out[...] = 0
        else:
            np.take(self._map(shard), slots, axis=0, out=out, mode="clip")

    def _map(self, shard: int) -> np.memmap:
        mapped = self._maps.get(shard)
        if mapped is None:
            path = self.shard_path(shard)
            try:
                mapped = np.memmap(path, np.uint8, "r", shape=(int(self._slots[shard]), *self.shape[1:]))
            except (OSError, ValueError) as e:
                raise StepError(f"{path}: cannot read this image shard: {e}") from None
            self._maps[shard] = mapped
        return mapped

    def _check_shards(self) -> np.ndarray:
        """Slots each shard holds (its size / one row); StepError naming a shard missing or too short."""
        slots = np.zeros(len(self.shard_names), np.int64)
        present = self.shard != MISSING
        if np.any(present & ((self.shard < 0) | (self.shard >= len(self.shard_names)) | (self.slot < 0))):
            raise StepError(f"{self.path / STORE_INDEX}: damaged index (a row points at no shard)")
        need = np.zeros(len(self.shard_names), np.int64)
        np.maximum.at(need, self.shard[present], self.slot[present] + 1)
        for i, name in enumerate(self.shard_names):
            path = self.path / STORE_SHARDS / name
            try:
                size = path.stat().st_size
            except OSError as e:
                raise StepError(f"{path}: image shard missing or unreadable ({e.strerror or e}): re-run the "
                                "resize step") from None
            slots[i] = size // self._row_bytes
            if slots[i] < need[i]:
                raise StepError(f"{path}: image shard damaged: {size} bytes, the index needs "
                                f"{need[i] * self._row_bytes} (re-run the resize step)")
        return slots


def read_store_index(path: Path | str) -> dict[str, Any]:
    """The checked row index of the image store at ``path``: shape (a 4-tuple), shards, shard, slot (lists)
    and keys; StepError naming the index when it is missing, unreadable or not the store's format."""
    index_path = Path(path) / STORE_INDEX
    try:
        index = read_json(index_path)
    except FileNotFoundError:
        what = "an images.npy of an older medflow: re-run the resize step" if Path(path).suffix == ".npy" \
            else "run the resize step first"
        raise StepError(f"{index_path}: image store index not found ({what})") from None
    except (OSError, ValueError) as e:
        raise StepError(f"{index_path}: not a readable image store index: {e}") from None
    try:
        shape = tuple(int(v) for v in index["shape"])
        ok = (index["format"] == STORE_FORMAT and index["version"] == STORE_VERSION and index["dtype"] == "uint8"
              and len(shape) == 4 and min(shape) >= 0 and len(index["shard"]) == len(index["slot"]) == shape[0]
              and isinstance(index["shards"], list))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise StepError(f"{index_path}: not an image store index of this medflow ({STORE_FORMAT} "
                        f"version {STORE_VERSION}): re-run the resize step")
    return {**index, "shape": shape}


def open_images(path: Path | str) -> ImageStore:
    """Open the image store the resize step wrote at ``path`` (:class:`ImageStore`); StepError naming the
    file when it cannot be read."""
    return ImageStore(path)


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

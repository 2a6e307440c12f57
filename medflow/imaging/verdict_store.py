"""The filter's verdicts held column by column: sha256 -> :class:`~medflow.imaging.verdict.Verdict`, compact.

A :class:`Verdict` object with its hex pHash and base64 thumbnail costs about 1 KB of Python objects; here one
verdict is a row of NumPy arrays, about 900 bytes: the sha256 (64 ASCII bytes), the pHash (uint64), the
thumbnail (``THUMB_SIDE^2`` uint8), the crop frames (each a big-endian pHash and a thumbnail, uint8), width
and height (int64), and one pointer each for the strings (reason,
detail, mode, format: the same few objects shared by every row; a detail is "" for a good file). Rows are kept
sorted by sha256, found by binary search. A :class:`Verdict` is made only for the row asked for.

Adding a fixed-size per-image field: one entry in :data:`ARRAYS` (dtype, shape, and how a Verdict's value
becomes the row's value and back), and the index format's version in medflow.imaging.quality bumped.

Saved as one uncompressed ``.npz`` (NumPy arrays, no pickles): the arrays of :data:`ARRAYS` under their
names, ``sha256``, and each string column as its UTF-8 bytes (``<name>.text``) with each row's end offset
(``<name>.end``); a JSON header (``header``) says the format and the cache key. It loads as a few array reads,
with no per-row parse except of the strings, which are shared (only the distinct ones are made).

A loaded store keeps the thumbnail and crop-frame columns (:data:`ON_DISK`, about 780 of the 900 bytes a
verdict) in the file: rows are read when asked for (:class:`_FileColumn`: the candidate pairs' thumbnails, the
crop frames' hashes a block at a time), so the filter's memory holds about 120 bytes a verdict. Saving streams
those columns :data:`_BLOCK_ROWS` rows at a time (:func:`save_stores`, which also merges stores), and the
file a store reads stays open: an index saved over it is a new file, and this store still reads its own.
"""

from __future__ import annotations

import base64
import json
import os
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from medflow.imaging import phash
from medflow.imaging.verdict import Verdict
from medflow.io import atomic_open


class Column(NamedTuple):
    """One fixed-size per-image field: its dtype and shape per row, and its conversion from and to a Verdict's
    text value (good images only; a bad one's row holds zeros and its Verdict "")."""

    dtype: type[np.generic]
    shape: tuple[int, ...]
    pack: Callable[[str], Any]
    unpack: Callable[[Any], str]


def _thumb_bytes(text: str) -> npt.NDArray[np.uint8]:
    return phash.thumbnails([text])[0]


def _thumb_text(row: npt.NDArray[np.uint8]) -> str:
    return base64.b64encode(row.tobytes()).decode("ascii")


_FRAME_BYTES = 8 + phash.THUMB_SIDE * phash.THUMB_SIDE  # one crop frame: its pHash (big-endian) and thumbnail


def _crops_bytes(text: str) -> npt.NDArray[np.uint8]:
    """The crop frames' text (:func:`medflow.imaging.phash.crop_frames`) as one row of bytes; ValueError if
    malformed."""
    out = np.empty(_FRAME_BYTES * len(phash.CROP_SCALES), dtype=np.uint8)
    for f, (value, thumb) in enumerate(phash.crop_frame_parts(text)):
        out[f * _FRAME_BYTES:f * _FRAME_BYTES + 8] = np.frombuffer(value.to_bytes(8, "big"), dtype=np.uint8)
        out[f * _FRAME_BYTES + 8:(f + 1) * _FRAME_BYTES] = thumb
    return out


def _crops_text(row: npt.NDArray[np.uint8]) -> str:
    frames = (row[f * _FRAME_BYTES:(f + 1) * _FRAME_BYTES] for f in range(len(phash.CROP_SCALES)))
    return "".join(frame[:8].tobytes().hex() + _thumb_text(frame[8:]) for frame in frames)


ARRAYS: dict[str, Column] = {
    "phash": Column(np.uint64, (), lambda text: phash.from_hex(text), lambda v: phash.to_hex(int(v))),
    "thumb": Column(np.uint8, (phash.THUMB_SIDE * phash.THUMB_SIDE,), _thumb_bytes, _thumb_text),
    "crops": Column(np.uint8, (_FRAME_BYTES * len(phash.CROP_SCALES),), _crops_bytes, _crops_text),
}
STRINGS = ("reason", "detail", "mode", "format")
INTS = ("width", "height")
ON_DISK = ("thumb", "crops")  # left in the file when a store is loaded, read by the rows asked for
_BLOCK_ROWS = 2048  # rows of an on-disk column read or written at a time (1.1 MB of crop frames)
_SHA = "sha256"
_O_READ = os.O_RDONLY | getattr(os, "O_BINARY", 0)
_EPOCH = (1980, 1, 1, 0, 0, 0)
_HEX = np.zeros(256, dtype=bool)  # which bytes are lowercase hex digits
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = True
if {f.name for f in fields(Verdict)} != {*ARRAYS, *STRINGS, *INTS}:
    raise ImportError("verdict_store: Verdict's fields and the store's columns differ")  # a new field: add it


class _OpenFile:
    """A saved store's file, open for reading while a column reads it (closed when the last one is gone)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)


class _FileColumn:
    """A (n, width) uint8 column of a saved store, read from its file: ``column[rows]`` (an int, an int or bool
    array, or a (rows, slice) pair) reads those rows alone, a dense set a block at a time; :meth:`read_into`
    reads a range. Shape and dtype are the array's it stands for."""

    dtype = np.dtype(np.uint8)
    ndim = 2

    def __init__(self, file: _OpenFile, offset: int, shape: tuple[int, int]) -> None:
        self._file, self._offset, self.shape = file, offset, shape

    def __len__(self) -> int:
        return self.shape[0]

    def read_into(self, out: npt.NDArray[np.uint8], start: int) -> None:
        """Rows ``start`` to ``start + len(out)`` into ``out`` (C-contiguous); ValueError if the file is shorter."""
        want = out.nbytes
        got = os.preadv(self._file.fd, [out.data.cast("B")], self._offset + start * self.shape[1]) \
            if want else 0
        if got != want:
            raise ValueError(f"the verdict index file ends inside a column ({got} of {want} bytes read)")

    def __getitem__(self, key: Any) -> npt.NDArray[np.uint8]:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if not isinstance(cols, slice):
            raise TypeError("columns of an on-disk column: a slice")
        if isinstance(rows, int | np.integer):
            return self._gather(np.array([int(rows)], dtype=np.int64), cols)[0]
        picked = np.asarray(rows)
        picked = np.flatnonzero(picked) if picked.dtype == bool else picked.astype(np.int64).reshape(-1)
        return self._gather(picked, cols)

    def _gather(self, rows: npt.NDArray[np.int64], cols: slice) -> npt.NDArray[np.uint8]:
        """``rows`` (any order, repeats allowed) of columns ``cols``, read block by block into one buffer: a
        dense block read whole, a sparse one by its runs of rows; only the columns asked for are kept."""
        n = self.shape[0]
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row out of range for a column of {n} rows")
        rows = np.where(rows < 0, rows + n, rows)
        wanted, back = np.unique(rows, return_inverse=True)
        width = len(range(*cols.indices(self.shape[1])))
        found = np.empty((len(wanted), width), dtype=np.uint8)
        buffer = np.empty((min(_BLOCK_ROWS, n), self.shape[1]), dtype=np.uint8)
        at = 0
        while at < len(wanted):
            first = int(wanted[at])
            end = int(np.searchsorted(wanted, first + _BLOCK_ROWS))
            part = wanted[at:end]
            if len(part) * 8 >= _BLOCK_ROWS:
                block = buffer[:int(part[-1]) + 1 - first]
                self.read_into(block, first)
                found[at:end] = block[part - first, cols]
            else:
                breaks = np.flatnonzero(np.diff(part) != 1) + 1
                for a, b in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(part)].tolist(), strict=True):
                    run = buffer[:b - a]
                    self.read_into(run, int(part[a]))
                    found[at + a:at + b] = run[:, cols]
            at = end
        in_order = len(wanted) == len(rows) and bool((wanted == rows).all())
        return found if in_order else found[back]


class _FrameThumbs:
    """The thumbnails of the frames of the store's ``rows`` (:class:`medflow.imaging.phash.FrameThumbs`)."""

    def __init__(self, thumb: npt.NDArray[np.uint8], crops: npt.NDArray[np.uint8],
                 rows: npt.NDArray[np.int64]) -> None:
        self._thumb, self._crops, self._rows = thumb, crops, rows
        self.shape = (len(rows), phash.FRAMES, phash.THUMB_SIDE * phash.THUMB_SIDE)

    def __getitem__(self, frames: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        frames = np.asarray(frames, dtype=np.int64)
        image, frame = np.divmod(frames, phash.FRAMES)
        rows = self._rows[image]
        out = np.empty((len(frames), self.shape[2]), dtype=np.uint8)
        full = frame == 0
        out[full] = self._thumb[rows[full]]
        for f in range(len(phash.CROP_SCALES)):
            at, chosen = f * _FRAME_BYTES, frame == f + 1
            out[chosen] = self._crops[rows[chosen], at + 8:at + _FRAME_BYTES]
        return out


@dataclass
class VerdictStore(Mapping[str, Verdict]):
    """Verdicts by sha256 (a read-only mapping); rows sorted by sha256. Build one with :meth:`build`."""

    sha: npt.NDArray[np.bytes_]  # (n,) S64, sorted, unique
    # ARRAYS, INTS (int64) and STRINGS (object) by name, n rows each: arrays, or ON_DISK columns of a loaded
    # store as _FileColumns
    columns: dict[str, Any]

    @classmethod
    def empty(cls) -> VerdictStore:
        return cls.build([])

    @classmethod
    def build(cls, items: Iterable[tuple[str, Verdict]]) -> VerdictStore:
        """A store of (sha256, Verdict) pairs (a later pair of the same sha256 wins)."""
        pairs = dict(items)
        n = len(pairs)
        cols: dict[str, npt.NDArray[Any]] = {name: np.zeros((n, *c.shape), dtype=c.dtype) for name, c in ARRAYS.items()}
        cols.update({name: np.zeros(n, dtype=np.int64) for name in INTS})
        cols.update({name: np.empty(n, dtype=object) for name in STRINGS})
        for k, v in enumerate(pairs.values()):
            for name, c in ARRAYS.items():
                if v.ok:
                    cols[name][k] = c.pack(getattr(v, name))
            for name in (*INTS, *STRINGS):
                cols[name][k] = getattr(v, name)
        return cls(np.array(list(pairs), dtype="S64").reshape(n), cols)._sorted()

    def _sorted(self) -> VerdictStore:
        order = np.argsort(self.sha, kind="stable")
        return VerdictStore(self.sha[order], {name: col[order] for name, col in self.columns.items()})

    @classmethod
    def concat(cls, stores: list[VerdictStore]) -> VerdictStore:
        """One store of ``stores`` (a later store wins for a sha256 in two), each column written once, straight
        into its place in the sorted result (no concatenated copy sorted again); a single non-empty store is
        returned as it is."""
        stores = [store for store in stores if len(store)]
        if len(stores) <= 1:
            return stores[0] if stores else cls.empty()
        sha, which, rows = _merge_rows(stores)
        return cls(sha, {name: _gathered(stores, name, which, rows) for name in stores[0].columns})

    def merged(self, newer: VerdictStore) -> VerdictStore:
        """This store with ``newer``'s rows added (``newer`` wins for a sha256 in both): :meth:`concat` of the two."""
        return VerdictStore.concat([self, newer])

    def rows(self, shas: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Row of each sha256 (hex text or S64), -1 where absent; looked up :data:`_BLOCK_ROWS` at a time (no
        S64 copy of all the keys: 1.8 MB at 27,558, made at every lookup)."""
        given = np.asarray(shas)
        given = given.reshape(-1) if given.dtype.kind == "S" else np.asarray(shas, dtype=object).reshape(-1)
        out = np.full(len(given), -1, dtype=np.int64)
        for at in range(0, len(given), _BLOCK_ROWS):
            keys = np.asarray(given[at:at + _BLOCK_ROWS], dtype="S64")
            pos = np.searchsorted(self.sha, keys)
            inside = np.flatnonzero(pos < len(self.sha))
            hit = inside[self.sha[pos[inside]] == keys[inside]]
            out[at + hit] = pos[hit]
        return out

    def take(self, rows: npt.NDArray[np.int64]) -> VerdictStore:
        """The store of these (distinct, present) rows."""
        return VerdictStore(self.sha[rows], {name: col[rows] for name, col in self.columns.items()})._sorted()

    def verdict(self, row: int) -> Verdict:
        """The Verdict of one row."""
        c = self.columns
        values: dict[str, Any] = {name: c[name][row] for name in STRINGS}
        values.update({name: int(c[name][row]) for name in INTS})
        ok = not values["reason"]
        values.update({name: col.unpack(c[name][row]) if ok else "" for name, col in ARRAYS.items()})
        return Verdict(**values)

    def frames(self, shas: npt.ArrayLike) -> tuple[npt.NDArray[np.uint64], _FrameThumbs]:
        """The frames of each sha256's (present, good) verdict as :func:`medflow.imaging.phash.frames` gives them
        from the texts: (n, FRAMES) hashes, full frame first, and their thumbnails as a
        :class:`~medflow.imaging.phash.FrameThumbs` that reads the columns for the frames asked for (the
        candidate pairs), not a (n, FRAMES, THUMB_SIDE^2) copy (21 MB at 27,558 verdicts)."""
        rows = self.rows(shas)
        if (rows < 0).any():
            raise KeyError(np.asarray(shas).reshape(-1)[int(np.argmax(rows < 0))])
        crops = self.columns["crops"]
        hashes = np.empty((len(rows), phash.FRAMES), dtype=np.uint64)
        hashes[:, 0] = self.columns["phash"][rows]
        for f in range(len(phash.CROP_SCALES)):  # frame by frame: the 8 bytes of each hash alone are gathered
            at = f * _FRAME_BYTES
            hashes[:, f + 1] = np.ascontiguousarray(crops[rows, at:at + 8]).view(">u8")[:, 0]
        return hashes, _FrameThumbs(self.columns["thumb"], crops, rows)

    def ok(self, shas: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Per sha256: whether the store holds a good verdict for it (an absent one is not good)."""
        rows = self.rows(shas)
        return (rows >= 0) & (self.columns["reason"][np.maximum(rows, 0)] == "") if len(self) else rows >= 0

    def field_values(self, name: str, shas: npt.ArrayLike) -> list[Any]:
        """Field ``name`` of the Verdict of each sha256 (all present), without making the Verdicts."""
        rows = self.rows(shas)
        if (rows < 0).any():
            raise KeyError(np.asarray(shas).reshape(-1)[int(np.argmax(rows < 0))])
        col = self.columns[name]
        if name not in ARRAYS:
            return [int(v) for v in col[rows]] if name in INTS else list(col[rows])
        unpack, ok = ARRAYS[name].unpack, self.columns["reason"][rows] == ""
        return [unpack(col[r]) if good else "" for r, good in zip(rows.tolist(), ok.tolist(), strict=True)]

    def __getitem__(self, sha: str) -> Verdict:
        row = int(self.rows([sha])[0])
        if row < 0:
            raise KeyError(sha)
        return self.verdict(row)

    def __contains__(self, sha: object) -> bool:
        return isinstance(sha, str) and bool(self.rows([sha])[0] >= 0)

    def __iter__(self) -> Iterator[str]:
        return (s.decode("ascii") for s in self.sha)

    def __len__(self) -> int:
        return len(self.sha)

    # ---------------------------------------------------------------------------------------------------
    # the file

    def save(self, path: Path, header: dict[str, Any]) -> None:
        """Write the store and ``header`` (JSON) to ``path`` atomically (temp file, fsync, rename)."""
        save_stores(path, header, [self])

    @classmethod
    def load(cls, path: Path) -> tuple[VerdictStore, dict[str, Any]]:
        """(store, header) of a file :meth:`save` wrote, its :data:`ON_DISK` columns left in the file; ValueError
        saying what is wrong with it (any doubt rejects the whole file); OSError when it cannot be read."""
        return cls.from_file(os.open(path, _O_READ))

    @classmethod
    def from_file(cls, fd: int) -> tuple[VerdictStore, dict[str, Any]]:
        """:meth:`load` of the open file ``fd`` (the store owns it from here on)."""
        file = _OpenFile(fd)
        with os.fdopen(os.dup(fd), "rb") as fh:
            try:
                if fh.read(4) != b"PK\x03\x04":
                    raise ValueError("not an .npz file")
                with zipfile.ZipFile(fh) as z:
                    members = z.infolist()
                    files = {_array_name(info): _member(fh, info, file) for info in members}
            except (zipfile.BadZipFile, EOFError, KeyError, OSError) as e:  # ValueError passes as it is
                raise ValueError(f"not a readable .npz file ({type(e).__name__}: {e})") from None
        if len(files) != len(members):
            raise ValueError("an array stored twice")
        try:
            header = json.loads(np.asarray(files.pop("header")).tobytes())
        except KeyError:
            raise ValueError("no header") from None
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return cls._checked(files), header

    @classmethod
    def _checked(cls, files: dict[str, npt.NDArray[Any]]) -> VerdictStore:
        names = {_SHA, *ARRAYS, *INTS, *(f"{s}.{part}" for s in STRINGS for part in ("text", "end"))}
        if set(files) != names:
            raise ValueError(f"arrays {sorted(files)}, expected {sorted(names)}")
        sha = files[_SHA]
        n = len(sha)
        if sha.dtype != np.dtype("S64") or sha.ndim != 1:
            raise ValueError(f"sha256 array of {sha.dtype} {sha.shape}")
        if n and (not _HEX[sha.view(np.uint8)].all() or not (sha[1:] > sha[:-1]).all()):
            raise ValueError("sha256 values not lowercase hex, or not sorted and distinct")
        cols: dict[str, npt.NDArray[Any]] = {}
        for name, c in ARRAYS.items():
            cols[name] = _expect(files[name], name, np.dtype(c.dtype), (n, *c.shape))
        for name in INTS:
            cols[name] = _expect(files[name], name, np.dtype(np.int64), (n,))
        for name in STRINGS:
            cols[name] = _strings(files[f"{name}.text"], files[f"{name}.end"], n, name)
        return cls(sha, cols)


def _expect(array: npt.NDArray[Any], name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    if array.dtype != dtype or array.shape != shape:
        raise ValueError(f"column {name}: {array.dtype} {array.shape}, expected {dtype} {shape}")
    return array


def _strings(text: npt.NDArray[Any], end: npt.NDArray[Any], n: int, name: str) -> npt.NDArray[np.object_]:
    """A string column from its UTF-8 bytes and row end offsets; equal strings share one object."""
    if text.dtype != np.uint8 or text.ndim != 1 or end.dtype != np.int64 or end.shape != (n,):
        raise ValueError(f"column {name}: text {text.dtype} {text.shape}, ends {end.dtype} {end.shape}")
    start = np.r_[0, end[:-1]] if n else end
    if n and (end[-1] != len(text) or (end < start).any() or start[0] != 0):
        raise ValueError(f"column {name}: row offsets do not cover its text")
    raw = text.tobytes()
    out = np.empty(n, dtype=object)
    shared: dict[bytes, str] = {}
    try:
        for k, (a, b) in enumerate(zip(start.tolist(), end.tolist(), strict=True)):
            part = raw[a:b]
            value = shared.get(part)
            if value is None:
                value = shared[part] = part.decode("utf-8")
            out[k] = value
    except UnicodeDecodeError as e:
        raise ValueError(f"column {name}: not UTF-8 ({e})") from None
    return out


def _array_name(info: zipfile.ZipInfo) -> str:
    if not info.filename.endswith(".npy"):
        raise ValueError(f"{info.filename}: not an array")
    return info.filename[:-4]


def _member(fh: IO[bytes], info: zipfile.ZipInfo, file: _OpenFile) -> Any:
    """The array stored as ``info``: read (a small column), or a :class:`_FileColumn` (an :data:`ON_DISK` one)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{info.filename}: compressed (the index is written uncompressed)")
    fh.seek(info.header_offset)
    local = fh.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{info.filename}: no local header")
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    fh.seek(start)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"{info.filename}: .npy version {version}")
    if fortran or dtype.hasobject:
        raise ValueError(f"{info.filename}: {'Fortran-ordered' if fortran else 'object'} array")
    offset = fh.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > start + info.file_size:
        raise ValueError(f"{info.filename}: {nbytes} bytes of data in a member of {info.file_size}")
    if _array_name(info) in ON_DISK and dtype == np.uint8 and len(shape) == 2:
        return _FileColumn(file, offset, (int(shape[0]), int(shape[1])))
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"{info.filename}: the file ends inside it")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _merge_rows(stores: Sequence[VerdictStore]) -> tuple[npt.NDArray[np.bytes_], npt.NDArray[np.int64],
                                                          npt.NDArray[np.int64]]:
    """The merged rows of ``stores`` (a later store wins for a sha256 in two), sorted: their sha256, and for each
    the store it comes from and its row there."""
    if len(stores) == 1:
        n = len(stores[0])
        return stores[0].sha, np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    sha = np.concatenate([store.sha for store in stores])
    order = np.argsort(sha, kind="stable")
    ordered = sha[order]
    rows = order[np.r_[ordered[1:] != ordered[:-1], True]] if len(sha) else order  # the latest of each sha256
    bounds = np.cumsum([0, *(len(store) for store in stores)])
    which = np.searchsorted(bounds, rows, side="right") - 1
    return sha[rows], which, rows - bounds[which]


def _gathered(stores: Sequence[VerdictStore], name: str, which: npt.NDArray[np.int64],
              rows: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
    """Column ``name`` of the merged rows (:func:`_merge_rows`), in memory."""
    first = stores[0].columns[name]
    out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
    for k, store in enumerate(stores):
        mine = which == k
        out[mine] = store.columns[name][rows[mine]]
    return out


def _write_array(z: zipfile.ZipFile, name: str, array: npt.NDArray[Any]) -> None:
    """One member as np.savez writes it, with a fixed time stamp: equal stores, equal files."""
    with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _write_gathered(z: zipfile.ZipFile, name: str, stores: Sequence[VerdictStore], which: npt.NDArray[np.int64],
                    rows: npt.NDArray[np.int64]) -> None:
    """Column ``name`` of the merged rows, written :data:`_BLOCK_ROWS` rows at a time (byte for byte what
    :func:`_write_array` writes of the whole column)."""
    first = stores[0].columns[name]
    shape, dtype = (len(rows), *first.shape[1:]), np.dtype(first.dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    block = np.empty((min(_BLOCK_ROWS, len(rows)), *shape[1:]), dtype=dtype)  # one buffer for every block
    with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for at in range(0, len(rows), _BLOCK_ROWS):
            part_which, part_rows = which[at:at + _BLOCK_ROWS], rows[at:at + _BLOCK_ROWS]
            out = block[:len(part_rows)]
            for k, store in enumerate(stores):
                mine = part_which == k
                if mine.all() and isinstance(store.columns[name], _FileColumn) \
                        and part_rows[-1] - part_rows[0] == len(part_rows) - 1:
                    store.columns[name].read_into(out, int(part_rows[0]))  # a run of one file: read in place
                elif mine.any():
                    out[mine] = store.columns[name][part_rows[mine]]
            member.write(out.data)


def _strings_arrays(values: npt.NDArray[np.object_]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """A string column as its UTF-8 bytes and each row's end offset, each distinct string encoded once."""
    encoded: dict[str, bytes] = {}
    for value in values:
        if value not in encoded:
            encoded[value] = value.encode()
    ends = np.cumsum(np.fromiter((len(encoded[v]) for v in values), dtype=np.int64, count=len(values)))
    return np.frombuffer(b"".join(encoded[v] for v in values), dtype=np.uint8), ends


def save_stores(path: Path, header: dict[str, Any], stores: Sequence[VerdictStore], *, fsync: bool = True,
                reopen: bool = False) -> VerdictStore | None:
    """Write the merged rows of ``stores`` (a later store wins for a sha256 in two; :meth:`VerdictStore.concat`'s
    rows) and ``header`` to ``path`` atomically, :data:`ON_DISK` columns streamed a block at a time from their
    stores (a loaded store's from its file), so no merged copy of them is held. ``reopen``: return the store
    written, loaded from the very file written (not from ``path``, which another run may replace meanwhile)."""
    sha, which, rows = _merge_rows(stores)
    with atomic_open(path, "wb", fsync=fsync) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            _write_array(z, "header", np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8))
            _write_array(z, _SHA, sha)
            for name in stores[0].columns:
                if name in ON_DISK:
                    _write_gathered(z, name, stores, which, rows)
                    continue
                column = _gathered(stores, name, which, rows)
                if name in STRINGS:
                    text, ends = _strings_arrays(column)
                    _write_array(z, f"{name}.text", text)
                    _write_array(z, f"{name}.end", ends)
                else:
                    _write_array(z, name, column)
        f.flush()
        fd = os.open(f.name, _O_READ) if reopen else None
    return None if fd is None else VerdictStore.from_file(fd)[0]

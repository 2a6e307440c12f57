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
"""

from __future__ import annotations

import base64
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

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
_SHA = "sha256"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_HEX = np.zeros(256, dtype=bool)  # which bytes are lowercase hex digits
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = True
if {f.name for f in fields(Verdict)} != {*ARRAYS, *STRINGS, *INTS}:
    raise ImportError("verdict_store: Verdict's fields and the store's columns differ")  # a new field: add it


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
    columns: dict[str, npt.NDArray[Any]]  # ARRAYS, INTS (int64) and STRINGS (object) by name, n rows each

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
        sha = np.concatenate([store.sha for store in stores])
        order = np.argsort(sha, kind="stable")
        ordered = sha[order]
        last = np.r_[ordered[1:] != ordered[:-1], True]  # the last of each run of one sha256: the latest store's
        rows = order[last]  # into the stores' rows laid end to end, in the result's order
        dest = np.full(len(sha), -1, dtype=np.int64)
        dest[rows] = np.arange(len(rows))
        columns = {}
        for name, first in stores[0].columns.items():
            out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
            at = 0
            for store in stores:
                to = dest[at:at + len(store)]
                out[to[to >= 0]] = store.columns[name][to >= 0]
                at += len(store)
            columns[name] = out
        return cls(sha[rows], columns)

    def merged(self, newer: VerdictStore) -> VerdictStore:
        """This store with ``newer``'s rows added (``newer`` wins for a sha256 in both): :meth:`concat` of the two."""
        return VerdictStore.concat([self, newer])

    def rows(self, shas: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Row of each sha256 (hex text or S64), -1 where absent."""
        keys = np.asarray(shas, dtype="S64").reshape(-1)
        pos = np.searchsorted(self.sha, keys)
        inside = pos < len(self.sha)
        hit = np.zeros(len(keys), dtype=bool)
        hit[inside] = self.sha[pos[inside]] == keys[inside]
        return np.where(hit, pos, -1).astype(np.int64)

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
        for f in range(len(phash.CROP_SCALES)):  # frame by frame: no copy of the whole crops column
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
        arrays: dict[str, npt.NDArray[Any]] = {
            "header": np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8), _SHA: self.sha}
        for name, col in self.columns.items():
            if name in STRINGS:
                encoded = [s.encode() for s in col]
                arrays[f"{name}.text"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
                arrays[f"{name}.end"] = np.cumsum([len(b) for b in encoded], dtype=np.int64)
            else:
                arrays[name] = col
        with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            for name, array in arrays.items():  # np.savez's layout, with a fixed time stamp: equal stores, equal files
                with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> tuple[VerdictStore, dict[str, Any]]:
        """(store, header) of a file :meth:`save` wrote; ValueError saying what is wrong with it (any doubt
        rejects the whole file); OSError when it cannot be read."""
        with open(path, "rb") as fh:
            try:
                npz = np.load(fh, allow_pickle=False)
                if not isinstance(npz, np.lib.npyio.NpzFile):
                    raise ValueError("a single array, not an .npz file")
                with npz:
                    files = {name: npz[name] for name in npz.files}
            except (zipfile.BadZipFile, EOFError, KeyError, OSError) as e:  # ValueError passes as it is
                raise ValueError(f"not a readable .npz file ({type(e).__name__}: {e})") from None
        try:
            header = json.loads(files.pop("header").tobytes())
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

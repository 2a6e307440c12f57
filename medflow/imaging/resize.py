"""Resize step: every clean image -> one uint8 array ``(N, size, size, channels)`` saved as ``.npy``.

Output format. Row ``i`` of the array is row ``i`` of clean.csv. The file is a plain ``.npy`` (a header,
then the raw C-ordered bytes), so training opens it with ``np.load(path, mmap_mode="r")`` and slices
batches straight from the page cache: zero decode cost per epoch, and no need to hold the dataset in RAM.
It is written with plain writes, one image at a time at its row's offset, so the step's peak memory does
not grow with the dataset (no array of all images, no memory map whose dirty pages pile up), and
atomically (a temporary file renamed into place): a crash leaves no half-written array under its name.

Preprocessing (the single source of truth: training, evaluation and prediction all go through
:func:`load_resized` / :func:`decode_resized`):

- JPEG in mode L or RGB is decoded by libjpeg-turbo (through simplejpeg, its TurboJPEG API) in the DCT
  domain at the smallest of the scales 1/8, 2/8, ..., 8/8 that leaves both sides at least ``size``
  (:func:`jpeg_scale`), so nothing is upsampled afterwards. The entropy decoding still runs in full, the
  inverse DCT and colour conversion on up to 64 times fewer pixels, and the area resize that follows
  shrinks by less than 8/7 per side. (OpenCV's ``IMREAD_REDUCED_*`` only offers 1/2, 1/4 and 1/8, so a
  600 px X-ray is decoded at 300 px instead of 225; its ``imdecode`` is also slower at equal scale.) The
  EXIF orientation is read from the APP1 segment (:func:`jpeg_orientation`) and applied to the decoded
  pixels. DCT scaling is a slightly different low-pass than a box average: on the 120 full-resolution
  Kermany X-rays the result is on average 0.7 grey levels from a full decode + INTER_AREA (3.0 for the
  worst image; single pixels on burned-in text up to 150).
- Everything else (PNG, BMP, TIFF, GIF, WebP, CMYK or 12-bit JPEG, ...) is decoded by Pillow and
  normalised: EXIF orientation applied; 16-bit and 32-bit modes (``I;16``, ``I``, ``F``) scaled to 8 bits
  by the image's own range (min -> 0, max -> 255; a constant image -> 0), because 12-bit data stored in
  16-bit PNGs would come out nearly black with a fixed ``>> 8``; palette -> RGB (RGBA if it has a
  transparent colour); any alpha composited over black; CMYK, YCbCr, LAB, HSV -> RGB.
- Channels: 1 -> ITU-R 601 luma (what JPEG's Y, Pillow's ``L`` and ``cv2.COLOR_BGR2GRAY`` compute);
  3 -> RGB order (never OpenCV's BGR); grayscale sources are replicated into three channels when asked.
- Geometry: stretched to ``size x size`` (aspect ratio not kept, the common practice for these datasets;
  the anatomy fills the frame) with ``cv2.INTER_AREA`` when shrinking both sides and ``cv2.INTER_LINEAR``
  otherwise (INTER_AREA enlarges like nearest neighbour, and small sources such as malaria cell crops
  are enlarged).
- Any file that cannot be decoded (a JPEG truncated after its last scan included) raises
  :class:`StepError` naming it: the filter step should have quarantined it.

Cache. Every resized image is kept in a packed, content-addressed cache, under the key
``sha256(image sha256, size, channels, RESIZE_VERSION)`` (:func:`cache_key`). Each worker of a run that
decodes appends the raw bytes of its images to a shard file of its own, ``shards/<run>-<pid>-<thread>.bin``,
and the run records ``key -> (shard, offset, nbytes)`` in an SQLite index, ``index.sqlite``; a key counts
as cached once its record is committed, after its bytes were written, so a crash at any moment leaves at
worst bytes that no record points to (never read) and images decoded again. An image whose key is cached
is never decoded again, so when new data lands only the new files are decoded; cached rows are copied
from the shards into the output, rows that follow each other in a shard with one write from a memory map
of them (:func:`_copy`): a few dozen writes instead of opening one file per image (0.2 to 0.9 ms each
here). That copy is the floor of an incremental run, bound by memory bandwidth: about 16 ms per 78 MB
here on otherwise idle cores (1566 images at 224 px). A record whose shard is missing or too short is
ignored (its image decoded again); a damaged index is replaced by an empty one. Bump
:data:`RESIZE_VERSION` whenever the preprocessing changes. Shards are never compacted: bytes of a former
version or size stay until the cache folder is deleted.

Parallelism. Uncached images are decoded by ``resize.workers`` decoders (0 = all cores): this process
and ``workers - 1`` worker processes, each single-threaded in OpenCV. The work goes out in row order, in
chunks whose decoding cost (pixels) shrinks towards the end so that the decoders finish together; this
process starts on the first chunk at once and then takes the next chunk in line whenever it is free
(:class:`_Shared`), while a worker process takes 10-15 ms to start. A decoder writes each resized image
itself, to its row(s) of the output (``pwrite`` at the row's offset: the file is filled out of order) and
to its shard, and hands back only where the bytes went: the pixels never cross a pipe. Workers are forked
by the fork server of :mod:`medflow.imaging.workers`, which has preloaded this module, never from the caller, and
they do not re-run the caller's main module. Nothing this module imports imports pandas, so the server
starts in about 0.4 s instead of 1.5. Fewer than ``POOL_MIN_IMAGES`` new images (new data
landing) are decoded by threads of this process alone (libjpeg-turbo, OpenCV and Pillow release the GIL
while decoding): processes would cost more to start than they save.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import mmap
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import cv2
import numpy as np
import simplejpeg
from numpy.lib import format as npy_format
from PIL import Image, ImageOps

from medflow.errors import StepError
from medflow.imaging.workers import main_hidden, mp_context
from medflow.io import atomic_path, n_workers, write_json

if TYPE_CHECKING:  # pydantic stays out of the workers' imports
    from medflow.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

# Part of every cache key: bump it when anything in the preprocessing below changes.
RESIZE_VERSION = "2"

# EXIF orientation (1-8) -> how to turn the stored pixels upright (what Pillow's exif_transpose does).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: cv2.flip(a, 1), 3: lambda a: cv2.rotate(a, cv2.ROTATE_180), 4: lambda a: cv2.flip(a, 0),
    5: lambda a: cv2.transpose(a), 6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: JPEG + appended pictures (libjpeg decodes the first)
_JPEG_DIRECT_MODES = frozenset({"L", "RGB"})  # other JPEG modes (CMYK, I;16) go through Pillow
_SOS, _EOI = b"\xff\xda", b"\xff\xd9"  # JPEG start-of-scan and end-of-image markers
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# Fewer uncached images than this are decoded by threads in-process: processes would cost more to start
# (the fork server takes about 0.4 s in a fresh process, the workers about 15 ms; 64 images 50-250 ms).
POOL_MIN_IMAGES = 64
_MAX_CHUNK = 32  # images per task sent to a worker, at most
_CHUNKS_PER_WORKER = 4  # a chunk is at most 1/(this * workers) of the work left (guided scheduling)
INDEX_NAME = "index.sqlite"  # the cache index: key -> (shard, offset, nbytes)
SHARDS_DIR = "shards"  # the cache's shard files, one per decoder (process or thread) of a run
_COMMIT_EVERY = 256  # index records per transaction: what a hard crash can make the next run decode again
_INDEX_TIMEOUT_S = 60.0  # how long to wait for another run that is writing to the same index
_SQL_BATCH = 500  # keys per lookup query (old SQLite builds allow 999 parameters)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault a mapping's pages in at once, not one by one
_REQUIRED_COLUMNS = ("path", "sha256", "width", "height", "format", "mode")


class ImageInfo(NamedTuple):
    """Header facts about one image (from clean.csv or a header probe)."""

    width: int
    height: int
    fmt: str
    mode: str


class _Job(NamedTuple):
    key: str  # cache key
    path: str
    info: ImageInfo | None  # None: probe the header when decoding


# ---------------------------------------------------------------------------------------------------------
# Pure preprocessing: bytes -> (size, size, channels) uint8
# ---------------------------------------------------------------------------------------------------------


def jpeg_scale(width: int, height: int, size: int) -> int:
    """The DCT scale, in eighths, that a JPEG of ``width x height`` is decoded at for a ``size`` output.

    The smallest ``m`` in 1..8 with both ``ceil(width * m / 8)`` and ``ceil(height * m / 8)`` at least
    ``size`` (8, a full decode, for images smaller than that): the reduced decode never has to be upsampled
    back to ``size``, so no resolution is lost. This is the scale libjpeg-turbo picks when asked for a
    minimum output size, which is how :func:`_decode_jpeg` asks for it.
    """
    return next((m for m in range(1, 8) if -(-width * m // 8) >= size and -(-height * m // 8) >= size), 8)


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG, read from its APP1 segment; 1 when absent or unreadable.

    Walks the marker segments before the first scan (a few microseconds); the orientation is tag 0x0112 of
    the TIFF structure's first IFD.
    """
    pos, end = 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan or end of image: no EXIF before the pixels
            return 1
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            return _tiff_orientation(data[pos + 10:pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    def u(at: int, n: int) -> int:
        return int.from_bytes(tiff[at:at + n], order)  # type: ignore[arg-type]
    ifd = u(4, 4)
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(ifd + 2, min(ifd + 2 + 12 * u(ifd, 2), len(tiff) - 11), 12):
        if u(entry, 2) == 0x0112 and u(entry + 2, 2) == 3:  # orientation, type SHORT
            value = u(entry + 8, 2)
            return value if 1 <= value <= 8 else 1
    return 1


def cache_key(sha256: str, size: int, channels: int) -> str:
    """Content address of one resized image: changes with the file, the output geometry and the code."""
    return hashlib.sha256(f"{sha256}:{size}:{channels}:{RESIZE_VERSION}".encode()).hexdigest()


def probe_header(data: bytes, name: str = "<bytes>") -> ImageInfo:
    """Width, height, format and mode from the image header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return ImageInfo(im.width, im.height, im.format or "", im.mode)
    except Exception as e:  # Pillow raises many types on bad data; all mean "not an image"
        raise StepError(f"{name}: not a readable image: {e}") from e


def load_resized(path: Path | str, *, size: int, channels: int, width: int | None = None,
                 height: int | None = None, fmt: str | None = None, mode: str | None = None) -> np.ndarray:
    """Read one image file and return it preprocessed: uint8 ``(size, size, channels)``, RGB order.

    ``width``/``height``/``fmt``/``mode`` are the header facts from the manifest; any missing one makes the
    header be probed. Raises StepError naming the file when it cannot be read or decoded.
    """
    return _decode(_read_bytes(path), size=size, channels=channels,
                   info=_info_or_none(width, height, fmt, mode), name=str(path))[0]


def decode_resized(data: bytes, *, size: int, channels: int, name: str = "<bytes>") -> np.ndarray:
    """Preprocess encoded image bytes (an upload, say) exactly as :func:`load_resized` preprocesses a file."""
    return _decode(data, size=size, channels=channels, info=None, name=name)[0]


def _read_bytes(path: Path | str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise StepError(f"{path}: cannot read: {e.strerror or e}") from e


def _info_or_none(width: int | None, height: int | None, fmt: str | None,
                  mode: str | None) -> ImageInfo | None:
    if width is None or height is None or not fmt or not mode:
        return None
    return ImageInfo(int(width), int(height), fmt, mode)


def _decode(data: bytes, *, size: int, channels: int, info: ImageInfo | None,
            name: str) -> tuple[np.ndarray, bool]:
    """Decode and preprocess; also say whether the JPEG was decoded at a reduced DCT scale."""
    info = info or probe_header(data, name)
    if info.fmt in _JPEG_FORMATS and info.mode in _JPEG_DIRECT_MODES:
        # A grayscale JPEG is decoded and resized as one channel and replicated at the end (exactly what
        # libjpeg's gray -> colour conversion gives, on size**2 pixels instead of the source's).
        decoded = _decode_jpeg(data, 1 if info.mode == "L" else channels, size, name)
        reduced = decoded.shape[0] * decoded.shape[1] < info.width * info.height
        img = _resize_square(_ORIENT.get(jpeg_orientation(data), _upright)(decoded), size)
        return _to_channels(img, channels), reduced
    return _resize_square(_decode_pillow(data, channels, name), size), False


def _upright(img: np.ndarray) -> np.ndarray:
    return img


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(size, size, 1 or 3) -> (size, size, channels): gray replicated when three channels are asked."""
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.shape[2] < channels else img


def _jpeg_complete(data: bytes) -> bool:
    """True if an end-of-image marker (EOI) follows the last start-of-scan (a truncated JPEG has none).

    libjpeg fills a truncated image with grey and only warns; the filter quarantines such files, this is
    the last line of defence. Markers cannot occur inside entropy-coded data (0xFF is byte-stuffed), so an
    EOI in the last 64 bytes ends the last scan: that checks nearly every file in microseconds. Otherwise
    (trailing junk) the EOI must come after the last SOS; an EXIF thumbnail's scan comes before the main
    image's, and a picture appended after it (MPO) must be complete too.
    """
    if data.find(_EOI, max(0, len(data) - 64)) >= 0:
        return True
    last_sos = data.rfind(_SOS)
    return last_sos >= 0 and data.find(_EOI, last_sos) >= 0


def _decode_jpeg(data: bytes, channels: int, size: int, name: str) -> np.ndarray:
    """libjpeg-turbo decode at the scale of :func:`jpeg_scale`, stored orientation; gray (H, W, 1) or RGB.

    Not strict: like OpenCV and Pillow, libjpeg's recoverable warnings (extraneous bytes before a marker,
    say) do not fail the image; a truncated one is caught by :func:`_jpeg_complete` first.
    """
    if not _jpeg_complete(data):
        raise StepError(f"{name}: truncated JPEG (no end-of-image marker after the last scan)")
    try:
        return simplejpeg.decode_jpeg(data, "GRAY" if channels == 1 else "RGB", min_height=size,
                                      min_width=size, strict=False)
    except Exception as e:  # simplejpeg raises ValueError (and RuntimeError) on undecodable data
        raise StepError(f"{name}: cannot decode JPEG: {e}") from e


def _decode_pillow(data: bytes, channels: int, name: str) -> np.ndarray:
    """Pillow decode + normalisation (orientation, bit depth, palette, alpha, colour space)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            upright = ImageOps.exif_transpose(im)
            img = _to_8bit_l_or_rgb(upright).convert("L" if channels == 1 else "RGB")
            return np.asarray(img)
    except Exception as e:  # Pillow raises many types on bad data; all mean "cannot decode"
        raise StepError(f"{name}: cannot decode image: {e}") from e


def _to_8bit_l_or_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit ``L`` or ``RGB`` (see the module docstring for the rules)."""
    if im.mode in _HIGH_BIT_MODES:
        return _stretch_to_8bit(im)
    if im.mode == "1":
        return im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if "A" in im.getbands() or im.mode in ("RGBa", "La"):
        return _over_black(im)
    return im if im.mode in ("L", "RGB") else im.convert("RGB")


def _stretch_to_8bit(im: Image.Image) -> Image.Image:
    """Map the image's own value range linearly onto 0..255 (constant images -> 0)."""
    a = np.asarray(im, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), "L")


def _over_black(im: Image.Image) -> Image.Image:
    """Composite an image with alpha over a black background (transparent -> 0)."""
    gray = im.mode in ("LA", "La")
    rgba = im.convert("LA" if gray else "RGBA")
    color = rgba.convert("L" if gray else "RGB")
    black = Image.new(color.mode, color.size, 0)
    return Image.composite(color, black, rgba.getchannel("A"))


def _resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Stretch to ``size x size`` (INTER_AREA shrinking, INTER_LINEAR enlarging); always (size, size, c)."""
    h, w = img.shape[:2]
    if (h, w) != (size, size):
        interp = cv2.INTER_AREA if min(h, w) >= size else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------
# The packed cache: append-only shard files and an SQLite index
# ---------------------------------------------------------------------------------------------------------


class CacheEntry(NamedTuple):
    """Where the resized bytes of one cache key live: ``nbytes`` bytes at ``offset`` of the file ``shard``."""

    shard: str
    offset: int
    nbytes: int


def _index_path(cache: str) -> str:
    return os.path.join(cache, INDEX_NAME)


def _shard_path(cache: str, name: str) -> str:
    return os.path.join(cache, SHARDS_DIR, name)


def _open_index(cache: str) -> sqlite3.Connection:
    """Open the cache index, creating the cache folder and the table on first use.

    ``synchronous=OFF``: a commit costs no fsync (each costs about 5 ms here, more than a whole incremental
    run may take). SQLite's commits stay atomic when this process crashes; after an operating-system crash
    or a power loss the index may be damaged, and :func:`_usable_index` then starts a new cache.
    StepError naming the folder when it cannot be written.
    """
    try:
        os.makedirs(os.path.join(cache, SHARDS_DIR), exist_ok=True)
        db = sqlite3.connect(_index_path(cache), timeout=_INDEX_TIMEOUT_S)
    except (OSError, sqlite3.OperationalError) as e:
        raise StepError(f"{cache}: cannot write to the resize cache: {e}") from e
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, shard TEXT NOT NULL, "
                   "offset INTEGER NOT NULL, nbytes INTEGER NOT NULL) WITHOUT ROWID")
    except BaseException:
        db.close()
        raise
    return db


def _damaged(e: sqlite3.Error) -> bool:
    """True for "not a database" and "malformed" errors (not for a locked or unwritable index)."""
    return getattr(e, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT")


def _reset_cache(cache: str) -> None:
    """Delete a damaged index and the shards it described (nothing else can read them)."""
    for name in (INDEX_NAME, f"{INDEX_NAME}-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cache, name))
    with contextlib.suppress(FileNotFoundError), os.scandir(os.path.join(cache, SHARDS_DIR)) as shards:
        for shard in shards:
            if shard.name.endswith(".bin"):
                os.unlink(shard.path)


@contextlib.contextmanager
def _usable_index(cache: str, keys: list[str]) -> Iterator[tuple[sqlite3.Connection, dict[str, CacheEntry]]]:
    """The open cache index and the usable entries of ``keys``; a damaged index is replaced by an empty one.

    A cache may always be dropped: the images are decoded again, which costs time, never correctness.
    """
    try:
        db = _open_index(cache)
        try:
            found = _lookup(db, cache, keys)
        except BaseException:
            db.close()
            raise
    except sqlite3.DatabaseError as e:
        if not _damaged(e):
            raise StepError(f"{_index_path(cache)}: cannot use the resize cache index: {e}") from e
        log.warning("%s: damaged resize cache index (%s): starting a new cache, every image is decoded",
                    _index_path(cache), e)
        _reset_cache(cache)
        db, found = _open_index(cache), {}
    try:
        yield db, found
    finally:
        db.close()


def _lookup(db: sqlite3.Connection, cache: str, keys: list[str]) -> dict[str, CacheEntry]:
    """Index records of ``keys`` whose bytes are all in their shard (a shard cut short loses its tail)."""
    rows: list[tuple[str, str, int, int]] = []
    for i in range(0, len(keys), _SQL_BATCH):
        batch = keys[i:i + _SQL_BATCH]
        marks = ",".join("?" * len(batch))
        rows += db.execute(f"SELECT key, shard, offset, nbytes FROM entries WHERE key IN ({marks})", batch)
    shards: dict[str, tuple[str, int]] = {}  # name -> (path, size)
    found = {}
    for key, name, offset, nbytes in rows:
        if name not in shards:
            path = _shard_path(cache, name)
            shards[name] = path, _file_size(path)
        path, size = shards[name]
        if offset >= 0 and offset + nbytes <= size:
            found[key] = CacheEntry(path, offset, nbytes)
    return found


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def cache_lookup(cache: Path | str, keys: Iterable[str]) -> dict[str, CacheEntry]:
    """The usable cache entries among ``keys`` (see :func:`cache_key`); empty when there is no cache yet.

    Like a run, it replaces a damaged index by an empty one.
    """
    if not os.path.isfile(_index_path(str(cache))):
        return {}
    with _usable_index(str(cache), list(dict.fromkeys(keys))) as (_, found):
        return found


def cache_forget(cache: Path | str, keys: Iterable[str]) -> int:
    """Drop the index records of ``keys`` (their images are decoded again next time); how many there were.

    The bytes stay in their shards until the cache folder is deleted.
    """
    db = _open_index(str(cache))
    try:
        with db:
            return sum(db.execute("DELETE FROM entries WHERE key = ?", (k,)).rowcount for k in set(keys))
    finally:
        db.close()


class _IndexWriter:
    """Records the entries this run decoded in the index, in transactions of ``_COMMIT_EVERY``.

    The workers wrote an entry's bytes to their shard before handing its (shard, offset) back, so a
    record never points at bytes that are not there. Pending records are committed when the run ends,
    also on an error, so that what was decoded is kept. A crash can leave bytes without records at the
    end of a shard: they are never read.
    """

    def __init__(self, db: sqlite3.Connection, cache: str) -> None:
        self._db, self._cache = db, cache
        self._pending: list[tuple[str, str, int, int]] = []

    def record(self, key: str, shard: str, offset: int, nbytes: int) -> None:
        self._pending.append((key, shard, offset, nbytes))
        if len(self._pending) >= _COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        if not self._pending:
            return
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)", self._pending)
        except sqlite3.Error as e:
            raise StepError(f"{_index_path(self._cache)}: cannot record new resize cache entries: {e}") from e
        self._pending.clear()


@contextlib.contextmanager
def _index_writer(db: sqlite3.Connection, cache: str) -> Iterator[_IndexWriter]:
    writer = _IndexWriter(db, cache)
    try:
        yield writer
    finally:  # also on an error: the entries decoded so far are kept
        writer.commit()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def _copy(dst: int, src: int, nbytes: int, src_pos: int, dst_pos: int) -> None:
    """Copy ``nbytes`` from ``src`` at ``src_pos`` to ``dst`` at ``dst_pos``: one write from a memory map.

    The source range is mapped read-only with its pages faulted in at once (``MAP_POPULATE``), and one
    ``pwrite`` copies it: on ext4 here half the time of ``copy_file_range`` (6 MB: 1.1 vs 2.2 ms; 78 MB:
    16 vs 31 ms) and of ``pread`` + ``pwrite`` through a buffer. StepError if ``src`` is shorter than the
    range (its cache shard was cut after the index lookup).
    """
    start = src_pos - src_pos % mmap.ALLOCATIONGRANULARITY  # a mapping starts at a multiple of this
    try:
        mapped = mmap.mmap(src, src_pos + nbytes - start, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                           prot=mmap.PROT_READ, offset=start)
    except ValueError:  # mmap checks the file's size itself: "mmap length is greater than file size"
        raise StepError(f"a resize cache shard shrank after the index lookup (it needs {src_pos + nbytes} "
                        "bytes): re-run the step") from None
    with mapped, memoryview(mapped) as view:
        _pwrite_all(dst, view[src_pos - start:], dst_pos)


# ---------------------------------------------------------------------------------------------------------
# Decoding: worker processes (or threads for a handful of images)
# ---------------------------------------------------------------------------------------------------------


class _Task(NamedTuple):
    job: _Job
    offsets: tuple[int, ...]  # where the image's row(s) start in the output file (identical files: several)


class _Decoded(NamedTuple):
    key: str
    reduced: bool  # a JPEG decoded at a reduced DCT scale
    shard: str  # name of the shard file its bytes were appended to, under shards/
    offset: int  # where in that shard


def _decode_chunk(tasks: list[_Task], *, size: int, channels: int, out: str, cache: str,
                  run_id: str) -> list[_Decoded]:
    """Decoder body: decode a chunk of images and write each to its output row(s) and to this decoder's shard.

    Only (key, shard, offset) is returned: the pixels never travel through a pipe. Each decoder (worker
    process, or thread of this process) appends to a shard of its own, ``<run>-<pid>-<thread>.bin``.
    """
    name = f"{run_id}-{os.getpid()}-{threading.get_ident()}.bin"
    shard_path = _shard_path(cache, name)
    results = []
    with _opened(out, os.O_WRONLY, "cannot write the output") as out_fd, \
            _opened(shard_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "cannot write to the resize cache") as shard:
        offset = os.fstat(shard).st_size
        for task in tasks:
            job = task.job
            img, reduced = _decode(_read_bytes(job.path), size=size, channels=channels, info=job.info,
                                   name=job.path)
            data = img.reshape(-1).data  # contiguous (size, size, channels) uint8: one flat buffer
            try:
                for pos in task.offsets:
                    _pwrite_all(out_fd, data, pos)
            except OSError as e:
                raise StepError(f"{out}: cannot write the output: {e}") from e
            try:
                _write_all(shard, data)
            except OSError as e:
                raise StepError(f"{shard_path}: cannot write to the resize cache: {e}") from e
            results.append(_Decoded(job.key, reduced, name, offset))
            offset += len(data)
    return results


@contextlib.contextmanager
def _opened(path: str, flags: int, what: str) -> Iterator[int]:
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o644)
    except OSError as e:
        raise StepError(f"{path}: {what}: {e.strerror or e}") from e
    try:
        yield fd
    finally:
        os.close(fd)


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _chunks(todo: list[T], workers: int, cost: Callable[[T], float] = lambda _: 1.0) -> list[list[T]]:
    """Split the work, in row order, into chunks that shrink towards the end (guided scheduling).

    A chunk costs at most ``1 / (_CHUNKS_PER_WORKER * workers)`` of the cost left (and holds at most
    ``_MAX_CHUNK`` items, at least one): big chunks early keep the per-task overhead small; single images
    at the end make the workers finish together instead of one of them decoding a last big chunk while
    the others wait. Costs, not counts: the first rows of a dataset sorted by class may be the largest
    images. Row order (rather than, say, the biggest files first) makes a chunk consecutive rows, which
    its worker appends to its shard in that order: the next run copies each chunk's rows with one call.
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


@contextlib.contextmanager
def _decoding(todo: list[_Task], *, size: int, channels: int, workers: int, out: str, cache: str,
              run_id: str) -> Iterator[Iterator[_Decoded]]:
    """Start decoding ``todo`` into ``out`` at once; yield an iterator over the results as they finish.

    Fewer than POOL_MIN_IMAGES images (new data landing, typically) are decoded by threads of this
    process: libjpeg-turbo, OpenCV and Pillow release the GIL while decoding, and processes would take
    longer to start. Otherwise ``workers - 1`` worker processes and this process decode (see
    :class:`_Shared`).
    """
    job = partial(_decode_chunk, size=size, channels=channels, out=out, cache=cache, run_id=run_id)
    chunks = _chunks(todo, max(1, workers), cost=_task_cost)
    if workers <= 1 or len(todo) < POOL_MIN_IMAGES:
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


def _task_cost(task: _Task) -> float:
    """Relative decoding cost of a task for chunking: its pixels (1 Mpx when the header is unknown)."""
    info = task.job.info
    return float(info.width * info.height) if info else 1e6


_Finished = Future[list[_Decoded]] | list[_Decoded] | BaseException


class _Shared:
    """Chunks handed out in order to the worker processes and to a thread of this process.

    This process counts as one of the ``resize.workers``: its thread takes the next chunk in line
    whenever it is free, from the start (a worker process takes 10-15 ms to start, the first one about
    0.4 s more to start the fork server, and this thread keeps decoding meanwhile), and its results
    cross no pipe. The pool is kept two chunks ahead per worker process (one running, one queued, so no
    worker waits between chunks); the guided, cost-sized chunks keep everyone finishing together.
    """

    def __init__(self, chunks: list[list[_Task]], job: Callable[[list[_Task]], list[_Decoded]],
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

    def results(self) -> Iterator[_Decoded]:
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
        self._stopped.set()
        self._thread.join()

    def _feed(self) -> None:
        while self._in_flight < self._depth and (chunk := self._take()) is not None:
            self._pool.submit(self._job, chunk).add_done_callback(self._done.put)
            self._in_flight += 1

    def _take(self) -> list[_Task] | None:
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


def _unbroken(results: Iterator[_Decoded]) -> Iterator[_Decoded]:
    """Turn a dead worker (killed for memory, or a decoder crash) into an actionable StepError."""
    try:
        yield from results
    except BrokenProcessPool as e:
        raise StepError("a resize worker process died (out of memory, or a decoder crashed on a file); "
                        "entries decoded so far are cached: re-run with resize.workers: 1 to find the "
                        "file") from e


# ---------------------------------------------------------------------------------------------------------
# Assembly and the step entry
# ---------------------------------------------------------------------------------------------------------


class _Counts(NamedTuple):
    decoded: int
    reduced: int


def _read_jobs(clean: Path, size: int, channels: int) -> list[_Job]:
    """One job per clean.csv row, in row order; StepError on a missing column or an empty table.

    Read with the csv module, columns by position: a few thousand rows and seven columns do not need
    pandas, whose fixed cost is a visible share of an incremental run (nor ``DictReader``, half as fast).
    """
    try:
        with open(clean, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            missing = [c for c in _REQUIRED_COLUMNS if c not in header]
            if missing:
                raise StepError(f"{clean}: missing column(s) {', '.join(missing)}")
            columns = [header.index(c) for c in _REQUIRED_COLUMNS]
            jobs = [_job([row[i] if i < len(row) else "" for i in columns], line, clean, size, channels)
                    for line, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StepError(f"{clean}: cannot read clean manifest: {e}") from e
    if not jobs:
        raise StepError(f"{clean}: no images to resize (every file was rejected or none were found)")
    return jobs


def _job(values: list[str], line: int, clean: Path, size: int, channels: int) -> _Job:
    """The job of one row; ``values`` in the order of ``_REQUIRED_COLUMNS``."""
    path, sha, w, h, fmt, mode = values
    if not path or not sha:
        raise StepError(f"{clean}: row {line} has no path or sha256")
    try:
        info = ImageInfo(int(float(w)), int(float(h)), fmt, mode) if w and h and fmt and mode else None
    except ValueError:
        raise StepError(f"{clean}: row {line}: width/height {w!r}/{h!r} are not numbers") from None
    return _Job(cache_key(sha, size, channels), path, info)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    header = {"descr": npy_format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _plan(jobs: list[_Job], cached: dict[str, CacheEntry], *, start: int,
          nbytes: int) -> tuple[list[tuple[int, CacheEntry]], list[_Task]]:
    """Cached rows as (row, entry), and one task per distinct uncached image (its rows' offsets), in row order."""
    hits: list[tuple[int, CacheEntry]] = []
    rows_of: dict[str, list[int]] = {}
    first: dict[str, _Job] = {}
    for row, job in enumerate(jobs):
        entry = cached.get(job.key)
        if entry is None:
            rows_of.setdefault(job.key, []).append(row)
            first.setdefault(job.key, job)
        else:
            hits.append((row, entry))
    todo = [_Task(first[key], tuple(start + row * nbytes for row in rows)) for key, rows in rows_of.items()]
    return hits, todo


def _copy_cached(fd: int, rows: list[tuple[int, CacheEntry]], *, start: int, nbytes: int) -> None:
    """Copy cached rows (row index, entry) into the output at ``start + row * nbytes``.

    Rows that follow each other in the output and in one shard (a decoder's chunk of an earlier run over
    the same manifest) are copied with one large call.
    """
    shards: dict[str, int] = {}
    try:
        for row, entry, count in _runs(rows):
            if entry.shard not in shards:
                shards[entry.shard] = os.open(entry.shard, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            _copy(fd, shards[entry.shard], count * nbytes, entry.offset, start + row * nbytes)
    finally:
        for src in shards.values():
            os.close(src)


def _runs(rows: list[tuple[int, CacheEntry]]) -> Iterator[tuple[int, CacheEntry, int]]:
    """Group (row, entry) pairs into (first row, first entry, count) runs contiguous in output and shard."""
    if not rows:
        return
    first_row, first, count = rows[0][0], rows[0][1], 1
    for row, entry in rows[1:]:
        if (row == first_row + count and entry.shard == first.shard
                and entry.offset == first.offset + count * first.nbytes):
            count += 1
            continue
        yield first_row, first, count
        first_row, first, count = row, entry, 1
    yield first_row, first, count


def _collect(results: Iterator[_Decoded], index: _IndexWriter, *, nbytes: int, expected: int) -> _Counts:
    """Record each decoded image in the cache index as it arrives (the workers wrote its bytes)."""
    decoded = reduced = 0
    for result in results:
        index.record(result.key, result.shard, result.offset, nbytes)
        decoded, reduced = decoded + 1, reduced + result.reduced
    if decoded != expected:  # cannot happen unless an executor loses work: never write a partial array
        raise StepError(f"resize: {decoded} of {expected} images came back from decoding")
    return _Counts(decoded, reduced)


def run(cfg: Config, *, clean: Path, out: Path, stats: Path, cache: Path) -> dict[str, Any]:
    """Resize every clean.csv image into ``out`` (uint8 ``(N, size, size, channels)`` .npy); write ``stats``.

    Only images missing from the content-addressed ``cache`` are decoded (in parallel processes).
    Returns the statistics also written to ``stats``: images, decoded, cached (= images - decoded),
    shape, seconds, images_per_s (images / seconds), workers (decoding processes, or threads for a
    handful of images; 0 when everything was cached) and reduced_decodes (JPEGs decoded at a reduced DCT scale).
    """
    start = time.perf_counter()
    size, channels = cfg.resize.size, cfg.dataset.channels
    nbytes, cache_dir = size * size * channels, str(cache)
    jobs = _read_jobs(Path(clean), size, channels)
    shape = (len(jobs), size, size, channels)
    # Not fsynced (like medflow.io.atomic_path): the rename already keeps a crash of this process from
    # leaving a partial array under its name; after a power loss DVC's hash check catches a damaged one.
    header = _npy_header(shape)
    with _usable_index(cache_dir, list(dict.fromkeys(job.key for job in jobs))) as (db, found):
        cached = {key: entry for key, entry in found.items() if entry.nbytes == nbytes}
        hits, todo = _plan(jobs, cached, start=len(header), nbytes=nbytes)
        workers = min(n_workers(cfg.resize.workers), len(todo))
        with atomic_path(out, suffix=".npy") as tmp, open(tmp, "wb") as f, _index_writer(db, cache_dir) as index:
            f.write(header)
            f.truncate(len(header) + len(jobs) * nbytes)
            f.flush()
            # the workers write the decoded rows while this process copies the cached ones
            with _decoding(todo, size=size, channels=channels, workers=workers, out=str(tmp), cache=cache_dir,
                           run_id=uuid.uuid4().hex) as results:
                _copy_cached(f.fileno(), hits, start=len(header), nbytes=nbytes)
                counts = _collect(results, index, nbytes=nbytes, expected=len(todo))
    seconds = time.perf_counter() - start
    summary = {"images": len(jobs), "decoded": counts.decoded, "cached": len(jobs) - counts.decoded,
               "shape": list(shape), "seconds": round(seconds, 3),
               "images_per_s": round(len(jobs) / seconds, 1), "workers": workers,
               "reduced_decodes": counts.reduced}
    write_json(stats, summary, fsync=False)  # like the array, see above: DVC's hash check guards both
    log.info("resize: %d images -> %s %s: %d decoded (%d reduced), %d cached, %.2f s, %.0f images/s, "
             "%d worker(s)", len(jobs), out, shape, counts.decoded, counts.reduced, summary["cached"],
             seconds, summary["images_per_s"], workers)
    return summary

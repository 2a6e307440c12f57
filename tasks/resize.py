"""Resize step: every clean image -> one uint8 array ``(N, size, size, channels)`` saved as ``.npy``.

Output format. Row ``i`` of the array is row ``i`` of clean.csv. The file is a plain ``.npy`` (a header,
then the raw C-ordered bytes), so training opens it with ``np.load(path, mmap_mode="r")`` and slices
batches straight from the page cache: zero decode cost per epoch, and no need to hold the dataset in RAM.
It is written sequentially, one image after the other behind the header, so the step's peak memory does
not grow with the dataset (no array of all images, no memory map whose dirty pages pile up), and
atomically (a temporary file renamed into place): a crash leaves no half-written array under its name.

Preprocessing (the single source of truth: training, evaluation and prediction all go through
:func:`load_resized` / :func:`decode_resized`):

- JPEG in mode L or RGB is decoded by OpenCV (libjpeg-turbo) in the DCT domain at 1/2, 1/4 or 1/8 scale:
  the largest factor that still leaves the short side at least ``size`` (:func:`reduction_factor`), so
  nothing is upsampled afterwards. The entropy decoding still runs in full, the inverse DCT and colour
  conversion on up to 64 times fewer pixels. OpenCV applies the EXIF orientation (in reduced modes too).
  DCT scaling is a slightly different low-pass than a box average: on the Kermany X-rays the result is
  on average 1.2 grey levels (at worst 3.0) from a full decode + INTER_AREA.
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

Cache. Each resized image is also stored under ``cache/<key[:2]>/<key>.bin`` (its raw bytes, written
atomically), with ``key = sha256(image sha256, size, channels, RESIZE_VERSION)``. An image whose key is
cached is never decoded again, so when new data lands only the new files are decoded; the output is
assembled from the cache. Bump :data:`RESIZE_VERSION` whenever the preprocessing changes.

Parallelism. Uncached images are decoded by a pool of processes (``resize.workers``, 0 = all cores), each
single-threaded in OpenCV; workers write cache entries and return only ``(key, reduction factor)``, and
the parent streams entries into the output in row order while the workers run ahead. Workers are
forked by a ``forkserver`` that has preloaded this module, never from the caller: a forked copy of a
process whose OpenCV thread pool has started deadlocks in its first OpenCV threading call (seen here in
``cv2.setNumThreads``), and Prefect callers run other threads too. This module keeps pandas
(``tasks.io``) out of its import path, so the server starts in about 0.4 s instead of 1.5, and workers
do not re-run the caller's main module (see :func:`_main_hidden`). A handful of images (new data
landing) is decoded by threads in-process (OpenCV and Pillow release the GIL while decoding): processes
would cost more to start than they save.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
import types
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import cv2
import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, ImageOps

from tasks.errors import StepError

# tasks.io (and through it pandas) is imported inside the parent-only functions below: worker processes
# import this module and must start fast.
if TYPE_CHECKING:
    from tasks.config import Config

log = logging.getLogger(__name__)

# Part of every cache key: bump it when anything in the preprocessing below changes.
RESIZE_VERSION = "1"

# DCT scale factors libjpeg can decode at, largest first.
JPEG_FACTORS = (8, 4, 2, 1)
_JPEG_FLAGS = {  # (channels, factor) -> cv2.imdecode flag
    (1, 1): cv2.IMREAD_GRAYSCALE, (1, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (1, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4, (1, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
    (3, 1): cv2.IMREAD_COLOR, (3, 2): cv2.IMREAD_REDUCED_COLOR_2,
    (3, 4): cv2.IMREAD_REDUCED_COLOR_4, (3, 8): cv2.IMREAD_REDUCED_COLOR_8,
}
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: JPEG + appended pictures (cv2 decodes the first)
_JPEG_DIRECT_MODES = frozenset({"L", "RGB"})  # other JPEG modes (CMYK, I;16) go through Pillow
_SOS, _EOI = b"\xff\xda", b"\xff\xd9"  # JPEG start-of-scan and end-of-image markers
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# Fewer uncached images than this are decoded by threads in-process: processes would cost more to start.
POOL_MIN_IMAGES = 8
_SENDFILE = sys.platform == "linux"  # sendfile(2) between regular files: Linux only
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


def reduction_factor(width: int, height: int, size: int) -> int:
    """Largest JPEG DCT scale factor (8, 4, 2 or 1) that keeps ``min(width, height) / factor >= size``.

    So the reduced decode never has to be upsampled back to ``size`` (no resolution is lost).
    """
    short = min(width, height)
    return next(f for f in JPEG_FACTORS if f == 1 or short / f >= size)


def cache_key(sha256: str, size: int, channels: int) -> str:
    """Content address of one resized image: changes with the file, the output geometry and the code."""
    return hashlib.sha256(f"{sha256}:{size}:{channels}:{RESIZE_VERSION}".encode()).hexdigest()


def cache_entry(cache: Path | str, key: str) -> Path:
    """Where the resized bytes of ``key`` live in the cache folder."""
    return Path(_entry_path(str(cache), key))


def _entry_path(cache: str, key: str) -> str:
    return f"{cache}/{key[:2]}/{key}.bin"  # a string: pathlib costs more than the copy per cached row


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
            name: str) -> tuple[np.ndarray, int]:
    """Decode and preprocess; also return the JPEG reduction factor used (1 = full decode)."""
    info = info or probe_header(data, name)
    if info.fmt in _JPEG_FORMATS and info.mode in _JPEG_DIRECT_MODES:
        factor = reduction_factor(info.width, info.height, size)
        # A grayscale JPEG is decoded and resized as one channel and replicated at the end (exactly what
        # libjpeg's gray -> colour conversion gives, on size**2 pixels instead of the source's).
        decoded_channels = 1 if info.mode == "L" else channels
        img = _resize_square(_decode_jpeg(data, decoded_channels, factor, name), size)
        return _to_channels(img, channels, bgr=decoded_channels == 3), factor
    img = _resize_square(_decode_pillow(data, channels, name), size)
    return img, 1


def _to_channels(img: np.ndarray, channels: int, *, bgr: bool) -> np.ndarray:
    """(size, size, 1 or 3) -> (size, size, channels) in RGB order: gray replicated, BGR reordered."""
    if img.shape[2] < channels:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else img


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


def _decode_jpeg(data: bytes, channels: int, factor: int, name: str) -> np.ndarray:
    """libjpeg-turbo decode at 1/factor scale, EXIF orientation applied; gray (H, W) or BGR (H, W, 3)."""
    if not _jpeg_complete(data):
        raise StepError(f"{name}: truncated JPEG (no end-of-image marker after the last scan)")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _JPEG_FLAGS[channels, factor])
    except cv2.error as e:
        raise StepError(f"{name}: cannot decode JPEG: {e}") from e
    if img is None:
        raise StepError(f"{name}: cannot decode JPEG")
    return img


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
# Cache entries and workers
# ---------------------------------------------------------------------------------------------------------


def _write_entry(cache: str, key: str, img: np.ndarray) -> None:
    """Store ``img``'s bytes as the entry of ``key``, atomically (temporary file renamed into place).

    The pattern of ``tasks.io.atomic_path``, inlined because workers must not import tasks.io (pandas).
    """
    dest = _entry_path(cache, key)
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(img.data)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _append_entry(out: BinaryIO, cache: str, key: str, nbytes: int) -> bool:
    """Append the entry of ``key`` to ``out``; False (nothing written) when absent or damaged.

    A damaged entry is one whose size is not exactly ``nbytes``. On Linux the kernel copies it
    (``sendfile``), page cache to page cache.
    """
    try:
        src = os.open(_entry_path(cache, key), os.O_RDONLY)
    except OSError:
        return False
    try:
        if os.fstat(src).st_size != nbytes:
            return False
        if _SENDFILE and _sendfile(out.fileno(), src, nbytes):
            return True
        data = os.read(src, nbytes)
        if len(data) != nbytes:
            return False
        out.write(data)
        return True
    finally:
        os.close(src)


def _sendfile(dst: int, src: int, nbytes: int) -> bool:
    """Copy ``nbytes`` from the start of ``src`` to ``dst`` in the kernel; False if unsupported here."""
    done = 0
    while done < nbytes:
        try:
            sent = os.sendfile(dst, src, done, nbytes - done)
        except OSError as e:  # a filesystem that cannot splice: fall back to read + write
            if done == 0 and e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise
        if sent == 0:
            raise StepError(f"cache entry shrank while being copied ({done} of {nbytes} bytes)")
        done += sent
    return True


def _decode_job(job: _Job, *, size: int, channels: int, cache: str) -> tuple[str, int]:
    """Worker body: decode one image into its cache entry; return (key, reduction factor)."""
    img, factor = _decode(_read_bytes(job.path), size=size, channels=channels, info=job.info, name=job.path)
    try:
        _write_entry(cache, job.key, img)
    except OSError as e:
        raise StepError(f"{cache}: cannot write to the resize cache: {e}") from e
    return job.key, factor


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _mp_context() -> ForkServerContext:
    """Workers come from a fork server started once per process, with this module preloaded (see above)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start worker processes without making each of them re-run the caller's ``__main__`` module.

    multiprocessing re-imports the parent's main script or module in every spawn and forkserver child
    (CPython 3.11's forkserver ``"__main__"`` preload never receives the path, so it cannot help): that is
    pydantic under the ``medflow`` CLI, pandas under a script, all of Prefect under a flow run, about 0.3
    to 2 s per worker on a small machine, and a script without an ``if __name__ == "__main__":`` guard
    would even run again. Workers need nothing from it (their code and their work items are in this
    module), so an empty ``__main__`` stands in while they are started. Code in other threads that looks
    up ``__main__`` during those milliseconds (unpickling a function defined in a script, say) would
    see the empty module.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _chunksize(jobs: int, workers: int) -> int:
    """About 16 chunks per worker, so that the last ones finish together; at most 8 images per chunk."""
    return max(1, min(8, jobs // (workers * 16)))


@contextlib.contextmanager
def _decoded(todo: list[_Job], *, size: int, channels: int, cache: str,
             workers: int) -> Iterator[Iterator[tuple[str, int]]]:
    """Decode ``todo`` into the cache; yield the (key, factor) results in ``todo`` order as they finish.

    Fewer than POOL_MIN_IMAGES images (new data landing, typically) are decoded by threads of this
    process: OpenCV and Pillow release the GIL while decoding, and processes would take longer to start.
    """
    job = partial(_decode_job, size=size, channels=channels, cache=cache)
    if workers <= 1 or len(todo) < POOL_MIN_IMAGES:
        with ThreadPoolExecutor(max(1, workers)) as threads:
            yield threads.map(job, todo)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_worker_init)
    try:
        with _main_hidden():  # the executor starts its workers while map() submits the chunks
            results = pool.map(job, todo, chunksize=_chunksize(len(todo), workers))
        yield _unbroken(results)
    finally:  # on an error, drop the queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)


def _unbroken(results: Iterator[tuple[str, int]]) -> Iterator[tuple[str, int]]:
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
    """One job per clean.csv row, in row order; StepError on a missing column or an empty table."""
    from tasks.io import read_csv

    try:
        df = read_csv(clean)
    except (OSError, ValueError) as e:
        raise StepError(f"{clean}: cannot read clean manifest: {e}") from e
    missing = [c for c in _REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise StepError(f"{clean}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise StepError(f"{clean}: no images to resize (every file was rejected or none were found)")
    bad = df["sha256"].isna() | df["path"].isna()
    if bad.any():
        raise StepError(f"{clean}: row {int(bad.idxmax()) + 2} has no path or sha256")
    known = df[["width", "height", "format", "mode"]].notna().all(axis=1)
    rows = zip(df["path"], df["sha256"], known, df["width"], df["height"], df["format"], df["mode"], strict=True)
    return [_Job(cache_key(sha, size, channels), path, ImageInfo(int(w), int(h), fmt, mode) if ok else None)
            for path, sha, ok, w, h, fmt, mode in rows]


def _uncached(jobs: Iterable[_Job], cache: str) -> list[_Job]:
    """The jobs whose key has no cache entry yet, each key once, in first-row order."""
    seen: set[str] = set()
    todo = []
    for job in jobs:
        if job.key not in seen and not os.path.isfile(_entry_path(cache, job.key)):
            todo.append(job)
        seen.add(job.key)
    return todo


def _write_npy_header(f: BinaryIO, shape: tuple[int, ...]) -> None:
    header = {"descr": npy_format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    npy_format.write_array_header_1_0(f, header)


def _stream(f: BinaryIO, jobs: list[_Job], todo: list[_Job], results: Iterator[tuple[str, int]], *,
            size: int, channels: int, cache: str) -> _Counts:
    """Write each row's cached bytes in row order, waiting for the workers where a row is not decoded yet.

    A damaged or vanished entry is decoded again here (and counted as decoded).
    """
    nbytes = size * size * channels
    pending = {job.key for job in todo}
    decoded = reduced = 0
    for job in jobs:
        if job.key in pending:
            key, factor = next(results)  # results come in todo order = first-row order
            assert key == job.key, (key, job.key)
            pending.discard(key)
            decoded, reduced = decoded + 1, reduced + (factor > 1)
        if not _append_entry(f, cache, job.key, nbytes):
            log.warning("cache entry for %s missing or damaged: decoding it again", job.path)
            _, factor = _decode_job(job, size=size, channels=channels, cache=cache)
            decoded, reduced = decoded + 1, reduced + (factor > 1)
            if not _append_entry(f, cache, job.key, nbytes):
                raise StepError(f"{cache}: cannot write or read back the cache entry for {job.path}")
    return _Counts(decoded, reduced)


def run(cfg: Config, *, clean: Path, out: Path, stats: Path, cache: Path) -> dict[str, Any]:
    """Resize every clean.csv image into ``out`` (uint8 ``(N, size, size, channels)`` .npy); write ``stats``.

    Only images missing from the content-addressed ``cache`` are decoded (in parallel processes).
    Returns the statistics also written to ``stats``: images, decoded, cached (= images - decoded),
    shape, seconds, images_per_s (images / seconds), workers (decoding processes, or threads for a
    handful of images; 0 when everything was cached) and reduced_decodes (JPEGs decoded at 1/2-1/8).
    """
    from tasks.io import atomic_path, n_workers, write_json

    start = time.perf_counter()
    size, channels = cfg.resize.size, cfg.dataset.channels
    jobs = _read_jobs(Path(clean), size, channels)
    todo = _uncached(jobs, str(cache))
    workers = min(n_workers(cfg.resize.workers), len(todo))
    shape = (len(jobs), size, size, channels)
    # Not fsynced (like tasks.io.atomic_path): the rename already keeps a crash of this process from
    # leaving a partial array under its name; after a power loss DVC's hash check catches a damaged one.
    with atomic_path(out, suffix=".npy") as tmp, open(tmp, "wb", buffering=0) as f, \
            _decoded(todo, size=size, channels=channels, cache=str(cache), workers=workers) as results:
        _write_npy_header(f, shape)
        counts = _stream(f, jobs, todo, results, size=size, channels=channels, cache=str(cache))
    seconds = time.perf_counter() - start
    summary = {"images": len(jobs), "decoded": counts.decoded, "cached": len(jobs) - counts.decoded,
               "shape": list(shape), "seconds": round(seconds, 3),
               "images_per_s": round(len(jobs) / seconds, 1), "workers": workers,
               "reduced_decodes": counts.reduced}
    write_json(stats, summary)
    log.info("resize: %d images -> %s %s: %d decoded (%d reduced), %d cached, %.2f s, %.0f images/s, "
             "%d worker(s)", len(jobs), out, shape, counts.decoded, counts.reduced, summary["cached"],
             seconds, summary["images_per_s"], workers)
    return summary

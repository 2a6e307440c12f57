"""The filter's verdict on one file's bytes: decoded in full by Pillow, checked, pHashed.

This runs in the filter's worker processes, so it imports only what decoding needs (Pillow, NumPy,
OpenCV through :mod:`medflow.imaging.phash`): no pandas, no pydantic. A worker starts in milliseconds from the fork
server (:mod:`medflow.imaging.workers`) instead of importing the whole filter step. The checks and their order are
documented in :mod:`medflow.imaging.quality`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from medflow.errors import StepError
from medflow.imaging import dicom, phash

# Pillow modes accepted after opening. Each converts without judgement calls: 1/L/P/PA/LA/RGB/RGBA/RGBX/
# CMYK through Pillow's own conversions, 16- and 32-bit integer grayscale (I;16*, I) by rescaling.
# Rejected: F (32-bit float: arbitrary range, NaN/inf; mapping it to pixels needs a windowing choice
# medflow does not make), YCbCr/LAB/HSV (only from TIFF and raw oddities, where Pillow's conversion
# of subsampled data is unreliable) and any other raw mode.
SUPPORTED_MODES = frozenset({"1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "CMYK",
                             "I", "I;16", "I;16B", "I;16L", "I;16N"})


class Limits(NamedTuple):
    """The filter parameters a verdict depends on (``filter.max_pixels``, ``filter.min_side``)."""

    max_pixels: int
    min_side: int


@dataclass(frozen=True)
class Verdict:
    """What decoding one file's content found; small, so it crosses process boundaries cheaply."""

    reason: str = ""  # "" = good, else one of medflow.imaging.quality.REASONS
    detail: str = ""
    phash: str = ""  # 16 hex digits, good images only
    thumb: str = ""  # good images only: phash.THUMB_SIDE^2 grey pixels (base64), for the near-duplicate pixel check
    crops: str = ""  # good images only: phash.crop_frames, the pHash and thumbnail of centred crops (slight crops)
    mode: str = ""  # Pillow mode as opened
    format: str = ""
    width: int = 0
    height: int = 0

    @property
    def ok(self) -> bool:
        return not self.reason


@contextlib.contextmanager
def _pil_guards(max_pixels: int) -> Iterator[None]:
    """Strict Pillow settings for one decode, restored afterwards (the inline path runs in the caller)."""
    old_max, old_trunc = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_max, old_trunc


def missing_end_marker(data: bytes, fmt: str) -> str:
    """A reason to call a JPEG/PNG truncated even though Pillow decoded it, or ""."""
    if fmt == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        # 0xFF is byte-stuffed inside scans, so neither marker occurs in entropy-coded data; bytes after
        # the EOI (padding, vendor trailers) are allowed.
        return "no JPEG end-of-image marker (FFD9) after the last scan"
    if fmt == "PNG" and data.rfind(b"IEND") < data.rfind(b"IDAT"):
        return "no PNG IEND chunk after the last IDAT chunk"
    return ""


def _gray(im: Image.Image) -> np.ndarray:
    """Decoded image as a 2-D array for pHash (scale does not matter: pHash ignores brightness/contrast)."""
    if im.mode.startswith("I"):
        return np.asarray(im).astype(np.float32)
    return np.asarray(im.convert("L"))


def too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    """The decompression-bomb check on header dimensions: what is wrong (for a detail), or "" when within
    ``max_pixels``. The filter's check, also applied by predict and ``evaluate --images`` before decoding."""
    n = width * height
    return f"{width}x{height} = {n} pixels > max_pixels {max_pixels}" if n > max_pixels else ""


def header_reason(width: int, height: int, mode: str, limits: Limits) -> tuple[str, str] | None:
    """The checks that need only the header, in the filter's order: pixel cap, mode, minimum side; (reason,
    detail) of the first that fails, None when all pass. Also what predict and ``evaluate --images`` apply."""
    if excess := too_many_pixels(width, height, limits.max_pixels):
        return "too_many_pixels", excess
    if mode not in SUPPORTED_MODES:
        return "unsupported_mode", f"mode {mode}"
    if min(width, height) < limits.min_side:
        return "too_small", f"{width}x{height}: shorter side < min_side {limits.min_side}"
    return None


def _header_reason(im: Image.Image, limits: Limits) -> tuple[str, str] | None:
    return header_reason(im.size[0], im.size[1], im.mode, limits)


def verdict(data: bytes, limits: Limits) -> Verdict:
    """Verdict for one file's bytes; never raises for bad image data."""
    if not data:
        return Verdict("zero_bytes", "empty file")
    if dicom.is_dicom(data):
        return dicom_verdict(data, limits)
    with _pil_guards(limits.max_pixels):
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return Verdict("not_an_image", "not a format Pillow can identify, nor DICOM (no DICM marker at "
                                           "offset 128)")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return Verdict("too_many_pixels", str(e))
        except Exception as e:  # any header failure is this file's verdict
            return Verdict("decode_error", f"{type(e).__name__}: {e}")
        with im:
            head = Verdict(mode=im.mode, format=im.format or "", width=im.size[0], height=im.size[1])
            reason, detail = _header_reason(im, limits) or _load_reason(im, data)
            if reason:
                return replace(head, reason=reason, detail=detail)
            try:
                return _fingerprinted(head, _gray(im))
            except Exception as e:  # a decoded image whose pixels cannot be converted
                detail = f"pixels unusable: {type(e).__name__}: {e}"
                return replace(head, reason="decode_error", detail=detail)


def dicom_verdict(data: bytes, limits: Limits) -> Verdict:
    """Verdict for a DICOM file (:mod:`medflow.imaging.dicom`): the header checks (pixel cap, no pixel data,
    multi-frame, photometric interpretation, transfer syntax, minimum side), then the full decode with the
    LUTs applied, whose 8-bit image is pHashed."""
    try:
        head = dicom.read_header(data)
    except StepError as e:
        return Verdict("decode_error", str(e).removeprefix("<bytes>: "))
    found = Verdict(mode=head.mode, format=dicom.FORMAT, width=head.width, height=head.height)
    if excess := too_many_pixels(head.width, head.height, limits.max_pixels):
        return replace(found, reason="too_many_pixels", detail=excess)
    if head.problem:
        return replace(found, reason=head.problem[0], detail=head.problem[1])
    if min(head.width, head.height) < limits.min_side:
        return replace(found, reason="too_small",
                       detail=f"{head.width}x{head.height}: shorter side < min_side {limits.min_side}")
    try:
        pixels = dicom.decode_pixels(data)
    except dicom.Reject as e:
        return replace(found, reason=e.reason, detail=e.detail)
    except StepError as e:
        return replace(found, reason="decode_error", detail=str(e).removeprefix("<bytes>: "))
    gray = pixels if pixels.ndim == 2 else np.asarray(Image.fromarray(pixels, "RGB").convert("L"))
    return _fingerprinted(found, gray)


def _fingerprinted(found: Verdict, gray: np.ndarray) -> Verdict:
    """``found`` with a good image's fingerprint: full-frame pHash and thumbnail, and the crop frames."""
    pixels = np.asarray(gray, dtype=np.float32)  # converted once: the frames take it as it is
    hashed, thumb = phash.fingerprint(pixels)
    return replace(found, phash=hashed, thumb=thumb, crops=phash.crop_frames(pixels))


def _load_reason(im: Image.Image, data: bytes) -> tuple[str, str]:
    """Fully decode ``im``; (reason, detail) for a truncated or undecodable image, else ("", "")."""
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return "too_many_pixels", str(e)
    except (OSError, EOFError) as e:
        kind = "truncated" if isinstance(e, EOFError) or "truncated" in str(e) else "decode_error"
        return kind, f"{type(e).__name__}: {e}"
    except Exception as e:  # decoders raise many types for broken data
        return "decode_error", f"{type(e).__name__}: {e}"
    marker = missing_end_marker(data, im.format or "")
    return ("truncated", marker) if marker else ("", "")


def inspect_file(path: str, limits: Limits) -> tuple[str, Verdict]:
    """Read one file, return (its sha256, its verdict). An unreadable file raises OSError."""
    data = Path(path).read_bytes()
    return hashlib.sha256(data).hexdigest(), verdict(data, limits)


def inspect_files(paths: list[str], limits: Limits) -> list[tuple[str, Verdict]]:
    """:func:`inspect_file` of each path: one chunk of the filter's work on a Dask worker (OpenCV single-threaded,
    one task per worker thread)."""
    cv2.setNumThreads(1)
    return [inspect_file(path, limits) for path in paths]


def worker_init() -> None:
    from medflow.imaging.workers import worker_started

    worker_started()  # dies with the step's process
    cv2.setNumThreads(1)  # one process per core already; no nested thread pools

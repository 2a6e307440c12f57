"""Preprocessing: encoded image bytes -> upright uint8 array ``(size, size, channels)``, RGB order.

The one preprocessing of the project: the resize step (through :mod:`medflow.imaging.parallel`), training,
evaluation (``evaluate --images``) and ``medflow predict`` all go through :func:`load_resized` (a file) or
:func:`decode_resized` (bytes, an upload say), so a model sees at inference exactly what it saw in training.

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

The format dispatch is :func:`decode_image`: one branch per decoder (libjpeg-turbo direct, Pillow for the
rest). Bump :data:`RESIZE_VERSION` whenever anything here changes what an image decodes to: it is part of
every resize cache key (:func:`medflow.imaging.cache.cache_key`). This module imports neither pandas nor
pydantic: the resize worker processes import it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from medflow.errors import StepError

# Part of every resize cache key: bump it when anything in the preprocessing below changes.
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


class ImageInfo(NamedTuple):
    """Header facts about one image (from clean.csv or a header probe)."""

    width: int
    height: int
    fmt: str
    mode: str


class Decoded(NamedTuple):
    """One preprocessed image, and whether its JPEG was decoded at a reduced DCT scale (a statistic)."""

    pixels: np.ndarray  # uint8 (size, size, channels), C-contiguous
    reduced: bool


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
    """Orientation tag of a TIFF structure (an EXIF payload after its ``Exif\\0\\0``); 1 when absent."""
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
    return decode_image(read_image(path), size=size, channels=channels,
                        info=_info_or_none(width, height, fmt, mode), name=str(path)).pixels


def decode_resized(data: bytes, *, size: int, channels: int, name: str = "<bytes>") -> np.ndarray:
    """Preprocess encoded image bytes (an upload, say) exactly as :func:`load_resized` preprocesses a file."""
    return decode_image(data, size=size, channels=channels, name=name).pixels


def read_image(path: Path | str) -> bytes:
    """The encoded bytes of an image file; StepError naming it when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise StepError(f"{path}: cannot read: {e.strerror or e}") from e


def decode_image(data: bytes, *, size: int, channels: int, info: ImageInfo | None = None,
                 name: str = "<bytes>") -> Decoded:
    """Decode and preprocess encoded bytes (see the module docstring); the dispatch over decoders.

    ``info`` are the header facts when known (the manifest has them), else the header is probed. ``name``
    names the image in errors. Also says whether the JPEG was decoded at a reduced DCT scale.
    """
    info = info or probe_header(data, name)
    if info.fmt in _JPEG_FORMATS and info.mode in _JPEG_DIRECT_MODES:
        # A grayscale JPEG is decoded and resized as one channel and replicated at the end (exactly what
        # libjpeg's gray -> colour conversion gives, on size**2 pixels instead of the source's).
        decoded = _decode_jpeg(data, 1 if info.mode == "L" else channels, size, name)
        reduced = decoded.shape[0] * decoded.shape[1] < info.width * info.height
        img = _resize_square(_ORIENT.get(jpeg_orientation(data), _upright)(decoded), size)
        return Decoded(_to_channels(img, channels), reduced)
    return Decoded(_resize_square(_decode_pillow(data, channels, name), size), False)


def _info_or_none(width: int | None, height: int | None, fmt: str | None,
                  mode: str | None) -> ImageInfo | None:
    if width is None or height is None or not fmt or not mode:
        return None
    return ImageInfo(int(width), int(height), fmt, mode)


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

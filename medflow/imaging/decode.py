"""Preprocessing: encoded image bytes -> upright uint8 array ``(size, size, channels)``, RGB order.

The one preprocessing of the project: the resize step (through :mod:`medflow.imaging.parallel`), training,
evaluation (``evaluate --images``) and ``medflow predict`` all go through :func:`load_resized` (a file) or
:func:`decode_resized` (bytes, an upload say), so a model sees at inference exactly what it saw in training.

- Large images are first shrunk by a whole factor ``k`` of 2, 4 or 8 (the largest that leaves both sides at
  least ``size``, :func:`jpeg_scale`): each ``k x k`` block (edge pixels replicated into a partial block)
  becomes its mean, then the area resize to ``size`` follows. A JPEG in mode L or RGB does this inside
  libjpeg-turbo (through simplejpeg, its TurboJPEG API): decoded in the DCT domain at scale 1/k, which is
  that block mean up to rounding; the entropy decoding still runs in full, the inverse DCT and colour
  conversion on up to 64 times fewer pixels. Every other decoder takes the block means of its full decode
  (:func:`block_reduce`). So a JPEG and a PNG of the same pixels give the same input up to JPEG
  quantisation, whatever their size. Only whole factors: libjpeg's other scales (3/8, 5/8, 6/8, 7/8) are
  a sharper low-pass than any box average, and a JPEG decoded at them is 2.7 grey levels on average
  (single pixels up to 191) from the PNG of the same COVID-CT slice; measured with a full decode as the
  reference, 1/k is 0.06-0.14 grey levels from the block mean (single pixels at most 3) on the Kermany
  X-rays, up to 0.45 (at most 5) on a colour 4:2:0 JPEG through the chroma upsampling. The EXIF
  orientation is read from the APP1 segment (:func:`jpeg_orientation`), and every decoder applies it
  after the block reduction, so the blocks are aligned alike.
- Everything else (PNG, BMP, TIFF, GIF, WebP, CMYK or 12-bit JPEG, ...) is decoded by Pillow and
  normalised: EXIF orientation applied; 16-bit and 32-bit modes (``I;16``, ``I``, ``F``) scaled to 8 bits
  by the image's own range (min -> 0, max -> 255; a constant image -> 0), because 12-bit data stored in
  16-bit PNGs would come out nearly black with a fixed ``>> 8``; palette -> RGB (RGBA if it has a
  transparent colour); any alpha composited over black; CMYK, YCbCr, LAB, HSV -> RGB.
- DICOM (the ``DICM`` marker at offset 128, any file name) is decoded by pydicom in
  :mod:`medflow.imaging.dicom`: Modality LUT, then VOI LUT or window (else the image's own range, as a
  16-bit PNG), MONOCHROME1 inverted; then block reduction and resize as for every other format. A DICOM
  file that is not one usable image (multi-frame, no pixel data, a transfer syntax no installed plugin
  decodes) raises :class:`medflow.imaging.dicom.Reject`, a StepError naming the file, the reason and the syntax.
- Channels: 1 -> ITU-R 601 luma (what JPEG's Y, Pillow's ``L`` and ``cv2.COLOR_BGR2GRAY`` compute);
  3 -> RGB order (never OpenCV's BGR); grayscale sources are replicated into three channels when asked.
- Geometry: stretched to ``size x size`` (aspect ratio not kept, the common practice for these datasets;
  the anatomy fills the frame) with ``cv2.INTER_AREA`` when shrinking both sides and ``cv2.INTER_LINEAR``
  otherwise (INTER_AREA enlarges like nearest neighbour, and small sources such as malaria cell crops
  are enlarged).
- Any file that cannot be decoded (a JPEG truncated after its last scan included) raises
  :class:`StepError` naming it: the filter step should have quarantined it.

The format dispatch is :func:`decode_image`: one branch per decoder (libjpeg-turbo direct, pydicom for
DICOM, Pillow for the rest). Bump :data:`RESIZE_VERSION` whenever anything here changes what an image
decodes to: it is part of every image store key (:func:`medflow.imaging.store.cache_key`). This module
imports neither pandas nor pydantic: the resize worker processes import it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from medflow.errors import StepError
from medflow.imaging import dicom

# Part of every image store key: bump it when anything in the preprocessing below changes.
RESIZE_VERSION = "3"  # 3: whole-factor block reduction for every format (was: any DCT scale, JPEG only)

# EXIF orientation (1-8) -> how to turn the stored pixels upright (what Pillow's exif_transpose does).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: cv2.flip(a, 1), 3: lambda a: cv2.rotate(a, cv2.ROTATE_180), 4: lambda a: cv2.flip(a, 0),
    5: lambda a: cv2.transpose(a), 6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: JPEG + appended pictures (libjpeg decodes the first)
_JPEG_DIRECT_MODES = frozenset({"L", "RGB"})  # other JPEG modes (CMYK, I;16) go through Pillow
_WHOLE_EIGHTHS = (1, 2, 4)  # DCT scales m/8 that are block means (8 // m whole): see the module docstring
_SOS, _EOI = b"\xff\xda", b"\xff\xd9"  # JPEG start-of-scan and end-of-image markers
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageInfo(NamedTuple):
    """Header facts about one image (from the clean table or a header probe)."""

    width: int
    height: int
    fmt: str
    mode: str


class Decoded(NamedTuple):
    """One preprocessed image, and whether its JPEG was decoded at a reduced DCT scale (a statistic)."""

    pixels: np.ndarray  # uint8 (size, size, channels), C-contiguous
    reduced: bool


def jpeg_scale(width: int, height: int, size: int) -> int:
    """The scale, in eighths (1, 2, 4 or 8), that an image of ``width x height`` is reduced to for ``size``.

    The smallest of 1/8, 2/8 and 4/8 that leaves both ``ceil(width * m / 8)`` and ``ceil(height * m / 8)``
    at least ``size``; 8 (no reduction) when none does. A JPEG is decoded at that DCT scale, any other
    image block-averaged by ``8 // m`` (:func:`block_reduce`): the reduced image is never upsampled back to
    ``size``, so no resolution is lost.
    """
    fits = (m for m in _WHOLE_EIGHTHS if -(-width * m // 8) >= size and -(-height * m // 8) >= size)
    return next(fits, 8)


def block_reduce(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean of every ``factor x factor`` block, the last partial row and column of blocks padded by
    replicating the edge pixels (as a JPEG encoder pads its blocks): ``ceil(h / factor) x ceil(w / factor)``.

    What libjpeg's DCT-domain decode at scale ``1 / factor`` computes, up to rounding.
    """
    if factor == 1:
        return img
    h, w = img.shape[:2]
    pad_h, pad_w = -h % factor, -w % factor
    padded = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE) if pad_h or pad_w else img
    # INTER_AREA by a whole factor is the exact block mean (rounded); OpenCV drops a single channel axis
    out = cv2.resize(padded, ((w + pad_w) // factor, (h + pad_h) // factor), interpolation=cv2.INTER_AREA)
    return out if out.ndim == img.ndim else out[:, :, None]


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
    """Width, height, format and mode from the image header, without decoding the pixels.

    DICOM: format ``DICOM`` and a Pillow-like mode (:mod:`medflow.imaging.dicom`); a DICOM file that is not
    one usable image raises :class:`medflow.imaging.dicom.Reject` naming the reason."""
    if dicom.is_dicom(data):
        head = dicom.read_header(data, name)
        if head.problem:
            raise dicom.Reject(name, *head.problem)
        return ImageInfo(head.width, head.height, dicom.FORMAT, head.mode)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return ImageInfo(im.width, im.height, im.format or "", im.mode)
    except Exception as e:  # Pillow raises many types on bad data; all mean "not an image"
        raise StepError(f"{name}: not a readable image: {pillow_error(e)}") from e


def pillow_error(e: Exception) -> str:
    """What a Pillow exception says, in words, without Pillow's ``<_io.BytesIO object at 0x...>`` (the caller
    names the file)."""
    if isinstance(e, UnidentifiedImageError) or "cannot identify image file" in str(e):
        return "not an image format Pillow can identify, nor DICOM (no DICM marker at offset 128)"
    text = _BUFFER_RE.sub("the data", str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_BUFFER_RE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


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
        stored, reduced = _decode_jpeg(data, 1 if info.mode == "L" else channels, size, name)
        orientation = jpeg_orientation(data)
    elif info.fmt == dicom.FORMAT:
        full, orientation = _decode_dicom(data, channels, name), 1
        stored, reduced = block_reduce(full, 8 // jpeg_scale(full.shape[1], full.shape[0], size)), False
    else:
        full, orientation = _decode_pillow(data, channels, name)
        stored, reduced = block_reduce(full, 8 // jpeg_scale(full.shape[1], full.shape[0], size)), False
    img = _resize_square(_ORIENT.get(orientation, _upright)(stored), size)
    return Decoded(_to_channels(img, channels), reduced)


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


def _decode_jpeg(data: bytes, channels: int, size: int, name: str) -> tuple[np.ndarray, bool]:
    """libjpeg-turbo decode at the scale of :func:`jpeg_scale` (of the JPEG's own header), stored
    orientation; gray (H, W, 1) or RGB, and whether the scale was reduced.

    Not strict: like OpenCV and Pillow, libjpeg's recoverable warnings (extraneous bytes before a marker,
    say) do not fail the image; a truncated one is caught by :func:`_jpeg_complete` first.
    """
    if not _jpeg_complete(data):
        raise StepError(f"{name}: truncated JPEG (no end-of-image marker after the last scan)")
    try:
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
        m = jpeg_scale(width, height, size)
        want = (-(-height * m // 8), -(-width * m // 8))
        # TurboJPEG decodes at the smallest of its scales reaching min_height x min_width: m/8 itself, as
        # the next smaller one loses a pixel on sides of 8 or more; 0 (no minimum) is a full decode.
        low = want if m < 8 else (0, 0)
        img = simplejpeg.decode_jpeg(data, "GRAY" if channels == 1 else "RGB", min_height=low[0],
                                     min_width=low[1], strict=False)
    except Exception as e:  # simplejpeg raises ValueError (and RuntimeError) on undecodable data
        raise StepError(f"{name}: cannot decode JPEG: {e}") from e
    if img.shape[:2] != want:
        raise StepError(f"{name}: libjpeg-turbo decoded {img.shape[1]}x{img.shape[0]} at scale {m}/8, "
                        f"expected {want[1]}x{want[0]}")
    return img, m < 8


def _decode_dicom(data: bytes, channels: int, name: str) -> np.ndarray:
    """pydicom decode with the LUTs applied (:func:`medflow.imaging.dicom.decode_pixels`): (H, W) grey or
    (H, W, 3) RGB, as :func:`_decode_pillow` gives; colour -> ITU-R 601 luma (Pillow's ``L``) for one channel."""
    img = dicom.decode_pixels(data, name)
    if img.ndim == 3 and channels == 1:
        img = np.asarray(Image.fromarray(img, "RGB").convert("L"))
    return np.ascontiguousarray(img)


def _decode_pillow(data: bytes, channels: int, name: str) -> tuple[np.ndarray, int]:
    """Pillow decode + normalisation (bit depth, palette, alpha, colour space), stored orientation; the
    pixels (H, W) or (H, W, 3) and the EXIF orientation (what ``ImageOps.exif_transpose`` would apply)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            img = _to_8bit_l_or_rgb(im).convert("L" if channels == 1 else "RGB")
            return np.asarray(img), _orientation(im)
    except Exception as e:  # Pillow raises many types on bad data; all mean "cannot decode"
        raise StepError(f"{name}: cannot decode image: {pillow_error(e)}") from e


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation Pillow reads, 1 (upright) when absent or when the EXIF block cannot be parsed: a
    broken metadata block does not make the pixels unusable (the filter passed them), as in
    :func:`jpeg_orientation`."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - any parse failure of the metadata block
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


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
    return Image.fromarray(dicom.stretch_to_uint8(np.asarray(im)), "L")


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

"""DICOM files: detection, header facts, the patient key and the decode to 8-bit pixels (with pydicom).

- Detection: the ``DICM`` marker at offset 128 (:func:`is_dicom`), whatever the file is called: DICOM
  files often have no extension, or a number after a dot. A DICOM data set without its 128-byte preamble
  and marker (allowed by old standards) is not recognised.
- Header facts (:func:`read_header`): read with ``stop_before_pixels``; width, height, a Pillow-like mode
  (``L`` for 8-bit grey, ``I;16`` for deeper grey, ``RGB`` for colour, so the shortcut check reads its bit
  depth alike), the transfer syntax and what would make the file unusable (:func:`header_problem`):
  ``no_pixel_data`` (a structured report, an RT plan: no Rows/Columns or no pixel data), ``multi_frame``
  (more than one frame: which one would be "the" image is a choice medflow does not make),
  ``unsupported_syntax`` (no installed pixel-data plugin decodes it; the detail names the syntax and its
  UID) and ``unsupported_mode`` (a photometric interpretation other than MONOCHROME1/2, RGB, YBR_* or
  PALETTE COLOR). pydicom 3 decodes uncompressed, deflated and RLE data itself; JPEG baseline, 8-bit JPEG
  extended and JPEG 2000 go through Pillow first (libjpeg-turbo, as medflow's JPEG files: the pixels of
  these files are what they were before the plugins came), and through the pylibjpeg plugins
  (dependencies) when Pillow fails; those alone decode 12-bit JPEG extended, JPEG lossless (process 14,
  SV1) and JPEG-LS (pylibjpeg-libjpeg), and HTJ2K (pylibjpeg-openjpeg). JPEG 2000 Part 2 multi-component
  and the video syntaxes have no decoder in pydicom: ``unsupported_syntax``.
- Pixels (:func:`decode_pixels`): pydicom's decode (bits stored respected: the unused high bits of each
  sample are masked, signed data sign-extended), then the Modality LUT (rescale slope and intercept, or
  the LUT sequence), then the VOI: the VOI LUT sequence if present, else the first window centre/width
  (LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3 C.11.2.1.2) mapped onto 0..255; without either, 8-bit
  samples without rescale are kept as they are (as an 8-bit PNG), deeper ones have the image's own range
  stretched onto 0..255 exactly as a 16-bit PNG (:func:`stretch_to_uint8`).
  MONOCHROME1 is inverted last, on the 8-bit values, so it is exactly ``255 -`` the MONOCHROME2 image of
  the same samples. Colour: YBR converted to RGB by pydicom, palettes applied; deeper colour stretched.
- Patients (:func:`patient_key`): PatientID, else StudyInstanceUID (one study is one patient); returned
  as a salted hash (:func:`hashed`), never in clear. No other tag (PatientName, BirthDate, ...) is read
  into anything medflow writes; pydicom's own warnings, which may quote element values, are silenced.

This module imports neither pandas nor pydantic: the filter and resize worker processes import it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medflow.errors import StepError

DICM_OFFSET = 128
DICM_MAGIC = b"DICM"
FORMAT = "DICOM"  # the manifest's ``format`` of a DICOM file
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# pydicom's warnings and log records can quote element values (a malformed PatientName, say): kept out of logs.
logging.getLogger("pydicom").setLevel(logging.ERROR)


class Reject(StepError):
    """A DICOM file that is not a usable image, with the filter's reject reason (medflow.imaging.quality)."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(f"{name}: {reason.replace('_', ' ')}: {detail}")
        self.reason, self.detail = reason, detail


class Header(NamedTuple):
    """What the header of one DICOM file says (no pixel data read)."""

    width: int
    height: int
    mode: str  # Pillow-like: L (8-bit grey), I;16 (9-16 bits), I (deeper) or RGB
    syntax: str  # transfer syntax name and UID, for messages
    problem: tuple[str, str] | None  # (reject reason, detail), or None when it can be decoded


def is_dicom(data: bytes) -> bool:
    """True if ``data`` (the whole file or at least its first 132 bytes) carries the DICM marker."""
    return data[DICM_OFFSET:DICM_OFFSET + 4] == DICM_MAGIC


def is_dicom_file(path: Path | str) -> bool:
    """True if the file at ``path`` is a regular file with the DICM marker at offset 128; False when it
    cannot be read. Opened non-blocking and checked on the descriptor: a FIFO or device is never read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode) and is_dicom(f.read(DICM_OFFSET + 4))
        except OSError:
            return False


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _read(source: bytes | Path | str, *, pixels: bool, name: str) -> Any:
    """The pydicom data set of ``source`` (bytes or a path); StepError naming ``name`` when unreadable."""
    import pydicom  # here, so that importing medflow.imaging.decode stays light

    fp: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with _quiet():
            return pydicom.dcmread(fp, stop_before_pixels=not pixels)
    except Exception as e:  # pydicom raises many types on malformed files; all mean "cannot read"
        raise StepError(f"{name}: not a readable DICOM file: {type(e).__name__}") from e


def _syntax(ds: Any) -> tuple[Any, str]:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return None, "no transfer syntax"
    return uid, f"{uid.name} ({uid})" if uid.name != uid else str(uid)


def _frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _syntax_problem(uid: Any, ds: Any, syntax: str) -> tuple[str, str] | None:
    """``unsupported_syntax`` when no installed plugin decodes ``uid`` (or the only one cannot: 12-bit
    JPEG extended through Pillow)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    if uid is None:
        return "unsupported_syntax", "no transfer syntax in the file meta information"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return "unsupported_syntax", f"transfer syntax {syntax}: pydicom has no decoder for it"
    if not decoder.is_available:
        return "unsupported_syntax", (f"transfer syntax {syntax}: no pixel-data plugin installed "
                                      "(pylibjpeg or the GDCM wheel would decode it)")
    if uid == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8 \
            and set(decoder.available_plugins) <= {"pillow"}:
        return "unsupported_syntax", f"transfer syntax {syntax} with 12-bit samples: Pillow decodes 8-bit only"
    return None


def header_problem(ds: Any, syntax: str) -> tuple[str, str] | None:
    """Why a data set cannot be used as one image (reason, detail), or None."""
    if "Rows" not in ds or "Columns" not in ds:
        kind = str(ds.get("Modality", "") or "no modality")
        return "no_pixel_data", f"DICOM object without pixel data ({kind}: not an image)"
    if any(tag in ds for tag in _PIXEL_TAGS[1:]):
        return "unsupported_mode", "float pixel data (a parametric map, not an image)"
    if (frames := _frames(ds)) > 1:
        return "multi_frame", f"{frames} frames: medflow reads single-frame images only"
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _GREY | _COLOUR:
        return "unsupported_mode", f"photometric interpretation {photometric or 'missing'}"
    return _syntax_problem(_syntax(ds)[0], ds, syntax)


def _mode(ds: Any) -> str:
    if str(ds.get("PhotometricInterpretation", "")) in _COLOUR:
        return "RGB"
    bits = int(ds.get("BitsStored", 8) or 8)
    return "L" if bits <= 8 else "I;16" if bits <= 16 else "I"


def header_of(ds: Any) -> Header:
    """The :class:`Header` of a data set read with or without its pixels."""
    _, syntax = _syntax(ds)
    width, height = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    return Header(width, height, _mode(ds), syntax, header_problem(ds, syntax))


def read_header(source: bytes | Path | str, name: str = "<bytes>") -> Header:
    """Header facts of a DICOM file (bytes or path), pixel data not read; StepError when unreadable."""
    return header_of(_read(source, pixels=False, name=name))


# --------------------------------------------------------------------------------------------------
# Patients


def patient_key(ds: Any) -> tuple[str, str] | None:
    """(tag, value) that identifies the patient: PatientID, else StudyInstanceUID; None when neither is set."""
    for tag in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(tag, "") or "").strip()
        if value:
            return tag, value
    return None


def hashed(tag: str, value: str, salt: bytes) -> str:
    """The group id of a patient key: ``dcm-`` and 16 hex digits of a salted SHA-256 (the tag is part of it,
    so a PatientID never meets an equal StudyInstanceUID)."""
    digest = hashlib.sha256(salt + b"\0" + tag.encode() + b"\0" + value.encode("utf-8", "replace"))
    return f"dcm-{digest.hexdigest()[:16]}"


def read_patient(path: Path | str, salt: bytes) -> tuple[Header, str, str] | None:
    """Header, hashed patient id and the tag it came from (PatientID or StudyInstanceUID; '' with no id:
    the id is then '') of a DICOM file; None when the file is not readable DICOM."""
    try:
        ds = _read(path, pixels=False, name=str(path))
    except StepError:
        return None
    key = patient_key(ds)
    return header_of(ds), hashed(*key, salt) if key else "", key[0] if key else ""


# --------------------------------------------------------------------------------------------------
# Pixels


def decode_pixels(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """A single-frame DICOM image as uint8, (H, W) grey or (H, W, 3) RGB, LUTs applied (module docstring).

    :class:`Reject` (a StepError with the filter's reason) when it is not a usable image, StepError naming
    ``name`` when it cannot be read or decoded.
    """
    ds = _read(data, pixels=True, name=name)
    head = header_of(ds)
    if head.problem:
        raise Reject(name, *head.problem)
    if "PixelData" not in ds:
        raise Reject(name, "no_pixel_data", "DICOM object without pixel data (not an image)")
    try:
        with _quiet():
            arr = _pixel_array(ds)
            return _to_8bit(arr, ds)
    except StepError as e:  # a window that cannot be applied
        raise StepError(f"{name}: {e}") from e
    except Exception as e:  # the plugins raise many types on broken data
        raise StepError(f"{name}: cannot decode DICOM pixel data ({head.syntax}): {type(e).__name__}: {e}") from e


def _pixel_array(ds: Any) -> np.ndarray:
    """pydicom's decode, Pillow first where it has the syntax (module docstring), then every plugin."""
    from pydicom.pixels import get_decoder

    uid = _syntax(ds)[0]
    if uid is not None and uid.is_compressed and "pillow" in get_decoder(uid).available_plugins:
        try:
            ds.pixel_array_options(decoding_plugin="pillow")
            return np.asarray(ds.pixel_array)
        except Exception:  # Pillow raises many types; the other plugins get their turn
            ds.pixel_array_options(decoding_plugin="")
    return np.asarray(ds.pixel_array)


def _to_8bit(arr: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if photometric not in _GREY:
        return arr if arr.dtype == np.uint8 else stretch_to_uint8(arr)
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    unit = _voi(values, ds)
    if unit is not None:
        out = np.rint(unit * 255.0).astype(np.uint8)
    elif arr.dtype == np.uint8 and np.array_equal(values, arr):  # 8-bit, no rescale: as an 8-bit PNG
        out = arr
    else:
        out = stretch_to_uint8(values)
    return 255 - out if photometric == "MONOCHROME1" else out


def stretch_to_uint8(a: np.ndarray) -> np.ndarray:
    """The array's own value range linearly onto 0..255 as uint8 (a constant array -> 0), in float32: the
    one scaling of deep images, 16-bit PNGs and TIFFs (:mod:`medflow.imaging.decode`) as DICOM without a
    window. Here rather than in decode so that the manifest step, which reads DICOM headers, needs no decoder."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.rint(scaled).astype(np.uint8)


def _first(value: Any) -> float:
    """The first of a multi-valued element (WindowCenter may list several windows)."""
    try:
        return float(value[0])
    except (TypeError, IndexError, KeyError):
        return float(value)


def _voi(values: np.ndarray, ds: Any) -> np.ndarray | None:
    """The VOI transform onto [0, 1]: the VOI LUT sequence, else the first window; None when there is none."""
    if ds.get("VOILUTSequence"):
        from pydicom.pixels import apply_voi

        out = np.asarray(apply_voi(values, ds, index=0), dtype=np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(out / max(float(2 ** bits - 1), float(out.max()), 1.0), 0.0, 1.0)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError):
        raise StepError("window centre/width is not a number") from None
    return window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper())


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1] (LINEAR, LINEAR_EXACT or SIGMOID)."""
    if function == "SIGMOID":
        if width <= 0:
            raise StepError(f"window width {width} must be > 0 for SIGMOID")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise StepError(f"window width {width} must be > 0 for LINEAR_EXACT")
        return np.clip((x - (center - width / 2)) / width, 0.0, 1.0)
    if function != "LINEAR":
        raise StepError(f"VOI LUT function {function} is not one of LINEAR, LINEAR_EXACT, SIGMOID")
    if width < 1:
        raise StepError(f"window width {width} must be >= 1 for LINEAR")
    c, w = center - 0.5, width - 1.0
    if w == 0:
        return (x > c).astype(np.float64)
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)

"""Bounded inputs for ``medflow predict`` and ``evaluate --images``: the pipeline's limits, applied to files
nobody has filtered.

- Files: only regular files are read (a link to ``/dev/zero``, a FIFO or a device is an error, never
  opened for a blocking read), at most :data:`MAX_IMAGE_BYTES` each (:func:`read_regular`).
- Verdicts: the filter's own header checks run before any decoding (:func:`medflow.imaging.verdict.header_reason`:
  width x height against ``filter.max_pixels``, an unsupported mode, a side below ``filter.min_side``), then its
  end-marker check (a truncated JPEG/PNG); each gives the image an error row, never a silent score.
- Memory: decoding runs in threads, one per core, so two gates bound what is held at once whatever the
  input: the encoded bytes read but not yet decoded (:data:`MAX_IMAGE_BYTES` in all) and the pixels being
  decoded (``filter.max_pixels`` in all: one image at the cap decodes alone, small ones in parallel).
- Archives (``medflow.inference``) are checked as the extract step checks them: ``extract.max_members``,
  ``extract.max_total_bytes`` and ``extract.max_ratio`` on the declared sizes, before any member is read.

Each failure is the error of one input (the caller writes it as a row), never an exception that stops the run.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medflow.config import ExtractConfig, FilterConfig
from medflow.errors import StepError
from medflow.imaging import dicom
from medflow.imaging.decode import ImageInfo, decode_image, probe_header
from medflow.imaging.verdict import Limits, header_reason, missing_end_marker

MAX_IMAGE_BYTES = 256 << 20  # an image file or archive member larger than this is an error, not read


@dataclass(frozen=True)
class InputLimits:
    """The caps applied to unfiltered inputs: the extract and filter parameters, and the per-file byte cap."""

    extract: ExtractConfig = field(default_factory=ExtractConfig)
    max_pixels: int = FilterConfig().max_pixels
    max_bytes: int = MAX_IMAGE_BYTES
    min_side: int = FilterConfig().min_side

    @classmethod
    def of(cls, extract: ExtractConfig, filter_cfg: FilterConfig) -> InputLimits:
        """The limits of a config's ``extract`` and ``filter`` sections."""
        return cls(extract=extract, max_pixels=filter_cfg.max_pixels, min_side=filter_cfg.min_side)


@dataclass(frozen=True)
class Item:
    """One image to decode: a display name, its declared size in bytes and how to get its bytes."""

    name: str
    read: Callable[[], bytes]
    size: int = 0


def read_regular(path: Path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; StepError naming it otherwise.

    Opened non-blocking (a FIFO would block a plain open) and checked on the open descriptor, so a link
    swapped in between cannot slip a device through.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise StepError(f"{path}: cannot read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StepError(f"{path}: not a regular file (a device, FIFO or socket); not read")
        if st.st_size > max_bytes:
            raise StepError(f"{path}: {st.st_size} bytes, over the {max_bytes}-byte cap per image; not read")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise StepError(f"{path}: grew past the {max_bytes}-byte cap per image while read; not read")
    return data


def file_item(path: Path, max_bytes: int = MAX_IMAGE_BYTES) -> Item:
    """An :class:`Item` reading ``path`` with :func:`read_regular`."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # the read reports it
    return Item(str(path), lambda: read_regular(path, max_bytes), size)


class Gate:
    """A weighted semaphore: the weights held at once sum to at most ``capacity`` (a heavier one runs alone)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, weight: int) -> int:
        """Wait until ``weight`` (clipped to the capacity) fits; return the weight held, for :meth:`release`."""
        w = min(max(weight, 0), self._capacity)
        with self._cond:
            self._cond.wait_for(lambda: self._used + w <= self._capacity)
            self._used += w
        return w

    def release(self, weight: int) -> None:
        with self._cond:
            self._used -= weight
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, weight: int) -> Iterator[None]:
        w = self.acquire(weight)
        try:
            yield
        finally:
            self.release(w)


@dataclass
class Decoder:
    """Preprocess items as for training, in ``pool``, within ``limits`` (see the module docstring)."""

    size: int
    channels: int
    limits: InputLimits
    pool: ThreadPoolExecutor
    read_gate: Gate = field(init=False)
    pixel_gate: Gate = field(init=False)

    def __post_init__(self) -> None:
        self.read_gate = Gate(self.limits.max_bytes)
        self.pixel_gate = Gate(self.limits.max_pixels)

    def decode(self, items: Sequence[Item]) -> list[tuple[np.ndarray | None, str | None]]:
        """(pixels or None, error or None) per item, in order. Items are read here, in the calling thread
        and in order (a compressed tar is read forwards, and tarfile is not thread-safe), and decoded in the
        pool; reading waits while the bytes read but not yet decoded would pass the cap."""
        futures: list[Future[tuple[np.ndarray | None, str | None]]] = []
        for item in items:
            held = self.read_gate.acquire(item.size)
            try:
                data = item.read()
            except StepError as e:
                self.read_gate.release(held)
                done: Future[tuple[np.ndarray | None, str | None]] = Future()
                done.set_result((None, str(e)))
                futures.append(done)
                continue
            held += self.read_gate.acquire(min(len(data), self.limits.max_bytes) - held)  # declared too little
            futures.append(self.pool.submit(self._one, item.name, data, held))
        return [f.result() for f in futures]

    def _one(self, name: str, data: bytes, held: int) -> tuple[np.ndarray | None, str | None]:
        try:
            info = probe_header(data, name)
            if problem := self._rejected(data, info):
                return None, f"{name}: {problem}; not decoded"
            with self.pixel_gate.hold(info.width * info.height):
                return decode_image(data, size=self.size, channels=self.channels, info=info, name=name).pixels, None
        except dicom.Reject as e:
            return None, f"{name}: {e.reason}: {e.detail} (the pipeline's filter rejects such images); not decoded"
        except StepError as e:
            return None, str(e)
        finally:
            self.read_gate.release(held)

    def _rejected(self, data: bytes, info: ImageInfo) -> str:
        """The filter's verdict from the header (pixel cap, mode, minimum side: ``filter.max_pixels``,
        ``min_side``) and the end markers (truncated), in words; "" when the image may be decoded. A DICOM
        file's mode was checked by its header probe. Any other failure of the filter's is the decoder's error."""
        limits = Limits(self.limits.max_pixels, self.limits.min_side)
        mode = "L" if info.fmt == dicom.FORMAT else info.mode
        found = header_reason(info.width, info.height, mode, limits)
        if found is None and (marker := missing_end_marker(data, info.fmt)):
            found = ("truncated", marker)
        if found is None:
            return ""
        param = {"too_many_pixels": "filter.max_pixels, ", "too_small": "filter.min_side, "}.get(found[0], "")
        return f"{found[0]}: {found[1]} ({param}the pipeline's filter rejects such images)"

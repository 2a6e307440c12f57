"""The resize step (dvc.yaml stage resize): every clean image -> one uint8 array ``(N, size, size, channels)``.

Output format. Row ``i`` of the array is row ``i`` of clean.csv. The file is a plain ``.npy`` (a header,
then the raw C-ordered bytes), so training opens it with ``np.load(path, mmap_mode="r")`` and slices
batches straight from the page cache: zero decode cost per epoch, and no need to hold the dataset in RAM.
It is filled with plain writes at each row's offset, cached rows copied from the resize cache
(:mod:`medflow.imaging.cache`) while the decoders (:mod:`medflow.imaging.parallel`) write the others, so
the step's peak memory does not grow with the dataset, and atomically (a temporary file renamed into
place): a crash leaves no half-written array under its name. The preprocessing is
:mod:`medflow.imaging.decode`'s, the one training, evaluation and prediction use.
"""

from __future__ import annotations

import csv
import io
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.lib import format as npy_format

from medflow.config import Config
from medflow.errors import StepError
from medflow.imaging.cache import IndexWriter, Job, cache_key, copy_cached, index_writer, open_index, plan_run
from medflow.imaging.decode import ImageInfo
from medflow.imaging.parallel import LateReject, Written, decoding
from medflow.io import atomic_path, n_workers, readable_path, source_roots, write_json

log = logging.getLogger(__name__)

_REQUIRED_COLUMNS = ("path", "sha256", "width", "height", "format", "mode")


class _Counts(NamedTuple):
    decoded: int
    reduced: int


def run(cfg: Config, *, clean: Path, out: Path, stats: Path, cache: Path,
        roots_json: Path | None = None) -> dict[str, Any]:
    """Resize every clean.csv image into ``out`` (uint8 ``(N, size, size, channels)`` .npy); write ``stats``.

    Only images missing from the content-addressed ``cache`` are decoded (in parallel processes). ``roots_json``
    (the extract step's) locates the paths under a source root outside the project.
    Returns the statistics also written to ``stats``: images, decoded, cached (= images - decoded),
    shape, seconds, images_per_s (images / seconds), workers (decoding processes, or threads for a
    handful of images; 0 when everything was cached) and reduced_decodes (JPEGs decoded at a reduced DCT scale).
    """
    start = time.perf_counter()
    size, channels = cfg.resize.size, cfg.dataset.channels
    nbytes = size * size * channels
    jobs = _read_jobs(Path(clean), size, channels, source_roots(roots_json))
    shape = (len(jobs), size, size, channels)
    # Not fsynced (like medflow.io.atomic_path): the rename already keeps a crash of this process from
    # leaving a partial array under its name; after a power loss DVC's hash check catches a damaged one.
    header = _npy_header(shape)
    try:
        counts, workers = _fill(jobs, header, out, Path(cache), size=size, channels=channels, nbytes=nbytes,
                                workers=cfg.resize.workers)
    except LateReject as e:  # see late_failure
        raise StepError(late_failure(e, Path(clean))) from None
    except OSError as e:  # the temporary array's header and size, and what the cache writes, on a full disk
        raise StepError(f"{e.filename or out}: cannot write the output: {e.strerror or e}") from e
    seconds = time.perf_counter() - start
    summary = {"images": len(jobs), "decoded": counts.decoded, "cached": len(jobs) - counts.decoded,
               "shape": list(shape), "seconds": round(seconds, 3),
               "images_per_s": round(len(jobs) / seconds, 1), "workers": workers,
               "reduced_decodes": counts.reduced}
    try:
        write_json(stats, summary, fsync=False)  # like the array, see above: DVC's hash check guards both
    except OSError as e:
        raise StepError(f"{stats}: cannot write the statistics: {e.strerror or e}") from e
    log.info("resize: %d images -> %s %s: %d decoded (%d reduced), %d cached, %.2f s, %.0f images/s, "
             "%d worker(s)", len(jobs), out, shape, counts.decoded, counts.reduced, summary["cached"],
             seconds, summary["images_per_s"], workers)
    return summary


def late_failure(e: LateReject, clean: Path) -> str:
    """The step's error for a clean.csv file that cannot be decoded now (changed or removed after the filter
    read it, or a decoder disagreeing with the filter's).

    The step stops rather than writing a placeholder row: images.npy is aligned row for row with clean.csv,
    which split, validate, train and evaluate all read, so a blank image would have to be dropped by every
    one of them or it is trained on under its label. The filter is the one quarantine: a changed file has a
    new size or mtime, so the next ``dvc repro`` re-runs manifest and filter, which list it in rejects.csv."""
    return (f"{e}. {clean} lists it (the filter passed it): it changed after the filter read it, or the decoder "
            "disagrees with the filter. Nothing was written. Re-run `dvc repro`: the manifest and filter steps "
            "re-read a changed file and list it in rejects.csv; if this step fails again on the same file, "
            "move the file out of the source folder and report it")


def _fill(jobs: list[Job], header: bytes, out: Path, cache: Path, *, size: int, channels: int, nbytes: int,
          workers: int) -> tuple[_Counts, int]:
    """Write the array: cached rows copied, the others decoded; (counts, decoding workers used)."""
    with open_index(cache, (job.key for job in jobs)) as (db, found):
        plan = plan_run(jobs, found, start=len(header), nbytes=nbytes)
        workers = min(n_workers(workers), len(plan.todo))
        with atomic_path(out, suffix=".npy") as tmp, open(tmp, "wb") as f, index_writer(db, str(cache)) as index:
            f.write(header)
            f.truncate(len(header) + len(jobs) * nbytes)
            f.flush()
            # the workers write the decoded rows while this process copies the cached ones
            with decoding(plan.todo, size=size, channels=channels, workers=workers, out=str(tmp),
                          cache=str(cache), run_id=uuid.uuid4().hex) as results:
                copy_cached(f.fileno(), plan.hits, start=len(header), nbytes=nbytes, out=str(out))
                counts = _collect(results, index, nbytes=nbytes, expected=len(plan.todo))
    return counts, workers


def _read_jobs(clean: Path, size: int, channels: int, roots: Mapping[str, Path]) -> list[Job]:
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
            jobs = [_job([row[i] if i < len(row) else "" for i in columns], line, clean, size, channels, roots)
                    for line, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StepError(f"{clean}: cannot read clean manifest: {e}") from e
    if not jobs:
        raise StepError(f"{clean}: no images to resize (every file was rejected or none were found)")
    return jobs


def _job(values: list[str], line: int, clean: Path, size: int, channels: int, roots: Mapping[str, Path]) -> Job:
    """The job of one row; ``values`` in the order of ``_REQUIRED_COLUMNS``."""
    path, sha, w, h, fmt, mode = values
    if not path or not sha:
        raise StepError(f"{clean}: row {line} has no path or sha256")
    try:
        info = ImageInfo(int(float(w)), int(float(h)), fmt, mode) if w and h and fmt and mode else None
    except ValueError:
        raise StepError(f"{clean}: row {line}: width/height {w!r}/{h!r} are not numbers") from None
    return Job(cache_key(sha, size, channels), readable_path(path, roots), info)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy (version 1.0) header of a C-ordered uint8 array of ``shape``."""
    header = {"descr": npy_format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _collect(results: Iterator[Written], index: IndexWriter, *, nbytes: int, expected: int) -> _Counts:
    """Record each decoded image in the cache index as it arrives (the decoders wrote its bytes)."""
    decoded = reduced = 0
    for result in results:
        index.record(result.key, result.shard, result.offset, nbytes)
        decoded, reduced = decoded + 1, reduced + result.reduced
    if decoded != expected:  # cannot happen unless an executor loses work: never write a partial array
        raise StepError(f"resize: {decoded} of {expected} images came back from decoding")
    return _Counts(decoded, reduced)

"""The resize step (dvc.yaml stage resize): every clean image -> one uint8 array ``(N, size, size, channels)``.

Output format. Row ``i`` of the array is row ``i`` of clean.csv. The file is a plain ``.npy`` (a header,
then the raw C-ordered bytes), so training opens it with ``np.load(path, mmap_mode="r")`` and slices
batches straight from the page cache: zero decode cost per epoch, and no need to hold the dataset in RAM.
It is filled with plain writes at each row's offset, cached rows copied from the resize cache
(:mod:`medflow.imaging.cache`) while the decoders (:mod:`medflow.imaging.parallel`) write the others, so
the step's peak memory does not grow with the dataset, and atomically (a temporary file renamed into
place): a crash leaves no half-written array under its name. The preprocessing is
:mod:`medflow.imaging.decode`'s, the one training, evaluation and prediction use.

One file never stops the step. A file clean.csv lists (the filter passed it) that cannot be read or decoded
now (it changed after the filter read it, or a decoder disagrees with the filter's) keeps its row, all
zeros and not cached, so that row ``i`` is still row ``i`` of clean.csv, and is listed in ``rejects``
(:data:`RESIZE_REJECT_COLUMNS`, reason :data:`LATE_REASON`, its ``row``). The split step quarantines those
rows (split_rejects.csv: in images.npy, in no split), so validate counts them and train and evaluate never
read them. Only every image failing stops the step (nothing written).
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
from medflow.imaging.parallel import Failed, Result, decoding
from medflow.io import atomic_open, atomic_path, n_workers, readable_path, source_roots, write_json
from medflow.schema import REJECT_COLUMNS

log = logging.getLogger(__name__)

_REQUIRED_COLUMNS = ("path", "sha256", "width", "height", "format", "mode")
LATE_REASON = "resize_decode_error"  # a file the filter passed that resize cannot decode
RESIZE_REJECT_COLUMNS = [*REJECT_COLUMNS, "row"]  # row: in clean.csv and images.npy (all zeros)
_NOTE = ("the filter passed it: it changed after the filter read it, or the decoder disagrees with the filter's; "
         "the next `dvc repro` re-reads a changed file")


class _Counts(NamedTuple):
    decoded: int
    reduced: int
    failed: dict[str, str]  # cache key -> the decoder's error


class _Listed(NamedTuple):
    """What a rejects row repeats of a clean.csv row."""

    path: str  # as clean.csv writes it
    sha256: str
    bytes: str


def run(cfg: Config, *, clean: Path, out: Path, stats: Path, cache: Path, rejects: Path | None = None,
        roots_json: Path | None = None) -> dict[str, Any]:
    """Resize every clean.csv image into ``out`` (uint8 ``(N, size, size, channels)`` .npy); write ``stats``
    and ``rejects`` (default: resize_rejects.csv beside ``out``; header only when every image decoded).

    Only images missing from the content-addressed ``cache`` are decoded (in parallel processes). ``roots_json``
    (the extract step's) locates the paths under a source root outside the project.
    Returns the statistics also written to ``stats``: images, decoded, cached (= images - decoded - rejected),
    rejected (rows listed in ``rejects``), shape, seconds, images_per_s (images / seconds), workers (decoding
    processes, or threads for a handful of images; 0 when everything was cached) and reduced_decodes (JPEGs
    decoded at a reduced DCT scale).
    """
    start = time.perf_counter()
    size, channels = cfg.resize.size, cfg.dataset.channels
    nbytes = size * size * channels
    rejects = Path(out).with_name("resize_rejects.csv") if rejects is None else Path(rejects)
    jobs, listed = _read_jobs(Path(clean), size, channels, source_roots(roots_json))
    shape = (len(jobs), size, size, channels)
    # Not fsynced (like medflow.io.atomic_path): the rename already keeps a crash of this process from
    # leaving a partial array under its name; after a power loss DVC's hash check catches a damaged one.
    header = _npy_header(shape)
    try:
        counts, workers = _fill(jobs, header, out, Path(cache), size=size, channels=channels, nbytes=nbytes,
                                workers=cfg.resize.workers, dask_address=cfg.compute.dask_address)
        rows = _reject_rows(jobs, listed, counts.failed)
        _write_rejects(rejects, rows)
    except OSError as e:  # the temporary array's header and size, and what the cache writes, on a full disk
        raise StepError(f"{e.filename or out}: cannot write the output: {e.strerror or e}") from e
    seconds = time.perf_counter() - start
    decoded = counts.decoded
    summary = {"images": len(jobs), "decoded": decoded, "cached": len(jobs) - decoded - len(rows),
               "rejected": len(rows), "shape": list(shape), "seconds": round(seconds, 3),
               "images_per_s": round(len(jobs) / seconds, 1), "workers": workers,
               "reduced_decodes": counts.reduced}
    try:
        write_json(stats, summary, fsync=False)  # like the array, see above: DVC's hash check guards both
    except OSError as e:
        raise StepError(f"{stats}: cannot write the statistics: {e.strerror or e}") from e
    if rows:
        log.warning("resize: %d image(s) the filter passed cannot be decoded now (%s): their rows are zeros, "
                    "listed in %s for the split step to quarantine, e.g. %s", len(rows), LATE_REASON, rejects,
                    "; ".join(f"{r['path']}: {r['detail']}" for r in rows[:3]))
    log.info("resize: %d images -> %s %s: %d decoded (%d reduced), %d cached, %d rejected, %.2f s, %.0f images/s, "
             "%d worker(s)", len(jobs), out, shape, decoded, counts.reduced, summary["cached"], len(rows),
             seconds, summary["images_per_s"], workers)
    return summary


def _reject_rows(jobs: list[Job], listed: list[_Listed], failed: Mapping[str, str]) -> list[dict[str, Any]]:
    """One RESIZE_REJECT_COLUMNS row per clean.csv row whose image failed (the file named by ``path`` only)."""
    rows = []
    for row, (job, item) in enumerate(zip(jobs, listed, strict=True)):
        if job.key in failed:
            error = failed[job.key]
            detail = error.removeprefix(f"{job.path}: ").removeprefix(f"{item.path}: ")
            rows.append({"path": item.path, "reason": LATE_REASON, "detail": f"{detail} ({_NOTE})",
                         "sha256": item.sha256, "bytes": item.bytes, "row": row})
    return rows


def _write_rejects(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rejects CSV, atomically (the csv module: no pandas in this step); header only when empty."""
    with atomic_open(path, "w", newline="", encoding="utf-8", fsync=False) as f:
        writer = csv.DictWriter(f, fieldnames=RESIZE_REJECT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _fill(jobs: list[Job], header: bytes, out: Path, cache: Path, *, size: int, channels: int, nbytes: int,
          workers: int, dask_address: str | None = None) -> tuple[_Counts, int]:
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
                          cache=str(cache), run_id=uuid.uuid4().hex, dask_address=dask_address) as results:
                copy_cached(f.fileno(), plan.hits, start=len(header), nbytes=nbytes, out=str(out))
                counts = _collect(results, index, nbytes=nbytes, expected=len(plan.todo))
            if counts.failed and not plan.hits and len(counts.failed) == len(plan.todo):
                raise StepError(_all_failed(counts.failed))  # inside atomic_path: nothing is written
    return counts, workers


def _all_failed(failed: Mapping[str, str]) -> str:
    first = next(iter(failed.values()))
    return (f"resize: none of the {len(failed)} image(s) the filter passed can be decoded now ({_NOTE}), "
            f"e.g. {first}. Nothing was written")


def _read_jobs(clean: Path, size: int, channels: int,
               roots: Mapping[str, Path]) -> tuple[list[Job], list[_Listed]]:
    """One job per clean.csv row, in row order, and what a rejects row repeats of it (path, sha256, bytes);
    StepError on a missing column or an empty table.

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
            size_column = header.index("bytes") if "bytes" in header else len(header)
            rows = [[*(row[i] if i < len(row) else "" for i in columns),
                     row[size_column] if size_column < len(row) else ""] for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StepError(f"{clean}: cannot read clean manifest: {e}") from e
    if not rows:
        raise StepError(f"{clean}: no images to resize (every file was rejected or none were found)")
    jobs = [_job(row[:-1], line, clean, size, channels, roots) for line, row in enumerate(rows, start=2)]
    return jobs, [_Listed(row[0], row[1], row[-1]) for row in rows]


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


def _collect(results: Iterator[Result], index: IndexWriter, *, nbytes: int, expected: int) -> _Counts:
    """Record each decoded image in the cache index as it arrives (the decoders wrote its bytes); collect
    the failed ones (their rows stay zero, nothing cached)."""
    decoded = reduced = 0
    failed: dict[str, str] = {}
    for result in results:
        if isinstance(result, Failed):
            failed[result.key] = result.error
            continue
        index.record(result.key, result.shard, result.offset, nbytes)
        decoded, reduced = decoded + 1, reduced + result.reduced
    if decoded + len(failed) != expected:  # cannot happen unless an executor loses work: never a partial array
        raise StepError(f"resize: {decoded + len(failed)} of {expected} images came back from decoding")
    return _Counts(decoded, reduced, failed)

"""The resize step (dvc.yaml stage resize): every clean image -> an image store ``(N, size, size, channels)``.

Output format: an image store (:class:`medflow.io.ImageStore`, written by :mod:`medflow.imaging.store`), a
folder of immutable shard files of raw uint8 rows and a small row index; row ``i`` is row ``i`` of
the clean table. Readers memory-map each shard and gather batches straight from the page cache: zero decode cost
per epoch, and no need to hold the dataset in RAM. The store lives in ``--cache`` (persistent) and is
published to ``--out`` as hard links: each image is written once, only the images the store lacks are
decoded (:mod:`medflow.imaging.parallel`), and an increment adds new shards and a new index while the old
shards stay byte-identical, so DVC hashes and caches the new data alone. The step's peak memory does not
grow with the dataset, and a crash leaves the previous store and its published copy whole. The
preprocessing is :mod:`medflow.imaging.decode`'s, the one training, evaluation and prediction use.

One file never stops the step. A file clean table lists (the filter passed it) that cannot be read or decoded
now (it changed after the filter read it, or a decoder disagrees with the filter's) keeps its row, without
pixels (it reads as zeros) and not stored, so that row ``i`` is still row ``i`` of the clean table, and is listed
in ``rejects`` (:data:`RESIZE_REJECT_COLUMNS`, reason :data:`LATE_REASON`, its ``row``). The split step
quarantines those rows (split_rejects.csv: in the store, in no split), so validate counts them and train and
evaluate never read them. Only every image failing stops the step (nothing written).
"""

from __future__ import annotations

import csv
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from medflow.config import Config
from medflow.errors import StepError
from medflow.imaging import cluster, store
from medflow.imaging.decode import ImageInfo
from medflow.imaging.parallel import Failed, Result, Written, decoding
from medflow.imaging.store import Job, cache_key
from medflow.io import TableText, atomic_open, n_workers, readable_path, source_roots, write_json
from medflow.schema import REJECT_COLUMNS

log = logging.getLogger(__name__)

_REQUIRED_COLUMNS = ("path", "sha256", "width", "height", "format", "mode")
LATE_REASON = "resize_decode_error"  # a file the filter passed that resize cannot decode
RESIZE_REJECT_COLUMNS = [*REJECT_COLUMNS, "row"]  # row: in the clean table and the store (no pixels: zeros)
_NOTE = ("the filter passed it: it changed after the filter read it, or the decoder disagrees with the filter's; "
         "the next `dvc repro` re-reads a changed file")


class _Counts(NamedTuple):
    decoded: int
    reduced: int
    failed: dict[str, str]  # cache key -> the decoder's error
    written: list[tuple[str, str, int]]  # (cache key, part file, offset) of each decoded image


class _Listed(NamedTuple):
    """What a rejects row repeats of a clean table row."""

    path: str  # as the clean table writes it
    sha256: str
    bytes: str


def run(cfg: Config, *, clean: Path, out: Path, stats: Path, cache: Path, rejects: Path | None = None,
        roots_json: Path | None = None) -> dict[str, Any]:
    """Resize every clean table image into the image store ``cache``, published to ``out`` (a folder); write
    ``stats`` and ``rejects`` (default: resize_rejects.csv beside ``out``; header only when every image decoded).

    Only images missing from the content-addressed store are decoded (in parallel processes). ``roots_json``
    (the extract step's) locates the paths under a source root outside the project.
    Returns the statistics also written to ``stats``: images, decoded, cached (= images - decoded - rejected),
    rejected (rows listed in ``rejects``), shape, seconds, images_per_s (images / seconds), workers (decoding
    processes, or threads for a handful of images; 0 when everything was cached), reduced_decodes (JPEGs
    decoded at a reduced DCT scale), shards (files of the store) and new_shards (written by this run).
    """
    start = time.perf_counter()
    size, channels = cfg.resize.size, cfg.dataset.channels
    out, cache = Path(out), Path(cache)
    if out.resolve() == cache.resolve():
        raise StepError(f"--out {out} and --cache {cache}: the store and its published copy need two folders")
    rejects = out.with_name("resize_rejects.csv") if rejects is None else Path(rejects)
    jobs = _read_jobs(Path(clean), size, channels, source_roots(roots_json))
    shape = (len(jobs), size, size, channels)
    try:
        counts, workers, index = _fill(jobs, shape, out, cache, workers=cfg.resize.workers,
                                       dask_address=cfg.compute.dask_address)
        rows = _reject_rows(Path(clean), jobs, counts.failed)
        _write_rejects(rejects, rows)
    except OSError as e:  # what the store writes, on a full disk
        raise StepError(f"{e.filename or out}: cannot write the output: {e.strerror or e}") from e
    seconds = time.perf_counter() - start
    decoded = counts.decoded
    summary = {"images": len(jobs), "decoded": decoded, "cached": len(jobs) - decoded - len(rows),
               "rejected": len(rows), "shape": list(shape), "seconds": round(seconds, 3),
               "images_per_s": round(len(jobs) / seconds, 1), "workers": workers,
               "reduced_decodes": counts.reduced, "shards": len(index["shards"]),
               "new_shards": len({part for _, part, _ in counts.written}),
               "decoded_on": _decoded_on(cfg, counts)}
    try:
        write_json(stats, summary, fsync=False)  # like the index, see medflow.imaging.store.write_index
    except OSError as e:
        raise StepError(f"{stats}: cannot write the statistics: {e.strerror or e}") from e
    if rows:
        log.warning("resize: %d image(s) the filter passed cannot be decoded now (%s): their rows have no pixels "
                    "(zeros), listed in %s for the split step to quarantine, e.g. %s", len(rows), LATE_REASON,
                    rejects, "; ".join(f"{r['path']}: {r['detail']}" for r in rows[:3]))
    log.info("resize: %d images -> %s %s: %d decoded (%d reduced), %d cached, %d rejected, %.2f s, %.0f images/s, "
             "%d worker(s), %d shard(s), %d new", len(jobs), out, shape, decoded, counts.reduced, summary["cached"],
             len(rows), seconds, summary["images_per_s"], workers, summary["shards"], summary["new_shards"])
    return summary


def _reject_rows(clean: Path, jobs: list[Job], failed: Mapping[str, str]) -> list[dict[str, Any]]:
    """One RESIZE_REJECT_COLUMNS row per clean table row whose image failed (the file named by ``path`` only);
    what the row repeats of the clean table is read again for those rows alone (none kept for every row)."""
    bad = {row: failed[job.key] for row, job in enumerate(jobs) if job.key in failed}
    if not bad:
        return []
    rows = []
    for row, item in _listed(clean, bad):
        detail = bad[row].removeprefix(f"{jobs[row].path}: ").removeprefix(f"{item.path}: ")
        rows.append({"path": item.path, "reason": LATE_REASON, "detail": f"{detail} ({_NOTE})",
                     "sha256": item.sha256, "bytes": item.bytes, "row": row})
    return rows


def _listed(clean: Path, wanted: Mapping[int, object]) -> Iterator[tuple[int, _Listed]]:
    """(row, path, sha256 and bytes as the clean table writes them) of the ``wanted`` rows, in row order."""
    with TableText(clean) as f:
        reader = csv.reader(f)
        header = next(reader, [])
        at = [header.index(c) if c in header else len(header) for c in ("path", "sha256", "bytes")]
        for row, values in enumerate(reader):
            if row in wanted:
                yield row, _Listed(*(values[i] if i < len(values) else "" for i in at))


def _decoded_on(cfg: Config, counts: _Counts) -> str:
    """Where this run's new images were decoded: ``dask`` (a cluster, README "Dask"), ``local`` or ``none``."""
    if not counts.decoded and not counts.failed:
        return "none"
    return "dask" if cluster.scheduler_address(cfg.compute.dask_address) is not None else "local"


def _write_rejects(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rejects CSV, atomically (the csv module: no pandas in this step); header only when empty."""
    with atomic_open(path, "w", newline="", encoding="utf-8", fsync=False) as f:
        writer = csv.DictWriter(f, fieldnames=RESIZE_REJECT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _fill(jobs: list[Job], shape: tuple[int, int, int, int], out: Path, cache: Path, *,
          workers: int, dask_address: str | None = None) -> tuple[_Counts, int, dict[str, Any]]:
    """Decode what the store lacks, write its index and publish it; (counts, decoding workers used, index)."""
    nbytes = shape[1] * shape[2] * shape[3]
    with store.store_lock(cache):
        plan = store.plan_run(jobs, store.known_entries(cache, shape[1:]))  # the index's keys freed at once
        workers = min(n_workers(workers), len(plan.todo))
        run_id = uuid.uuid4().hex
        try:
            rows = store.rows_per_shard(nbytes)  # the one choice of the layout, passed to every decoder
            with decoding(plan.todo, size=shape[1], channels=shape[3], workers=workers, cache=str(cache),
                          run_id=run_id, shard_rows=rows, dask_address=dask_address) as results:
                counts = _collect(results, expected=len(plan.todo))
            if counts.failed and not plan.hits and len(counts.failed) == len(plan.todo):
                raise StepError(_all_failed(counts.failed))  # nothing is written
            new = store.finish_shards(cache, plan.todo, counts.written, nbytes, run_id, rows)
        finally:
            store.remove_parts(cache, run_id)  # what a failed run decoded (none once the shards are named)
        entries = [plan.hits.get(row) or new.get(job.key) for row, job in enumerate(jobs)]
        index = store.write_index(cache, shape, [job.key for job in jobs], entries)
        store.publish(cache, out, index["shards"])
        removed = store.collect_garbage(cache, set(index["shards"]))
        log.debug("resize: %d file(s) no longer referenced removed from %s", removed, cache)
    return counts, workers, index


def _all_failed(failed: Mapping[str, str]) -> str:
    first = next(iter(failed.values()))
    return (f"resize: none of the {len(failed)} image(s) the filter passed can be decoded now ({_NOTE}), "
            f"e.g. {first}. Nothing was written")


def _read_jobs(clean: Path, size: int, channels: int, roots: Mapping[str, Path]) -> list[Job]:
    """One job per clean table row, in row order; StepError on a missing column or an empty table.

    Read with the csv module, columns by position, row by row: a few thousand rows and seven columns do not
    need pandas, whose fixed cost is a visible share of an incremental run (nor ``DictReader``, half as fast),
    and no row is held but its job, whose header facts are shared by the rows that have the same (most do).
    """
    infos: dict[tuple[str, ...], ImageInfo | None] = {}
    try:
        with TableText(clean) as f:  # a table folder (its parts in order) or one CSV
            reader = csv.reader(f)
            header = next(reader, [])
            missing = [c for c in _REQUIRED_COLUMNS if c not in header]
            if missing:
                raise StepError(f"{clean}: missing column(s) {', '.join(missing)}")
            columns = [header.index(c) for c in _REQUIRED_COLUMNS]
            jobs = [_job([row[i] if i < len(row) else "" for i in columns], line, clean, size, channels, roots, infos)
                    for line, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StepError(f"{clean}: cannot read clean manifest: {e}") from e
    if not jobs:
        raise StepError(f"{clean}: no images to resize (every file was rejected or none were found)")
    return jobs


def _job(values: list[str], line: int, clean: Path, size: int, channels: int, roots: Mapping[str, Path],
         infos: dict[tuple[str, ...], ImageInfo | None]) -> Job:
    """The job of one row; ``values`` in the order of ``_REQUIRED_COLUMNS``; ``infos``: the header facts made so
    far, by their text (one object for the rows that share them)."""
    path, sha, *header = values
    if not path or not sha:
        raise StepError(f"{clean}: row {line} has no path or sha256")
    facts = tuple(header)
    if facts not in infos:
        w, h, fmt, mode = header
        try:
            infos[facts] = ImageInfo(int(float(w)), int(float(h)), fmt, mode) if w and h and fmt and mode else None
        except ValueError:
            raise StepError(f"{clean}: row {line}: width/height {w!r}/{h!r} are not numbers") from None
    return Job(cache_key(sha, size, channels), readable_path(path, roots), infos[facts])


def _collect(results: Iterator[Result], *, expected: int) -> _Counts:
    """Collect where each decoded image went (the decoders wrote its bytes) and the failed ones (their rows
    get no pixels, nothing stored)."""
    reduced = 0
    failed: dict[str, str] = {}
    written: list[tuple[str, str, int]] = []
    parts: dict[str, str] = {}  # one string per part file, not one per image
    for result in results:
        if isinstance(result, Failed):
            failed[result.key] = result.error
            continue
        assert isinstance(result, Written)
        written.append((result.key, parts.setdefault(result.shard, result.shard), result.offset))
        reduced += result.reduced
    if len(written) + len(failed) != expected:  # cannot happen unless an executor loses work: never a partial store
        raise StepError(f"resize: {len(written) + len(failed)} of {expected} images came back from decoding")
    return _Counts(len(written), reduced, failed, written)

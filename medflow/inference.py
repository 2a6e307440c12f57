"""Score new images with a trained model: ``medflow predict PATH... [--model DIR] [--out preds.csv]``.

Inputs may be files, folders (searched recursively for images), glob patterns and archives (.zip, .tar,
.tar.gz, .tgz; members are read in memory, nothing is extracted). Every image goes through the resize step's
own decoder (:func:`medflow.imaging.decode.decode_resized`) at the model's size and channels, exactly the training
preprocessing. Decoding runs in a thread pool one batch ahead of the model. A file that cannot be read or
decoded gets a row with its error and the rest are scored; the run never stops on one bad file.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from medflow.data.archives import is_junk
from medflow.data.manifest import iter_images
from medflow.errors import StepError
from medflow.evaluation.assess import TrainedModel, load_trained
from medflow.imaging.decode import decode_resized
from medflow.io import atomic_open, n_workers
from medflow.schema import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

COLUMNS = ["path", "probability", "predicted", "class_name", "threshold", "error"]
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_MEMBER_BYTES = 1 << 30  # an archive member larger than this is reported, not read


@dataclass(frozen=True)
class Item:
    """One image to score: a display name and how to get its bytes."""

    name: str
    read: Callable[[], bytes]


def _read_file(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise StepError(f"cannot read: {e.strerror or e}") from e
    return read


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _archive_items(path: Path) -> Iterator[Item]:
    """Image members of an archive; their bytes are read when the batch is decoded (main thread)."""
    if path.name.lower().endswith(".zip"):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise StepError(f"{path}: not a readable zip archive ({e})") from e
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            rel = PurePosixPath(info.filename)
            if info.is_dir() or is_junk(rel) or not _is_image_name(info.filename):
                continue
            yield Item(f"{path}!{info.filename}", _member_reader(path, info.filename, info.file_size,
                                                                   partial(zf.read, info.filename)))
        return
    try:  # kept open while its members are read (the process ends it)
        tf = tarfile.open(path)  # noqa: SIM115
    except (tarfile.TarError, OSError) as e:
        raise StepError(f"{path}: not a readable tar archive ({e})") from e
    for member in tf.getmembers():  # archive order: a compressed tar is read forwards only once
        if not member.isfile() or is_junk(PurePosixPath(member.name)) or not _is_image_name(member.name):
            continue

        def read_member(m: tarfile.TarInfo = member) -> bytes:
            f = tf.extractfile(m)
            if f is None:
                raise StepError("not a regular file")
            return f.read()
        yield Item(f"{path}!{member.name}", _member_reader(path, member.name, member.size, read_member))


def _member_reader(archive: Path, name: str, size: int, read: Callable[[], bytes]) -> Callable[[], bytes]:
    def checked() -> bytes:
        if size > MAX_MEMBER_BYTES:
            raise StepError(f"member is {size} bytes, over {MAX_MEMBER_BYTES} (not read)")
        try:
            return read()
        except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
            raise StepError(f"cannot read member of {archive}: {e}") from e
    return checked


def collect(specs: list[str]) -> list[Item]:
    """Expand PATH arguments into images, in the order given (folders and globs sorted).

    A spec that names nothing (no such file or folder, no glob match) is an error naming it.
    """
    items: list[Item] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            items += [Item(str(p), _read_file(p)) for p in iter_images(path)]
        elif path.is_file():
            items += list(_archive_items(path)) if _is_archive(path) else [Item(str(path), _read_file(path))]
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise StepError(f"{spec}: the pattern matches no file")
            items += collect(matches)
        else:
            raise StepError(f"{spec}: no such file or folder")
    return items


@dataclass
class Timing:
    decode_s: float = 0.0  # summed decode wall time of the batches (overlaps the model)
    model_s: float = 0.0
    total_s: float = 0.0


def _decode_batch(items: list[Item], size: int, channels: int,
                  pool: ThreadPoolExecutor) -> tuple[np.ndarray, list[str | None], float]:
    start = time.perf_counter()
    data: list[bytes | StepError] = []
    for item in items:  # archive members are read here, in one thread (tarfile is not thread-safe)
        try:
            data.append(item.read())
        except StepError as e:
            data.append(e)

    def one(pair: tuple[Item, bytes | StepError]) -> tuple[np.ndarray | None, str | None]:
        item, raw = pair
        if isinstance(raw, StepError):
            return None, str(raw)
        try:
            return decode_resized(raw, size=size, channels=channels, name=item.name), None
        except StepError as e:
            return None, str(e)

    batch = np.zeros((len(items), size, size, channels), dtype=np.uint8)
    errors: list[str | None] = []
    for i, (img, err) in enumerate(pool.map(one, zip(items, data, strict=True))):
        if img is not None:
            batch[i] = img
        errors.append(err)
    return batch, errors, time.perf_counter() - start


def predict_items(trained: TrainedModel, items: list[Item], threshold: float, *, batch_size: int = 64,
                  workers: int = 0, progress: bool = True) -> tuple[list[dict[str, Any]], Timing]:
    """Score ``items``; one row per item (errors included), in input order."""
    names = trained.metadata.get("class_names", {})
    rows: list[dict[str, Any]] = []
    timing = Timing()
    start = time.perf_counter()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(n_workers(workers)) as pool, ThreadPoolExecutor(1) as ahead, \
            tqdm(total=len(items), unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
        pending: Future[Any] | None = ahead.submit(_decode_batch, batches[0], trained.size, trained.channels,
                                                    pool) if batches else None
        for k, batch_items in enumerate(batches):
            assert pending is not None
            batch, errors, decode_s = pending.result()
            timing.decode_s += decode_s
            pending = (ahead.submit(_decode_batch, batches[k + 1], trained.size, trained.channels, pool)
                       if k + 1 < len(batches) else None)
            ok = np.array([e is None for e in errors])
            probs = np.full(len(batch_items), np.nan)
            if ok.any():
                t0 = time.perf_counter()
                probs[ok] = np.asarray(trained.model.predict_on_batch(batch[ok].astype(np.float32))).reshape(-1)
                timing.model_s += time.perf_counter() - t0
            rows += [_row(item, float(p), err, threshold, names) for item, p, err in
                     zip(batch_items, probs, errors, strict=True)]
            bar.update(len(batch_items))
    timing.total_s = time.perf_counter() - start
    return rows, timing


def _row(item: Item, p: float, error: str | None, threshold: float, names: dict[str, str]) -> dict[str, Any]:
    if error is not None:
        return {"path": item.name, "probability": "", "predicted": "", "class_name": "", "threshold": threshold,
                "error": error}
    pred = int(p >= threshold)
    return {"path": item.name, "probability": round(p, 6), "predicted": pred,
            "class_name": names.get(str(pred), str(pred)), "threshold": threshold, "error": ""}


def _write(rows: list[dict[str, Any]], f: IO[str]) -> None:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def run(specs: list[str], *, model: Path, out: Path | None, threshold: float | None = None,
        batch_size: int = 64, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Score ``specs``; write the CSV to ``out`` (atomically) or to stdout. Returns counts and timings."""
    trained = load_trained(model)
    if threshold is not None and not 0 <= threshold <= 1:
        raise StepError(f"--threshold: must be in [0, 1], got {threshold}")
    t = float(threshold if threshold is not None else trained.threshold["threshold"])
    items = collect(specs)
    if not items:
        raise StepError(f"{' '.join(specs)}: no images found")
    rows, timing = predict_items(trained, items, t, batch_size=batch_size, workers=workers, progress=progress)
    if out is None:
        buf = io.StringIO()
        _write(rows, buf)
        sys.stdout.write(buf.getvalue())
    else:
        with atomic_open(out, newline="") as f:
            _write(rows, f)
    failed = [r for r in rows if r["error"]]
    for r in failed:
        log.warning("predict: %s: %s", r["path"], r["error"])
    summary = {"images": len(rows), "scored": len(rows) - len(failed), "errors": len(failed),
               "positive": sum(1 for r in rows if r["predicted"] == 1), "threshold": t,
               "seconds": round(timing.total_s, 3), "decode_seconds": round(timing.decode_s, 3),
               "model_seconds": round(timing.model_s, 3)}
    log.info("predict: %d images (%d errors), %d positive at threshold %.4f, %.1f images/s%s", summary["images"],
             summary["errors"], summary["positive"], t, len(rows) / max(timing.total_s, 1e-9),
             f" -> {out}" if out else "")
    return summary

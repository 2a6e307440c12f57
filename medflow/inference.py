"""Score new images with a trained model: ``medflow predict PATH... [--model DIR] [--out preds.csv]``.

Inputs may be files, folders (searched recursively for images), glob patterns and archives (.zip, .tar,
.tar.gz, .tgz; members are read in memory, nothing is extracted). Every image goes through the resize step's
own decoder (:func:`medflow.imaging.decode.decode_resized`) at the model's size and channels, exactly the training
preprocessing. Decoding runs in a thread pool one batch ahead of the model. A file that cannot be read or
decoded gets a row with its error and the rest are scored; the run never stops on one bad file.

Inputs are bounded as the pipeline bounds its own (:mod:`medflow.imaging.limits`): archives get the extract
step's checks (``extract.max_members``, ``max_total_bytes``, ``max_ratio``; a refused archive is one error
row), images the filter's pixel cap (``filter.max_pixels``, from the header, before decoding) and a byte
cap; only regular files are read, ``**`` does not follow symlinked folders, folder walks follow them with a
loop guard (:mod:`medflow.data.walk`), and the bytes and pixels held by the decoding threads at once are
capped. The limits are the config's where the command has
one (``--dataset``, ``--params``), else the params.yaml defaults.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from medflow.data.archives import _Tally, is_junk
from medflow.data.manifest import iter_images
from medflow.errors import StepError
from medflow.evaluation.assess import TrainedModel, load_trained
from medflow.imaging.limits import MAX_IMAGE_BYTES, Decoder, InputLimits, Item, file_item
from medflow.io import atomic_open, display_path, is_outside, n_workers
from medflow.schema import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

COLUMNS = ["path", "probability", "predicted", "class_name", "threshold", "error"]
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_MEMBER_BYTES = MAX_IMAGE_BYTES  # an image file or archive member larger than this is an error, not read


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _failed(name: str, error: StepError) -> Item:
    """An input that failed before any image was read (an archive refused whole): one error row."""
    def read() -> bytes:
        raise error
    return Item(name, read)


def _archive_items(path: Path, limits: InputLimits) -> list[Item]:
    """Image members of an archive, after the extract step's checks (members, declared bytes, ratio) over
    the whole archive; an archive that fails them, or cannot be read, is one error item naming the limit."""
    try:
        tally = _Tally(archive=path, limits=limits.extract, compressed=path.stat().st_size)
        return (_zip_items if path.name.lower().endswith(".zip") else _tar_items)(path, tally, limits.max_bytes)
    except StepError as e:
        return [_failed(str(path), e)]
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error) as e:
        return [_failed(str(path), StepError(f"{path}: not a readable archive ({e})"))]


def _zip_items(path: Path, tally: _Tally, max_bytes: int) -> list[Item]:
    zf = zipfile.ZipFile(path)  # noqa: SIM115 - kept open while its members are read (the process ends it)
    infos = zf.infolist()
    for info in infos:  # the whole central directory first, as extract does
        tally.count_member(info.filename)
    tally.declare(sum(i.file_size for i in infos), infos[-1].filename if infos else "")
    return [Item(f"{path}!{info.filename}", _member_reader(path, info.filename, info.file_size, max_bytes,
                                                         partial(zf.read, info.filename)), info.file_size)
            for info in sorted(infos, key=lambda i: i.filename)
            if not info.is_dir() and not is_junk(PurePosixPath(info.filename)) and _is_image_name(info.filename)]


def _tar_items(path: Path, tally: _Tally, max_bytes: int) -> list[Item]:
    """Listed in one forward pass (a compressed tar is read forwards only once); tarfile's own list of
    members is emptied as it goes, so a tar of many tiny members costs only the image members kept."""
    tf = tarfile.open(path)  # noqa: SIM115 - kept open while its members are read (the process ends it)
    items: list[Item] = []
    while (member := _next_member(tf, path, items)) is not None:
        tf.members.clear()  # type: ignore[attr-defined]  # tarfile's list of seen members
        tally.count_member(member.name)
        tally.declare(member.size, member.name)
        if not member.isfile() or is_junk(PurePosixPath(member.name)) or not _is_image_name(member.name):
            continue

        def read_member(m: tarfile.TarInfo = member) -> bytes:
            f = tf.extractfile(m)
            if f is None:
                raise StepError("not a regular file")
            return f.read()
        items.append(Item(f"{path}!{member.name}", _member_reader(path, member.name, member.size, max_bytes,
                                                                 read_member), member.size))
    return items


def _next_member(tf: tarfile.TarFile, path: Path, items: list[Item]) -> tarfile.TarInfo | None:
    """The next member of a tar; at a truncated or damaged end, None after appending an error item for the
    rest (the members listed before it are still scored)."""
    try:
        return tf.next()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        last = items[-1].name.partition("!")[2] if items else ""
        after = f"after member {last}" if last else "before its first image"
        items.append(_failed(f"{path}!", StepError(f"{path}: archive is cut short or damaged {after} ({e}); "
                                                   "the members after that point are not read")))
        return None


def _member_reader(archive: Path, name: str, size: int, max_bytes: int,
                   read: Callable[[], bytes]) -> Callable[[], bytes]:
    def checked() -> bytes:
        if size > max_bytes:
            raise StepError(f"{archive}!{name}: member is {size} bytes, over the {max_bytes}-byte cap per "
                            "image; not read")
        try:
            return read()
        except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
            raise StepError(f"cannot read member of {archive}: {e}") from e
    return checked


def _glob(spec: str) -> list[str]:
    """Matches of a glob pattern, sorted. ``**`` never descends into a symlinked folder (pathlib's rule), so
    a folder holding links to itself cannot make the expansion endless."""
    if "**" not in spec:
        return sorted(glob.glob(spec))
    parts = Path(spec).parts
    fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    pattern = str(Path(*parts[fixed:]))
    return sorted(str(p) for p in base.glob(pattern))


def collect(specs: list[str], limits: InputLimits | None = None) -> list[Item]:
    """Expand PATH arguments into images, in the order given (folders and globs sorted).

    A spec that names nothing (no such file or folder, no glob match) is an error row naming it, as is a
    corrupt archive, or the cut-short end of a truncated tar (its members before the cut are scored). Folders are
    walked as the manifest walks them (:func:`medflow.data.manifest.iter_images`: symlinked folders followed
    with a loop guard, hidden entries skipped).
    """
    limits = limits or InputLimits()
    items: list[Item] = []
    for spec in specs:
        path = Path(spec)
        found: list[Item] = []
        if path.is_dir():
            found = [file_item(p, limits.max_bytes) for p in iter_images(path)]
        elif path.is_file() and _is_archive(path):
            found = _archive_items(path, limits)
        elif path.exists() or path.is_symlink():  # a file, or something that is not one: its row says which
            found = [file_item(path, limits.max_bytes)]
        items += [replace(i, name=shown_name(i.name, path)) for i in found]
        if found or path.exists() or path.is_symlink():
            continue
        if glob.has_magic(spec):
            matches = _glob(spec)
            items += collect(matches, limits) if matches else [_failed(spec, StepError(
                f"{spec}: the pattern matches no file"))]
        else:
            items.append(_failed(spec, StepError(f"{spec}: no such file or folder")))
    return items


@dataclass
class Timing:
    decode_s: float = 0.0  # summed decode wall time of the batches (overlaps the model)
    model_s: float = 0.0
    total_s: float = 0.0


def _decode_batch(items: list[Item], decoder: Decoder) -> tuple[np.ndarray, list[str | None], float]:
    start = time.perf_counter()
    batch = np.zeros((len(items), decoder.size, decoder.size, decoder.channels), dtype=np.uint8)
    errors: list[str | None] = []
    for i, (img, err) in enumerate(decoder.decode(items)):
        if img is not None:
            batch[i] = img
        errors.append(err)
    return batch, errors, time.perf_counter() - start


def predict_items(trained: TrainedModel, items: list[Item], threshold: float, *, batch_size: int = 64,
                  workers: int = 0, progress: bool = True,
                  limits: InputLimits | None = None) -> tuple[list[dict[str, Any]], Timing]:
    """Score ``items``; one row per item (errors included), in input order. Decoding stays within
    ``limits`` (default: the params.yaml defaults), see :mod:`medflow.imaging.limits`."""
    names = trained.metadata.get("class_names", {})
    rows: list[dict[str, Any]] = []
    timing = Timing()
    start = time.perf_counter()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(n_workers(workers)) as pool, ThreadPoolExecutor(1) as ahead, \
            tqdm(total=len(items), unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
        decoder = Decoder(trained.size, trained.channels, limits or InputLimits(), pool)
        pending: Future[Any] | None = ahead.submit(_decode_batch, batches[0], decoder) if batches else None
        for k, batch_items in enumerate(batches):
            assert pending is not None
            batch, errors, decode_s = pending.result()
            timing.decode_s += decode_s
            pending = ahead.submit(_decode_batch, batches[k + 1], decoder) if k + 1 < len(batches) else None
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


def shown_name(name: str, spec: Path) -> str:
    """An input as the CSV shows it, never absolute: relative to the working directory when inside it (links
    kept), else to the folder holding the argument it came from (``scans/a.png`` for ``/data/scans``); an
    archive member stays ``<archive>!<member>``."""
    path, sep, member = name.partition("!")
    shown = display_path(path)
    if is_outside(shown):
        shown = display_path(path, Path(os.path.abspath(spec)).parent)
    return shown + sep + member


def _row(item: Item, p: float, error: str | None, threshold: float, names: dict[str, str]) -> dict[str, Any]:
    if error is not None:
        return {"path": item.name, "probability": "", "predicted": "", "class_name": "",
                "threshold": threshold, "error": error}
    pred = int(p >= threshold)
    return {"path": item.name, "probability": round(p, 6), "predicted": pred,
            "class_name": names.get(str(pred), str(pred)), "threshold": threshold, "error": ""}


def _write(rows: list[dict[str, Any]], f: IO[str]) -> None:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def run(specs: list[str], *, model: Path, out: Path | None, threshold: float | None = None,
        batch_size: int = 64, workers: int = 0, progress: bool = True,
        limits: InputLimits | None = None) -> dict[str, Any]:
    """Score ``specs``; write the CSV to ``out`` (atomically) or to stdout. Returns counts and timings.

    ``limits``: the caps on inputs (the config's extract and filter parameters; default: params.yaml's)."""
    trained = load_trained(model)
    if threshold is not None and not 0 <= threshold <= 1:
        raise StepError(f"--threshold: must be in [0, 1], got {threshold}")
    t = float(threshold if threshold is not None else trained.threshold["threshold"])
    items = collect(specs, limits)
    if not items:
        raise StepError(f"{' '.join(specs)}: no images found")
    rows, timing = predict_items(trained, items, t, batch_size=batch_size, workers=workers, progress=progress,
                                 limits=limits)
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
    if failed and len(failed) == len(rows):  # every row written, each with its error: the run still failed
        raise StepError(f"no image could be scored ({len(rows)} error row(s){f' in {out}' if out else ''}); "
                        f"first: {failed[0]['error']}")
    log.info("predict: %d images (%d errors), %d positive at threshold %.4f, %.1f images/s%s", summary["images"],
             summary["errors"], summary["positive"], t, len(rows) / max(timing.total_s, 1e-9),
             f" -> {out}" if out else "")
    return summary

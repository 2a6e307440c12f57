"""Corrupt-image filter: decide, per manifest row, whether the image is clean, a quarantined bad file or
an exact duplicate, and group near duplicates. The filter step (tasks/filter.py) reads and writes the files;
this module holds the decisions and the verdict cache.

Outputs built here (schemas in medflow.schema):

- the clean table (CLEAN_COLUMNS): manifest rows that decoded fine, one per distinct sha256, in manifest
  order, plus ``phash`` and ``dup_group``;
- the rejects table (REJECT_COLUMNS): every quarantined file with one reason. Nothing is ever deleted or
  moved: raw data stays as it is and the rejects list is the quarantine;
- the summary (counts by reason, decoded vs cached, near-duplicate groups).

Checks, per distinct file content, in this order (the first failing one is the reason):

1. ``zero_bytes``: an empty file.
2. ``not_an_image``: Pillow cannot identify the format (e.g. text behind a .jpeg name).
3. ``too_many_pixels``: width * height from the header exceeds ``filter.max_pixels``; checked before any
   decoding (decompression bombs), and Pillow's own DecompressionBombError/Warning count too.
4. ``unsupported_mode``: a Pillow mode outside :data:`medflow.imaging.verdict.SUPPORTED_MODES`.
5. ``too_small``: the shorter side is below ``filter.min_side``.
6. ``truncated``: Pillow's full decode (``load()`` with ``LOAD_TRUNCATED_IMAGES = False``) raises
   "image file is truncated", or a JPEG has no EOI marker (FFD9) after its last scan, or a PNG has no
   IEND chunk after its last IDAT. The marker checks matter: ``cv2.imread`` returns a full array for a
   truncated JPEG (it only warns), and a JPEG missing just its last bytes decodes without complaint.
7. ``decode_error``: any other decode failure.

Before any of them, ``unreadable``: a file that cannot be read at all (a broken symlink, a FIFO, device or
socket, no read permission, a name that is not valid UTF-8); the detail says which
(:func:`medflow.imaging.files.file_state`). Such rows have no sha256 and are never cached.

A DICOM file (the ``DICM`` marker at offset 128, :mod:`medflow.imaging.dicom`) is checked by pydicom instead
of Pillow: ``too_many_pixels`` from its header, then ``no_pixel_data`` (a report, a plan: not an image),
``multi_frame`` (more than one frame), ``unsupported_mode`` (a photometric interpretation medflow does not
convert, or float pixels), ``unsupported_syntax`` (no installed pixel-data plugin decodes its transfer
syntax; the detail names it), ``too_small``, then ``decode_error`` when the full decode with the LUTs fails.

Then ``duplicate``: files with the same sha256 as a good one; the first in manifest order is kept (sources
in their configured order, then the inbox: data already in the dataset wins over a copy that lands later), the
others are listed with detail "duplicate of <kept path>". Copies of a bad file get the bad file's reason.

Then ``label_conflict``: content that carries two labels is quarantined, every copy of it, since no file
order can say which label is right: a good content whose copies lie under two class folders (the detail
names the other copies, "same content as <path> labelled <cls>"), and every member (and copy) of a
near-duplicate group (below) whose members span two classes ("near duplicate of <path> labelled <cls>").
Label conflicts come first in the rejects table, then the rest in manifest order.

Other near duplicates are kept, not rejected: images whose pHashes (medflow.imaging.phash) differ in at most
``filter.near_duplicate_distance`` bits and whose 16x16 grey thumbnails (stored with the verdict) correlate at
least ``filter.near_duplicate_min_correlation`` are joined (transitively) into one ``dup_group``, named by the
sha256 of the group's first member in manifest order, so the split can keep them on one side. The pixel check
is what keeps distinct look-alikes (cells, CT slices) that collide in 64 bits out of one group. Each verdict
also holds crop frames (pHash and thumbnail of centred crops, ``phash.CROP_SCALES``); one image's crop frame
matching another's full frame under the same two tests links them too, so a slightly cropped copy joins its
original (:func:`medflow.imaging.phash.frame_pairs`).

Verdicts are cached in one packed index per cache key, ``<cache>/<key>.npz`` (:class:`VerdictIndex`),
where ``<key>`` digests :data:`FILTER_VERSION` and the parameters a verdict depends on (min_side,
max_pixels): when new data lands only new content is decoded. Cached files are not re-read: the
manifest's sha256 (checked against the bytes whenever a file is decoded) and a size check of every file
stand for them. The per-file JSON entries of earlier versions (``<key>/<sha[:2]>/<sha>.json``, one file per
image) are not read: the first save of an index removes their folders (:func:`drop_per_file_entries`). The
near-duplicate links found are kept beside the index (``<cache>/pairs-<key>.npz``, :func:`known_pairs`, keyed
by the verdict key, the two grouping params and the linking code): the next run confirms only the candidate
pairs with a new content at one end (:mod:`medflow.imaging.known_pairs`), and groups every image over all the
links.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from medflow.config import FilterConfig
from medflow.errors import StepError
from medflow.imaging import cluster, phash
from medflow.imaging.files import file_state
from medflow.imaging.known_pairs import KnownPairs, linked, rule_digest
from medflow.imaging.verdict import Limits, Verdict, inspect_file, inspect_files, worker_init
from medflow.imaging.verdict_store import VerdictStore, save_stores
from medflow.imaging.workers import main_hidden, mp_context
from medflow.io import n_workers, sha256_file
from medflow.schema import CLEAN_COLUMNS, MANIFEST_COLUMNS, REJECT_COLUMNS

log = logging.getLogger(__name__)

# Bump whenever a change to this module or to medflow.imaging.verdict could change a verdict or a pHash: it
# invalidates the cache.
FILTER_VERSION = "filter-5"  # 2: DICOM (a DICOM file under an image extension was not_an_image); 3: thumbnails;
# 4: the pylibjpeg plugins decode JPEG-LS, JPEG lossless and 12-bit JPEG extended DICOM (were unsupported_syntax);
# 5: crop frames (Verdict.crops), so slight crops join their original's near-duplicate group

REASONS = ("zero_bytes", "not_an_image", "truncated", "decode_error", "too_many_pixels", "too_small",
           "unsupported_mode", "no_pixel_data", "multi_frame", "unsupported_syntax", "unreadable", "duplicate",
           "label_conflict")
LABEL_CONFLICT = "label_conflict"
# Decided on the table (copies, labels), never one content's verdict: not valid in the verdict cache.
_TABLE_REASONS = frozenset({"duplicate", LABEL_CONFLICT})
_NAMED_MAX = 5  # other copies named in one label_conflict detail

# This many files or fewer are decoded in-process: the fork server takes about 0.4 s to start in a fresh
# process (then 5-15 ms per worker), what one of two cores saves on 100-200 typical X-rays (3-11 ms each).
_INLINE_MAX = 128
# While decoding, the index is also saved this often (seconds), so a killed run keeps most of its work.
_CHECKPOINT_S = 60.0
_INT_COLUMNS = ["label", "bytes", "width", "height"]
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------------
# Manifest checks


def check_manifest(df: pd.DataFrame, source: Path) -> pd.DataFrame:
    """The manifest's columns (schema.MANIFEST_COLUMNS) with numeric ``bytes``, after checking it.

    StepError naming ``source`` and the column or CSV line on a missing column, an empty or repeated path,
    or a size that is not a number.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise StepError(f"{source}: missing column(s) {', '.join(missing)}")
    df = df[MANIFEST_COLUMNS].reset_index(drop=True)
    if df["path"].isna().any():
        raise StepError(f"{source}: empty 'path' in line(s) {_rows(df['path'].isna())}")
    dupes = df["path"].duplicated()
    if dupes.any():
        raise StepError(f"{source}: path listed twice: {df.loc[dupes, 'path'].iloc[0]}")
    size = pd.to_numeric(df["bytes"], errors="coerce")
    not_number = size.isna() & df["bytes"].notna()
    if not_number.any():
        raise StepError(f"{source}: 'bytes' is not a number in line(s) {_rows(not_number)}")
    return df.assign(bytes=size)


def _rows(mask: pd.Series) -> str:
    """CSV line numbers (the header is line 1) of the rows in ``mask``, first five."""
    rows = [str(i + 2) for i in np.flatnonzero(mask.to_numpy())[:5]]
    return ", ".join(rows) + (", ..." if int(mask.sum()) > 5 else "")


def file_states(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per row, one ``stat`` (:func:`medflow.imaging.files.file_state`): why each row whose file cannot be read
    cannot be (a broken symlink, a FIFO or device, no read permission, a name that is not valid UTF-8), and the
    size of every row's file (-1 where it has none); both indexed like ``df``.

    A row the manifest could read (it has a sha256) and whose file is now simply gone is not unreadable: that
    is a stale manifest (:func:`checked_shas`)."""
    sizes = np.empty(len(df), dtype=np.int64)
    problems: dict[int, str] = {}  # position -> why: no tuple kept per row
    for k, path in enumerate(df["path"]):
        problem, sizes[k] = file_state(str(path))
        if problem:
            problems[k] = problem
    problem = pd.Series("", index=df.index, dtype=object)
    if problems:
        problem.iloc[list(problems)] = list(problems.values())
    size = pd.Series(sizes, index=df.index)
    listed = df["sha256"].fillna("").astype(str) != ""
    unreadable = (problem != "") & ~(listed & (problem == "no such file"))
    return problem[unreadable].astype(str), size


def checked_shas(df: pd.DataFrame, sizes: pd.Series, source: Path) -> pd.Series:
    """sha256 per row: the manifest's, after checking each file still exists with the size it lists (``sizes``,
    from :func:`file_states`).

    Rows with a blank sha256 are hashed here. A missing file or a size change means the manifest is
    stale (the raw data changed after it was written): StepError, because the clean table would be wrong.
    ``df`` holds none of the unreadable rows.
    """
    sizes = sizes.reindex(df.index)
    gone = sizes < 0
    if gone.any():
        path = df.loc[gone, "path"].iloc[0]
        raise StepError(f"{source}: {path}: cannot read (No such file or directory); re-run the manifest step")
    listed = pd.to_numeric(df["bytes"])
    changed = listed.notna() & (listed != sizes)
    if changed.any():
        i = changed.idxmax()
        raise StepError(f"{source}: {df.at[i, 'path']}: size changed since the manifest was written "
                        f"({int(listed[i])} -> {int(sizes[i])} bytes); re-run the manifest step")
    shas = df["sha256"].fillna("").astype(str)
    odd = ~shas.str.fullmatch(_SHA_RE.pattern)  # lowercased or hashed here: the rest keep the manifest's strings
    for label in shas.index[odd]:
        lowered = shas[label].lower()
        shas[label] = lowered if _SHA_RE.fullmatch(lowered) else sha256_file(df.at[label, "path"])
    return shas


# --------------------------------------------------------------------------------------------------
# The verdict index: one packed file per cache key

_INDEX_FORMAT = "medflow-filter-index-2"  # 2: columnar .npz (medflow.imaging.verdict_store); 1: one JSON document
_FIELDS = [f.name for f in fields(Verdict)]  # what the index holds (a changed Verdict: another file)
_ADD_CHUNK = 2048  # decoded verdicts held as objects before they join the index's arrays
_SPILL_MIN = 4096  # new verdicts held in memory before they are written into the index file, at least


def cache_key(cfg: FilterConfig) -> dict[str, Any]:
    """What a verdict depends on besides the file's bytes: the filter version and the verdict limits."""
    return {"version": FILTER_VERSION, "min_side": cfg.min_side, "max_pixels": cfg.max_pixels}


def known_pairs(cache: Path, cfg: FilterConfig) -> KnownPairs:
    """The near-duplicate links kept under ``cache`` (:mod:`medflow.imaging.known_pairs`) for the verdicts'
    cache key, the grouping params and the linking code (:mod:`medflow.imaging.phash` and that module: a changed
    rule searches every pair again)."""
    return KnownPairs.load(Path(cache), {**cache_key(cfg), "near_duplicate_distance": cfg.near_duplicate_distance,
                                         "near_duplicate_min_correlation": cfg.near_duplicate_min_correlation,
                                         "code": rule_digest()})


def index_path(cache: Path, cfg: FilterConfig) -> Path:
    """``<cache>/<FILTER_VERSION>-<digest of the cache key>.npz``: one index per parameter set."""
    digest = hashlib.sha256(json.dumps(cache_key(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache) / f"{FILTER_VERSION}-{digest}.npz"


@dataclass
class VerdictIndex:
    """The filter's verdict cache for one cache key: sha256 -> Verdict, kept in one ``.npz`` file, column by
    column (:class:`medflow.imaging.verdict_store.VerdictStore`: about 900 bytes a verdict on disk, about 120 of
    them in memory once loaded, the thumbnails and crop frames read from the file as the rows are asked for).

    Why one file rewritten whole (temp file + rename) rather than an append-only log or SQLite: a reader sees
    the old index or the new one, never half of either, a crash leaves the previous index in place, and there
    is no partial-record or lock handling to get right. It is loaded once per run and written when decoding
    ends (plus every :data:`_CHECKPOINT_S` seconds while decoding, and whenever the verdicts decoded since the
    last write reach :func:`_spill_rows`: what is held in memory stays a quarter of the index, and the rewrites
    together cost a few times the index's bytes), each write streaming the index's rows from the file it
    replaces: about 900 bytes per verdict, 90 MB for 100k images. Two runs saving at once are safe too: the
    last rename wins and the other run's new verdicts are decoded again next time, never wrong. Rows are sorted
    by sha256 and the file carries no time stamp, so that equal caches are equal files. The JSON index of
    earlier versions (``<key>.json``, format 1) is not read, and removed by the first save.
    """

    path: Path
    key: dict[str, Any]
    store: VerdictStore = field(default_factory=VerdictStore.empty)
    _new: dict[str, Verdict] = field(default_factory=dict)  # added since the last pack into ``_packed``
    _packed: list[VerdictStore] = field(default_factory=list)  # packed chunks not yet written into the file

    @property
    def verdicts(self) -> VerdictStore:
        """Every verdict of the index (a read-only mapping sha256 -> Verdict); what was added is written into
        the index file first (not fsynced)."""
        if self._new or self._packed:
            self._write(fsync=False)
        return self.store

    def add(self, sha: str, verdict: Verdict) -> None:
        """Add one checked verdict (packed into column arrays every :data:`_ADD_CHUNK`; written into the index
        file when they reach :func:`_spill_rows`, or when the verdicts are read or saved)."""
        self._new[sha] = verdict
        if len(self._new) >= _ADD_CHUNK:
            self._pack()
            if sum(len(p) for p in self._packed) >= _spill_rows(len(self.store)):
                self._write(fsync=False)

    def _pack(self) -> None:
        if self._new:
            self._packed.append(VerdictStore.build(self._new.items()))
            self._new = {}

    def _write(self, fsync: bool) -> None:
        """Write the index with what was added (the store's rows streamed from its file, the new ones packed),
        and hold the file written as the store: once per read, save or spill, never a merged copy in memory
        (merging every 2,048 verdicts copied the growing store 13 times at 27,558 images and fragmented the heap;
        merging in memory at the end held the index twice)."""
        self._pack()
        header = {"format": _INDEX_FORMAT, "key": self.key, "fields": _FIELDS}
        store = save_stores(self.path, header, [self.store, *self._packed], fsync=fsync, reopen=True)
        assert store is not None
        self.store, self._packed = store, []

    @classmethod
    def load(cls, cache: Path, cfg: FilterConfig) -> VerdictIndex:
        """The index for ``cfg``'s cache key under ``cache``; empty when absent.

        An unreadable or malformed index (or one written for another key) is logged as a warning and
        replaced on the next save: every image is then decoded again, never given a doubtful verdict.
        """
        path, key = index_path(cache, cfg), cache_key(cfg)
        try:
            store, header = VerdictStore.load(path)
        except FileNotFoundError:
            return cls(path, key)
        except OSError as e:
            log.warning("%s: cannot read the filter cache index (%s); rebuilding it", path, e.strerror)
            return cls(path, key)
        except ValueError as e:
            log.warning("%s: corrupt filter cache index (%s); rebuilding it: every image is decoded again",
                        path, e)
            return cls(path, key)
        try:
            _check_index(store, header, key)
        except ValueError as e:
            log.warning("%s: corrupt filter cache index (%s); rebuilding it: every image is decoded again",
                        path, e)
            return cls(path, key)
        return cls(path, key, store)

    def save(self) -> None:
        """Write the whole index atomically (temp file, fsync, rename onto the final name)."""
        self._write(fsync=True)
        self.path.with_suffix(".json").unlink(missing_ok=True)  # format 1, never read now
        drop_per_file_entries(self.path.parent)


def _spill_rows(indexed: int) -> int:
    """New verdicts held before they are written into an index of ``indexed`` rows: a quarter of it, at least
    :data:`_SPILL_MIN` (rewriting the index for every few thousand would cost its size each time)."""
    return max(_SPILL_MIN, indexed // 4)


def _check_index(store: VerdictStore, header: dict[str, Any], key: dict[str, Any]) -> None:
    """ValueError saying what is wrong with a loaded index (any doubt rejects the whole file)."""
    if header.get("format") != _INDEX_FORMAT:
        raise ValueError(f"not a {_INDEX_FORMAT} file")
    if header.get("key") != key or header.get("fields") != _FIELDS:
        raise ValueError(f"written for key {header.get('key')} and fields {header.get('fields')}")
    reasons = set(store.columns["reason"])
    if not reasons <= {"", *REASONS} - _TABLE_REASONS:
        raise ValueError(f"unknown reason(s) {sorted(reasons - {'', *REASONS} - _TABLE_REASONS)}")


_PER_FILE_FOLDER = re.compile(r"^filter-\d+-[0-9a-f]{16}$")  # <FILTER_VERSION>-<key digest> of the old layout


def drop_per_file_entries(cache: Path) -> list[Path]:
    """Remove the folders of per-file verdicts that earlier versions kept under ``cache`` (never read now: the
    packed index replaced them); returns what was removed. A cache may always be dropped."""
    removed = []
    for child in cache.iterdir():
        if _PER_FILE_FOLDER.match(child.name) and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if removed:
        log.info("%s: removed %d folder(s) of per-file verdicts of an earlier version: %s", cache, len(removed),
                 ", ".join(p.name for p in removed))
    return removed


# --------------------------------------------------------------------------------------------------
# Verdicts: the index first, then decoding what is new


def content_verdicts(shas: pd.Series, paths: pd.Series, cfg: FilterConfig, index: VerdictIndex,
                     source: Path, dask_address: str | None = None) -> tuple[VerdictStore, int, int]:
    """The verdicts (``index``'s whole store, which then holds one for every sha256 of ``shas``), how many
    distinct contents ``shas`` has, and how many of them were decoded (the rest came from ``index``). The
    store is not copied down to ``shas``: at 27,558 images that copy was 25 MB of the step's peak.

    Each new content is decoded once, from its first path in manifest order; its verdict joins ``index``,
    which is saved when decoding ends, also when it ends in an error (the verdicts so far are sound).
    ``dask_address`` (else ``$DASK_SCHEDULER_ADDRESS``): decode on that Dask cluster (:mod:`medflow.imaging.cluster`).
    """
    first = pd.DataFrame({"sha": shas, "path": paths}).drop_duplicates("sha")
    known = index.verdicts.rows(first["sha"].to_numpy()) >= 0
    todo = {sha: path for sha, path, hit in zip(first["sha"], first["path"], known, strict=True) if not hit}
    if todo:
        try:
            _decode_into(index, todo, cfg, source, dask_address)
        finally:
            index.save()
    return index.verdicts, len(first), len(todo)


def _decode_into(index: VerdictIndex, todo: dict[str, str], cfg: FilterConfig, source: Path,
                 dask_address: str | None = None) -> None:
    """Decode ``todo`` (sha256 -> path), adding each checked verdict to ``index`` as it arrives."""
    last_save = time.monotonic()
    for n, (sha, verdict) in enumerate(_decode_all(todo, cfg, source, dask_address), start=1):
        index.add(sha, verdict)
        if n % 5000 == 0:
            log.info("filter: decoded %d / %d", n, len(todo))
        if time.monotonic() - last_save > _CHECKPOINT_S:
            index.save()
            last_save = time.monotonic()


def _decode_all(todo: dict[str, str], cfg: FilterConfig, source: Path,
                dask_address: str | None = None) -> Iterator[tuple[str, Verdict]]:
    """Decode one representative path per sha256 (in parallel); yield (sha256, Verdict) in ``todo`` order.

    Workers get a path and send back (sha256, Verdict): no pixel arrays cross process boundaries. They
    come from the fork server of :mod:`medflow.imaging.workers` (never forked from the caller, which may be a
    threaded Prefect worker) and run :mod:`medflow.imaging.verdict`, which it has preloaded. With a Dask
    scheduler set, the workers of that cluster decode every file instead (:func:`_on_cluster`).
    """
    limits = Limits(cfg.max_pixels, cfg.min_side)
    inspect = functools.partial(inspect_file, limits=limits)
    paths = list(todo.values())
    address = cluster.scheduler_address(dask_address)
    if address is not None:
        yield from _checked(todo, _on_cluster(address, paths, limits), source)
        return
    workers = min(n_workers(cfg.workers), len(paths))
    if workers <= 1 or len(paths) <= _INLINE_MAX:
        yield from _checked(todo, map(inspect, paths), source)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp_context(), initializer=worker_init)
    try:
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        with main_hidden():  # map() submits every chunk at once, which starts the worker processes
            results = pool.map(inspect, paths, chunksize=chunk)
        yield from _checked(todo, results, source)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _on_cluster(address: str, paths: list[str], limits: Limits) -> Iterator[tuple[str, Verdict]]:
    """(sha256, Verdict) of each path, in order, decoded on the Dask cluster at ``address``, in chunks sized
    as the local pool's (paths sent absolute: the workers' working directory is not this step's)."""
    with cluster.connected(address) as client:
        chunk = max(1, min(64, len(paths) // (cluster.slots(client) * 8)))
        chunks = [[cluster.absolute(p) for p in paths[i:i + chunk]] for i in range(0, len(paths), chunk)]
        for results in cluster.results(client, functools.partial(inspect_files, limits=limits), chunks):
            yield from results


def _checked(todo: dict[str, str], results: Iterator[tuple[str, Verdict]],
             source: Path) -> Iterator[tuple[str, Verdict]]:
    """Pass on each result after checking its sha256 against the manifest's; StepError naming the file."""
    try:
        for (expected, path), (sha, verdict) in zip(todo.items(), results, strict=True):
            if sha != expected:
                raise StepError(f"{source}: {path}: content changed since the manifest was written "
                                "(sha256 differs); re-run the manifest step")
            yield sha, verdict
    except BrokenProcessPool:
        raise StepError(f"{source}: a decode worker died (out of memory, or a decoder crashed on a "
                        "file); verdicts so far are cached: re-run with filter.workers: 1 to find the file"
                        ) from None
    except OSError as e:
        raise StepError(f"{source}: {e.filename or 'a listed file'}: cannot read ({e.strerror}); "
                        "re-run the manifest step") from None


# --------------------------------------------------------------------------------------------------
# Pure table logic


def classify(paths: pd.Series, shas: pd.Series, verdicts: VerdictStore) -> pd.DataFrame:
    """Per row: reason ("" = clean) and detail, from the content verdicts and exact duplicates.

    A bad content's reason applies to every copy; of a good content's copies the first in manifest
    order is kept and the others are ``duplicate``. Read from the store's columns (no Verdict made per row).
    """
    reason = pd.Series(verdicts.field_values("reason", shas.to_numpy()), index=paths.index, dtype=object)
    detail = pd.Series(verdicts.field_values("detail", shas.to_numpy()), index=paths.index, dtype=object)
    keeper = paths.groupby(shas, sort=False).transform("first")  # each content's first path in manifest order
    copy = (reason == "") & (keeper != paths)
    reason[copy] = "duplicate"
    detail[copy] = "duplicate of " + keeper[copy]
    return pd.DataFrame({"reason": reason, "detail": detail}, index=paths.index)


def label_conflicts(df: pd.DataFrame, shas: pd.Series, status: pd.DataFrame, verdicts: VerdictStore,
                    max_distance: int, min_correlation: float = -1.0,
                    known: KnownPairs | None = None) -> tuple[pd.DataFrame, pd.Series]:
    """``status`` (from :func:`classify`) with every copy of a good content that carries two labels made
    ``label_conflict``: exact copies (one sha256 under two classes), then near-duplicate groups (pHash and
    thumbnails, as :func:`near_duplicate_groups`) whose members span two classes. The detail names the other
    paths. Also returns the ``dup_group`` of every row still clean, for :func:`clean_table`: a mixed group
    leaves whole, so the groups of the rows left are the same, and are computed once. ``known``: the links kept
    from the last run (:class:`~medflow.imaging.known_pairs.KnownPairs`, updated here; the caller saves it)."""
    out = status.copy()
    paths, classes = df["path"].astype(str), df["class_name"].astype(str)
    good = pd.Series(verdicts.ok(shas.to_numpy()), index=df.index)  # '' (unreadable): not in the store
    n_classes = classes[good].groupby(shas[good]).nunique()
    copies_of = _copies(shas, out["reason"], n_classes.index[n_classes > 1])
    for sha in n_classes.index[n_classes > 1]:
        rows = copies_of[sha]
        for i in rows:
            named = [f"{paths[j]} labelled {classes[j]}" for j in rows if j != i][:_NAMED_MAX]
            out.loc[i, ["reason", "detail"]] = [LABEL_CONFLICT, "same content as " + "; ".join(named)]
    kept = out["reason"] == ""
    groups = _groups_of(verdicts, shas[kept], max_distance, min_correlation, known)
    n_group_classes = classes[groups.index].groupby(groups).nunique()  # one pass, not one per group
    mixed = groups.isin(n_group_classes.index[n_group_classes > 1])
    copies_of = _copies(shas, out["reason"], shas[groups.index[mixed]])
    for _, members in groups[mixed].groupby(groups[mixed]):
        for i in members.index:
            named = [f"near duplicate of {paths[j]} labelled {classes[j]}" for j in members.index
                     if classes[j] != classes[i]][:_NAMED_MAX]
            rows = copies_of[shas[i]]
            out.loc[rows, "reason"] = LABEL_CONFLICT
            out.loc[rows, "detail"] = "; ".join(named)
    return out, groups[~mixed]


def _copies(shas: pd.Series, reason: pd.Series, wanted: Any) -> dict[str, pd.Index]:
    """The rows of each ``wanted`` sha256 whose reason is "" or ``duplicate`` (the copies a label conflict
    takes): one grouping of those rows, not one scan of the table per conflicting row."""
    takeable = reason.isin(["", "duplicate"]) & shas.isin(wanted)
    return {sha: rows for sha, rows in shas[takeable].groupby(shas[takeable]).groups.items()}


def near_duplicate_groups(shas: pd.Series, hashes: pd.Series, max_distance: int,
                          thumbs: pd.Series | None = None, min_correlation: float = -1.0,
                          crops: pd.Series | None = None) -> pd.Series:
    """``dup_group`` per row: the sha256 of the first row (in the given order) of its near-duplicate group.

    Groups are the connected components (transitive closure) of the links "pHash distance <= max_distance
    and, where ``thumbs`` are given, thumbnail correlation >= min_correlation" (medflow.imaging.phash). With
    ``crops`` (Verdict.crops) and ``thumbs`` the links also run from a row's crop frames to another's full frame
    (:func:`medflow.imaging.phash.frame_pairs`), so a slight crop joins its original.
    """
    if thumbs is not None and crops is not None:
        frame_hashes, frame_thumbs = phash.frames(list(hashes), list(thumbs), list(crops))
        pairs = phash.frame_pairs(frame_hashes, max_distance, frame_thumbs, min_correlation)
    else:
        pairs = phash.near_pairs(phash.pack(hashes), max_distance)
        if thumbs is not None:
            pairs = phash.confirmed(pairs, phash.thumbnails(list(thumbs)), min_correlation)
    return _dup_groups(shas, pairs)


def _groups_of(verdicts: VerdictStore, shas: pd.Series, max_distance: int, min_correlation: float,
               known: KnownPairs | None = None) -> pd.Series:
    """:func:`near_duplicate_groups` of the good verdicts of ``shas`` (distinct contents) with their thumbnails
    and crop frames, from the store's columns directly (no pHash, thumbnail or crop text made: 27,558 of them
    were most of the step's peak memory). With ``known``, only the candidate pairs with a content new to it
    are confirmed; the links among the others are its own, and it then holds those of ``shas``."""
    if shas.empty:
        if known is not None:
            known.keep(shas.to_numpy(), np.empty((0, 2), dtype=np.int64))
        return pd.Series([], index=shas.index, name="dup_group", dtype=str)
    frame_hashes, frame_thumbs = verdicts.frames(shas.to_numpy())
    return _dup_groups(shas, linked(shas.to_numpy(), frame_hashes, frame_thumbs, max_distance, min_correlation,
                                    known))


def _dup_groups(shas: pd.Series, pairs: npt.NDArray[np.int64]) -> pd.Series:
    roots = phash.components(len(shas), pairs)
    return pd.Series(shas.to_numpy()[roots], index=shas.index, name="dup_group", dtype=str)


def _as_ints(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Integer columns as nullable Int64, so a blank elsewhere never turns 512 into "512.0" in the CSV."""
    out = df.copy(deep=False)  # the columns converted are replaced, not written into
    for col in columns:
        out[col] = pd.to_numeric(out[col]).astype("Int64")
    return out


def _field(verdicts: VerdictStore, shas: pd.Series, name: str) -> list[Any]:
    """Field ``name`` of each sha256's verdict (from the store's columns, without making the Verdicts)."""
    return verdicts.field_values(name, shas.to_numpy())


def _fill_header(df: pd.DataFrame, verdicts: VerdictStore, shas: pd.Series) -> pd.DataFrame:
    """Fill width/height/mode/format left blank by the manifest (header unread) from the decode."""
    out = df.copy(deep=False)  # the columns filled are replaced, not written into
    for col in ("width", "height", "mode", "format"):
        blank = out[col].isna()
        if blank.any():  # looked up for the blank rows alone (the manifest reads most headers)
            decoded = pd.Series(_field(verdicts, shas[blank], col), index=out.index[blank])
            out[col] = out[col].astype(object).where(~blank, decoded.reindex(out.index))
    return out


def clean_table(df: pd.DataFrame, shas: pd.Series, status: pd.DataFrame, verdicts: VerdictStore,
                groups: pd.Series) -> pd.DataFrame:
    """The clean rows (schema.CLEAN_COLUMNS) in manifest order, with pHash and the near-duplicate group
    ``groups`` (from :func:`label_conflicts`) gives each."""
    good = status["reason"] == ""
    clean = df.copy(deep=False) if good.all() else df.loc[good]  # new columns only below: no copy to write into
    clean["sha256"] = shas[good]
    clean = _fill_header(clean, verdicts, clean["sha256"])
    clean["phash"] = _field(verdicts, clean["sha256"], "phash")
    clean["dup_group"] = groups.reindex(clean.index)
    if clean["dup_group"].isna().any():
        raise ValueError("clean_table: a clean row has no near-duplicate group (groups from another status?)")
    return _as_ints(clean[CLEAN_COLUMNS].reset_index(drop=True), _INT_COLUMNS)


def with_unreadable(status: pd.DataFrame, unreadable: pd.Series, index: pd.Index) -> pd.DataFrame:
    """``status`` (the readable rows') with the ``unreadable`` rows added, in manifest order (``index``)."""
    odd = pd.DataFrame({"reason": "unreadable", "detail": unreadable}, index=unreadable.index)
    return pd.concat([status, odd]).reindex(index)


def everything_rejected(n_in: int, rejects: pd.DataFrame, where: Path) -> str:
    """The StepError text when no image is clean: how many, the reasons, and where the list is."""
    counts = rejects["reason"].value_counts()
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts.items())
    first = rejects.iloc[0] if len(rejects) else None
    example = f"; e.g. {first['path']}: {first['reason']}: {first['detail']}" if first is not None else ""
    return (f"every one of the {n_in} image(s) was rejected ({reasons}){example}; nothing is left to train "
            f"on: see {where} for each file and why")


def rejects_table(df: pd.DataFrame, shas: pd.Series, status: pd.DataFrame) -> pd.DataFrame:
    """The quarantined rows (schema.REJECT_COLUMNS), each with its reason and detail: label conflicts first (so
    the quarantine artifact and the report, which show the first rows, always show them), then manifest order."""
    bad = status["reason"] != ""
    rejects = pd.DataFrame({"path": df.loc[bad, "path"], "reason": status.loc[bad, "reason"],
                            "detail": status.loc[bad, "detail"], "sha256": shas[bad],
                            "bytes": df.loc[bad, "bytes"]})
    rejects = rejects.sort_values("reason", key=lambda r: r != LABEL_CONFLICT, kind="stable")
    return _as_ints(rejects[REJECT_COLUMNS].reset_index(drop=True), ["bytes"])


def summarize(n_in: int, clean: pd.DataFrame, rejects: pd.DataFrame, decoded: int, cached: int,
              cfg: FilterConfig) -> dict[str, Any]:
    """The filter summary (the stage's metrics file): counts in, clean, by reason, cache use, groups."""
    sizes = clean["dup_group"].value_counts()
    multi = sizes[sizes > 1]
    by_reason = {r: int((rejects["reason"] == r).sum()) for r in REASONS}
    return {
        "in": n_in, "clean": len(clean), "rejected": len(rejects), "by_reason": by_reason,
        "decoded": decoded, "cached": cached,
        "near_duplicate_groups": len(multi), "images_in_near_dup_groups": int(multi.sum()),
        "largest_near_dup_group": int(multi.max()) if len(multi) else 1,
        "filter_version": FILTER_VERSION,
        "params": {"min_side": cfg.min_side, "max_pixels": cfg.max_pixels,
                   "near_duplicate_distance": cfg.near_duplicate_distance,
                   "near_duplicate_min_correlation": cfg.near_duplicate_min_correlation},
    }

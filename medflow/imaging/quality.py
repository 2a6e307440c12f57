"""Corrupt-image filter: decode every image once, quarantine the bad ones, drop exact duplicates,
group near duplicates.

Input: manifest.csv (schema.MANIFEST_COLUMNS). Outputs, all written atomically:

- clean.csv (schema.CLEAN_COLUMNS): manifest rows that decoded fine, one per distinct sha256, in
  manifest order, plus ``phash`` and ``dup_group``;
- rejects.csv (schema.REJECT_COLUMNS): every quarantined file with one reason. Nothing is ever deleted
  or moved: raw data stays as it is and the rejects list is the quarantine;
- a summary JSON (counts by reason, decoded vs cached, near-duplicate groups).

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

Then ``duplicate``: files with the same sha256 as a good one; the first in manifest order is kept (sources
in their configured order, then the inbox: data already in the dataset wins over a copy that lands later), the
others are listed with detail "duplicate of <kept path>". Copies of a bad file get the bad file's reason.

Near duplicates are kept, not rejected: images whose pHashes (medflow.imaging.phash) differ in at most
``filter.near_duplicate_distance`` bits are joined (transitively) into one ``dup_group``, named by the
sha256 of the group's first member in manifest order, so the split can keep them on one side.

Verdicts are cached per sha256 under ``cache/<key>/<sha[:2]>/<sha>.json``, where ``<key>`` digests
:data:`FILTER_VERSION` and the parameters a verdict depends on (min_side, max_pixels): when new data
lands only new content is decoded. Cached files are not re-read: the manifest's sha256 (checked against
the bytes whenever a file is decoded) and a size check of every file stand for them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medflow.config import Config, FilterConfig
from medflow.errors import StepError
from medflow.imaging import phash
from medflow.imaging.verdict import Limits, Verdict, inspect_file, worker_init
from medflow.imaging.workers import main_hidden, mp_context
from medflow.io import atomic_path, n_workers, read_csv, sha256_file, write_csv, write_json
from medflow.schema import CLEAN_COLUMNS, MANIFEST_COLUMNS, REJECT_COLUMNS

log = logging.getLogger(__name__)

# Bump whenever a change to this module or to medflow.imaging.verdict could change a verdict or a pHash: it
# invalidates the cache.
FILTER_VERSION = "filter-1"

REASONS = ("zero_bytes", "not_an_image", "truncated", "decode_error", "too_many_pixels", "too_small",
           "unsupported_mode", "duplicate")

# This many files or fewer are decoded in-process: the fork server takes about 0.4 s to start in a fresh
# process (then 5-15 ms per worker), what one of two cores saves on 100-200 typical X-rays (3-11 ms each).
_INLINE_MAX = 128
_INT_COLUMNS = ["label", "bytes", "width", "height"]
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------------
# Cache


def _cache_key(cfg: FilterConfig) -> dict[str, Any]:
    return {"version": FILTER_VERSION, "min_side": cfg.min_side, "max_pixels": cfg.max_pixels}


def _cache_dir(cache: Path, cfg: FilterConfig) -> Path:
    digest = hashlib.sha256(json.dumps(_cache_key(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"{FILTER_VERSION}-{digest}"


def _entry_path(folder: Path, sha: str) -> Path:
    return folder / sha[:2] / f"{sha}.json"


def _cache_get(folder: Path, sha: str, key: dict[str, Any]) -> Verdict | None:
    """A cached verdict, or None when absent or unreadable (a damaged entry is just a miss)."""
    try:
        entry = json.loads(_entry_path(folder, sha).read_text())
        if entry.get("key") != key or entry.get("sha256") != sha:
            return None
        return Verdict(**entry["verdict"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _cache_put(folder: Path, sha: str, key: dict[str, Any], verdict: Verdict) -> None:
    """Write one entry atomically (temp file + rename; no fsync: a lost entry only costs a re-decode)."""
    with atomic_path(_entry_path(folder, sha)) as tmp:
        tmp.write_text(json.dumps({"key": key, "sha256": sha, "verdict": asdict(verdict)}))


# --------------------------------------------------------------------------------------------------
# Manifest in


def _read_manifest(manifest: Path) -> pd.DataFrame:
    """Read and check manifest.csv; StepError naming the file, column or row on any problem."""
    try:
        df = read_csv(manifest)
    except FileNotFoundError:
        raise StepError(f"{manifest}: manifest not found (run the manifest step first)") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise StepError(f"{manifest}: cannot read manifest: {e}") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise StepError(f"{manifest}: missing column(s) {', '.join(missing)}")
    df = df[MANIFEST_COLUMNS].reset_index(drop=True)
    if df["path"].isna().any():
        raise StepError(f"{manifest}: empty 'path' in line(s) {_rows(df['path'].isna())}")
    dupes = df["path"].duplicated()
    if dupes.any():
        raise StepError(f"{manifest}: path listed twice: {df.loc[dupes, 'path'].iloc[0]}")
    size = pd.to_numeric(df["bytes"], errors="coerce")
    not_number = size.isna() & df["bytes"].notna()
    if not_number.any():
        raise StepError(f"{manifest}: 'bytes' is not a number in line(s) {_rows(not_number)}")
    return df.assign(bytes=size)


def _rows(mask: pd.Series) -> str:
    """CSV line numbers (the header is line 1) of the rows in ``mask``, first five."""
    rows = [str(i + 2) for i in np.flatnonzero(mask.to_numpy())[:5]]
    return ", ".join(rows) + (", ..." if int(mask.sum()) > 5 else "")


def _checked_shas(df: pd.DataFrame, manifest: Path) -> pd.Series:
    """sha256 per row: the manifest's, after checking each file still exists with the size it lists.

    Rows with a blank sha256 are hashed here. A missing file or a size change means the manifest is
    stale (the raw data changed after it was written): StepError, because clean.csv would be wrong.
    """
    shas = df["sha256"].fillna("").astype(str).str.lower()
    for i, path in enumerate(df["path"]):
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise StepError(f"{manifest}: {path}: cannot read ({e.strerror}); "
                            "re-run the manifest step") from None
        listed = df.at[i, "bytes"]
        if pd.notna(listed) and int(listed) != size:
            raise StepError(f"{manifest}: {path}: size changed since the manifest was written "
                            f"({int(listed)} -> {size} bytes); re-run the manifest step")
        if not _SHA_RE.match(shas.iat[i]):
            shas.iat[i] = sha256_file(path)
    return shas


# --------------------------------------------------------------------------------------------------
# Decoding all distinct contents


def _decode_all(todo: dict[str, str], cfg: FilterConfig, folder: Path, manifest: Path) -> dict[str, Verdict]:
    """Decode one representative path per sha256 (in parallel), cache and return the verdicts.

    Workers get a path and send back (sha256, Verdict): no pixel arrays cross process boundaries. They
    come from the fork server of :mod:`medflow.imaging.workers` (never forked from the caller, which may be a
    threaded Prefect worker) and run :mod:`medflow.imaging.verdict`, which it has preloaded.
    """
    inspect = functools.partial(inspect_file, limits=Limits(cfg.max_pixels, cfg.min_side))
    paths = list(todo.values())
    workers = min(n_workers(cfg.workers), len(paths))
    if workers <= 1 or len(paths) <= _INLINE_MAX:
        return _collect(todo, map(inspect, paths), cfg, folder, manifest)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp_context(), initializer=worker_init)
    try:
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        with main_hidden():  # map() submits every chunk at once, which starts the worker processes
            results = pool.map(inspect, paths, chunksize=chunk)
        return _collect(todo, results, cfg, folder, manifest)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(todo: dict[str, str], results: Iterator[tuple[str, Verdict]], cfg: FilterConfig,
             folder: Path, manifest: Path) -> dict[str, Verdict]:
    """Check each result against the manifest's sha256 and cache it as it arrives."""
    key = _cache_key(cfg)
    verdicts: dict[str, Verdict] = {}
    try:
        for (expected, path), (sha, verdict) in zip(todo.items(), results, strict=True):
            if sha != expected:
                raise StepError(f"{manifest}: {path}: content changed since the manifest was written "
                                "(sha256 differs); re-run the manifest step")
            _cache_put(folder, sha, key, verdict)
            verdicts[sha] = verdict
            if len(verdicts) % 5000 == 0:
                log.info("filter: decoded %d / %d", len(verdicts), len(todo))
    except BrokenProcessPool:
        raise StepError(f"{manifest}: a decode worker died (out of memory, or a decoder crashed on a "
                        "file); verdicts so far are cached: re-run with filter.workers: 1 to find the file"
                        ) from None
    except OSError as e:
        raise StepError(f"{manifest}: {e.filename or 'a listed file'}: cannot read ({e.strerror}); "
                        "re-run the manifest step") from None
    return verdicts


def _verdicts(shas: pd.Series, paths: pd.Series, cfg: FilterConfig, cache: Path,
              manifest: Path) -> tuple[dict[str, Verdict], int]:
    """Verdict per distinct sha256 (cache first, then decode); also how many were decoded."""
    first = pd.DataFrame({"sha": shas, "path": paths}).drop_duplicates("sha")
    folder = _cache_dir(cache, cfg)
    key = _cache_key(cfg)
    verdicts: dict[str, Verdict] = {}
    todo: dict[str, str] = {}
    for sha, path in zip(first["sha"], first["path"], strict=True):
        hit = _cache_get(folder, sha, key)
        if hit is None:
            todo[sha] = path
        else:
            verdicts[sha] = hit
    verdicts.update(_decode_all(todo, cfg, folder, manifest))
    return verdicts, len(todo)


# --------------------------------------------------------------------------------------------------
# Pure table logic


def classify(paths: pd.Series, shas: pd.Series, verdicts: dict[str, Verdict]) -> pd.DataFrame:
    """Per row: reason ("" = clean) and detail, from the content verdicts and exact duplicates.

    A bad content's reason applies to every copy; of a good content's copies the first in manifest
    order is kept and the others are ``duplicate``.
    """
    kept = pd.DataFrame({"sha": shas, "path": paths}).drop_duplicates("sha")
    keeper = dict(zip(kept["sha"], kept["path"], strict=True))
    reasons, details = [], []
    for path, sha in zip(paths, shas, strict=True):
        v = verdicts[sha]
        if not v.ok:
            reasons.append(v.reason)
            details.append(v.detail)
        elif keeper[sha] != path:
            reasons.append("duplicate")
            details.append(f"duplicate of {keeper[sha]}")
        else:
            reasons.append("")
            details.append("")
    return pd.DataFrame({"reason": reasons, "detail": details}, index=paths.index)


def near_duplicate_groups(paths: pd.Series, shas: pd.Series, hashes: pd.Series,
                          max_distance: int) -> pd.Series:
    """``dup_group`` per row: the sha256 of the first member (in manifest order) of its near-duplicate group.

    Groups are the connected components of "pHash distance <= max_distance" (transitive closure).
    """
    order = np.arange(len(paths))
    packed = phash.pack(hashes.to_numpy()[order])
    roots = phash.components(len(order), phash.near_pairs(packed, max_distance))
    sorted_shas = shas.to_numpy()[order]
    group = np.empty(len(order), dtype=object)
    group[order] = sorted_shas[roots]
    return pd.Series(group, index=paths.index, name="dup_group", dtype=str)


def _as_ints(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Integer columns as nullable Int64, so a blank elsewhere never turns 512 into "512.0" in the CSV."""
    out = df.copy()
    for col in columns:
        out[col] = pd.to_numeric(out[col]).astype("Int64")
    return out


def _fill_header(df: pd.DataFrame, verdicts: list[Verdict]) -> pd.DataFrame:
    """Fill width/height/mode/format left blank by the manifest (header unread) from the decode."""
    out = df.copy()
    for col in ("width", "height", "mode", "format"):
        decoded = pd.Series([getattr(v, col) for v in verdicts], index=out.index)
        blank = out[col].isna()
        if blank.any():
            out[col] = out[col].astype(object).where(~blank, decoded)
    return out


def _clean_table(df: pd.DataFrame, shas: pd.Series, status: pd.DataFrame,
                 verdicts: dict[str, Verdict], max_distance: int) -> pd.DataFrame:
    good = status["reason"] == ""
    clean = df.loc[good].copy()
    clean["sha256"] = shas[good]
    row_verdicts = [verdicts[s] for s in clean["sha256"]]
    clean = _fill_header(clean, row_verdicts)
    clean["phash"] = [v.phash for v in row_verdicts]
    clean["dup_group"] = near_duplicate_groups(clean["path"], clean["sha256"], clean["phash"], max_distance)
    return _as_ints(clean[CLEAN_COLUMNS].reset_index(drop=True), _INT_COLUMNS)


def _rejects_table(df: pd.DataFrame, shas: pd.Series, status: pd.DataFrame) -> pd.DataFrame:
    bad = status["reason"] != ""
    rejects = pd.DataFrame({"path": df.loc[bad, "path"], "reason": status.loc[bad, "reason"],
                            "detail": status.loc[bad, "detail"], "sha256": shas[bad],
                            "bytes": df.loc[bad, "bytes"]})
    return _as_ints(rejects[REJECT_COLUMNS].reset_index(drop=True), ["bytes"])


def _summary(n_in: int, clean: pd.DataFrame, rejects: pd.DataFrame, decoded: int, cached: int,
             cfg: FilterConfig) -> dict[str, Any]:
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
                   "near_duplicate_distance": cfg.near_duplicate_distance},
    }


def _log_summary(s: dict[str, Any], seconds: float) -> None:
    reasons = ", ".join(f"{k} {v}" for k, v in s["by_reason"].items() if v) or "none"
    log.info("filter: %d images in, %d clean, %d rejected (%s). Decoded %d distinct files, %d verdicts "
             "from the cache. %d near-duplicate groups hold %d images (largest %d; pHash distance <= %d). "
             "%.1f s.", s["in"], s["clean"], s["rejected"], reasons, s["decoded"], s["cached"],
             s["near_duplicate_groups"], s["images_in_near_dup_groups"], s["largest_near_dup_group"],
             s["params"]["near_duplicate_distance"], seconds)


# --------------------------------------------------------------------------------------------------
# Entry


def run(cfg: Config, *, manifest: Path, clean: Path, rejects: Path, summary: Path,
        cache: Path) -> dict[str, Any]:
    """Decode every image in ``manifest``; write clean.csv, rejects.csv and the summary JSON.

    Returns the summary dict (counts in, clean, rejected, by_reason, decoded, cached, near-duplicate
    groups). Raises StepError for a missing/unreadable manifest, missing columns, or a manifest that
    no longer matches the files on disk.
    """
    started = time.perf_counter()
    fcfg = cfg.filter
    df = _read_manifest(Path(manifest))
    shas = _checked_shas(df, Path(manifest))
    verdicts, decoded = _verdicts(shas, df["path"], fcfg, Path(cache), Path(manifest))
    status = classify(df["path"], shas, verdicts)
    clean_df = _clean_table(df, shas, status, verdicts, fcfg.near_duplicate_distance)
    rejects_df = _rejects_table(df, shas, status)
    result = _summary(len(df), clean_df, rejects_df, decoded, len(verdicts) - decoded, fcfg)
    write_csv(clean, clean_df)
    write_csv(rejects, rejects_df)
    write_json(summary, result)
    _log_summary(result, time.perf_counter() - started)
    return result

"""The filter step (dvc.yaml stage filter): the manifest table -> the clean table, rejects.csv and the filter summary.

Reads and checks the manifest, takes each distinct content's verdict from the packed cache index or
decodes it (worker processes, :mod:`medflow.imaging.quality`), groups near duplicates (the links found last run
kept in the cache folder: only candidate pairs with a new content are checked), and writes the three outputs
atomically.
The checks, their order and the cache are described in :mod:`medflow.imaging.quality`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from medflow.config import Config
from medflow.errors import StepError
from medflow.imaging import quality
from medflow.io import read_csv, readable_path, source_roots, write_csv, write_json, write_table

log = logging.getLogger(__name__)


def run(cfg: Config, *, manifest: Path, clean: Path, rejects: Path, summary: Path,
        cache: Path, roots_json: Path | None = None) -> dict[str, Any]:
    """Decode every image in ``manifest``; write the clean table, rejects.csv and the summary JSON.

    ``cache`` is the folder of the verdict index (persistent across runs); ``roots_json`` (the extract step's)
    locates the paths under a source root outside the project. Returns the summary dict
    (counts in, clean, rejected, by_reason, decoded, cached, near-duplicate groups). Raises StepError for
    a missing/unreadable manifest, missing columns, or a manifest that no longer matches the files on disk,
    and (after writing the outputs) when every image was rejected. A file that cannot be read is one
    ``unreadable`` reject row (:func:`medflow.imaging.quality.file_states`), never a failed step.
    """
    started = time.perf_counter()
    manifest, fcfg = Path(manifest), cfg.filter
    df = quality.check_manifest(_read_manifest(manifest), manifest)
    roots = source_roots(roots_json)  # paths under a source root outside the project: @<label>/...
    files = pd.DataFrame({"path": [readable_path(p, roots) for p in df["path"]], "sha256": df["sha256"],
                          "bytes": df["bytes"]}, index=df.index)  # what is checked and decoded: no table copy
    unreadable, sizes = quality.file_states(files)  # one reject row each unreadable; the rest of the step goes on
    readable = files.drop(index=unreadable.index) if len(unreadable) else files
    shas = quality.checked_shas(readable, sizes, manifest)
    index = quality.VerdictIndex.load(Path(cache), fcfg)
    verdicts, distinct, decoded = quality.content_verdicts(shas, readable["path"], fcfg, index, manifest,
                                                 cfg.compute.dask_address)
    status = quality.with_unreadable(quality.classify(df.loc[readable.index, "path"], shas, verdicts), unreadable,
                                     df.index)
    shas = shas.reindex(df.index, fill_value="")
    known = quality.known_pairs(Path(cache), fcfg)  # an increment confirms the candidate pairs it adds alone
    status, groups = quality.label_conflicts(df, shas, status, verdicts, fcfg.near_duplicate_distance,
                                             fcfg.near_duplicate_min_correlation, known)
    known.save()
    _warn_conflicts(df["path"], status)
    clean_df = quality.clean_table(df, shas, status, verdicts, groups)
    rejects_df = quality.rejects_table(df, shas, status)
    result = quality.summarize(len(df), clean_df, rejects_df, decoded, distinct - decoded, fcfg)
    write_table(clean, clean_df)
    write_csv(rejects, rejects_df)
    write_json(summary, result)
    _log_summary(result, time.perf_counter() - started)
    if clean_df.empty and len(df):  # the outputs are written (rejects.csv says why), but no later stage can run
        raise StepError(f"{manifest}: {quality.everything_rejected(len(df), rejects_df, Path(rejects))}")
    return result


def _read_manifest(manifest: Path) -> pd.DataFrame:
    """The manifest table as a DataFrame; StepError naming the file when it is missing or not a readable CSV."""
    try:
        return read_csv(manifest)
    except FileNotFoundError:
        raise StepError(f"{manifest}: manifest not found (run the manifest step first)") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise StepError(f"{manifest}: cannot read manifest: {e}") from None


def _warn_conflicts(paths: pd.Series, status: pd.DataFrame) -> None:
    """One WARNING naming the files quarantined because their content carries two labels."""
    bad = status["reason"] == quality.LABEL_CONFLICT
    if bad.any():
        i = bad.idxmax()
        log.warning("%d file(s) carry two labels (the same or nearly the same image under two class folders) "
                    "and are quarantined as %s, e.g. %s: %s", int(bad.sum()), quality.LABEL_CONFLICT,
                    paths[i], status.loc[i, "detail"])


def _log_summary(s: dict[str, Any], seconds: float) -> None:
    reasons = ", ".join(f"{k} {v}" for k, v in s["by_reason"].items() if v) or "none"
    log.info("filter: %d images in, %d clean, %d rejected (%s). Decoded %d distinct files, %d verdicts "
             "from the cache. %d near-duplicate groups hold %d images (largest %d; pHash distance <= %d). "
             "%.1f s.", s["in"], s["clean"], s["rejected"], reasons, s["decoded"], s["cached"],
             s["near_duplicate_groups"], s["images_in_near_dup_groups"], s["largest_near_dup_group"],
             s["params"]["near_duplicate_distance"], seconds)

"""The split step (dvc.yaml stage split): clean manifest -> split manifest and its summary.

Splits with :func:`medflow.data.split.assign_splits` (patient- and near-duplicate-grouped, stratified,
seeded), or, when ``out`` already holds a split made with the same ``split`` params, extends it with
:func:`medflow.data.split.extend_split`, so new data never moves an image that was already assigned. New
images that would join units of different splits are quarantined into ``rejects`` (reason ``links_splits``,
the images they link to named) and left out of the split table; the run goes on. The rows the resize step could not
decode (its ``resize_rejects``: no pixels in the store) are quarantined too, with resize's reason and detail, and
take no part in the split. ``rejects`` is the split step's own output (the filter's rejects.csv is another
stage's), written on every run, header only when none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medflow.config import Config, SplitConfig
from medflow.data.split import (
    CARRIED_COLUMNS,
    PREVIOUS_COLUMNS,
    QUARANTINE_COLUMNS,
    SPLIT_READS,
    assign_splits,
    extend_split,
    quarantine_summary,
    source_test_summary,
    split_summary,
)
from medflow.errors import StepError
from medflow.io import TableWriter, read_csv, read_json, table_columns, text_chunks, write_csv, write_json
from medflow.schema import CLEAN_COLUMNS, SPLIT_COLUMNS, SPLITS

log = logging.getLogger(__name__)


LEGACY_SUFFIX = ".csv"  # the split was one CSV beside the table folder (``split.csv``) before tables had parts


def _previous(out: Path, summary: Path, cfg: SplitConfig) -> pd.DataFrame | None:
    """The split to extend: ``out`` as the last run left it, if that run used the same split params. Where
    ``out`` is missing but the one CSV of before tables were folders is beside it (``split.csv``, left by an
    earlier medflow), that is the previous split: an upgrade extends it, never re-splits."""
    if not out.exists():
        legacy = out.with_name(out.name + LEGACY_SUFFIX)
        if not legacy.is_file():
            return None
        log.info("split: %s not found; extending %s, the split an earlier medflow wrote", out, legacy)
        out = legacy
    try:
        made_with = read_json(summary).get("params")
    except (OSError, ValueError):
        made_with = None
    if made_with != cfg.model_dump():
        log.info("split: %s was made with other split params (or none recorded): splitting from scratch", out)
        return None
    try:
        return read_csv(out, columns=PREVIOUS_COLUMNS)  # a third of the table's memory
    except (OSError, ValueError) as e:
        log.warning("split: %s is unreadable (%s): splitting from scratch", out, e)
        return None


def _read_clean(clean: Path) -> pd.DataFrame:
    """The clean table's columns the split works on (SPLIT_READS); StepError naming ``clean`` when it is missing
    or lacks a column of the schema."""
    try:
        columns = table_columns(clean)
    except FileNotFoundError:
        raise StepError(f"{clean}: clean manifest not found (run the filter step first)") from None
    missing = [c for c in CLEAN_COLUMNS if c not in columns]
    if missing:
        raise StepError(f"{clean}: clean manifest lacks columns {missing} (expected {CLEAN_COLUMNS})")
    return read_csv(clean, columns=SPLIT_READS)


def _write_split(out: Path, result: pd.DataFrame, clean: Path) -> None:
    """The split table: ``result`` (the split of the clean table's SPLIT_READS, rows in clean-table order, ``row``
    their positions there) with the columns it only carries (CARRIED_COLUMNS) read again from ``clean``, a chunk of
    rows at a time, as the text they were written with (their paths checked against ``result``'s: StepError when the
    table was replaced in between); written atomically, chunk by chunk."""
    rows = result["row"].to_numpy()
    if not (np.diff(rows) > 0).all():
        raise StepError(f"{clean}: the split's rows are not in clean-table order (internal error)")
    start = 0
    with TableWriter(out) as writer:
        for chunk in text_chunks(clean, ("path", *CARRIED_COLUMNS)):
            first = int(chunk.index[0]) if len(chunk) else 0
            stop = int(np.searchsorted(rows, first + len(chunk)))
            carried = chunk.iloc[rows[start:stop] - first]
            part = result.iloc[start:stop]
            if not (carried["path"].to_numpy() == part["path"].to_numpy()).all():  # raised inside: nothing written
                raise StepError(f"{clean}: the clean table changed while the split step ran (re-run it)")
            writer.write(part.assign(**{c: carried[c].to_numpy() for c in CARRIED_COLUMNS}).loc[:, SPLIT_COLUMNS])
            start = stop
        if start != len(rows):  # raised inside: the previous split table stays whole
            raise StepError(f"{clean}: {len(rows) - start} rows of the split are past the clean table's end "
                            "(internal error)")
        if not len(rows):  # no rows: the header alone
            writer.write(result.assign(**{c: "" for c in CARRIED_COLUMNS}).loc[:, SPLIT_COLUMNS])


def _format(summary: Mapping[str, Any], names: Iterable[str] = SPLITS) -> str:
    """One log line: images, positives and patients per split."""
    return "; ".join(f"{n}: {s['images']} images ({s['label_1']} positive), {s['patients']} patients"
                     for n, s in ((n, summary["splits"][n]) for n in names))


def _resize_rejects(path: Path | None, df: pd.DataFrame, clean: Path) -> pd.DataFrame:
    """The resize step's rejects as QUARANTINE_COLUMNS rows (``links`` empty); StepError naming ``path`` when
    it is missing or a row's ``row`` does not hold its ``path`` in the clean table (rejects of another clean table)."""
    if path is None:
        return pd.DataFrame(columns=QUARANTINE_COLUMNS)
    try:
        late = read_csv(path)
    except FileNotFoundError:
        raise StepError(f"{path}: the resize step's rejects not found (run the resize step first)") from None
    missing = [c for c in QUARANTINE_COLUMNS if c not in late.columns and c != "links"]
    if missing:
        raise StepError(f"{path}: missing column(s) {', '.join(missing)}")
    rows = pd.to_numeric(late["row"], errors="coerce")
    valid = rows.between(0, len(df) - 1) & (rows == rows.round())
    listed = df["path"].to_numpy()[rows.where(valid, 0).astype(int).to_numpy()] if len(df) else late["path"]
    stale = ~valid | (listed != late["path"].to_numpy())
    if stale.any():
        first = late.loc[stale].iloc[0]
        raise StepError(f"{path}: row {first['row']} ({first['path']}) is not that row of {clean}: the resize "
                        "rejects are of another clean manifest (run the resize step again)")
    return late.assign(row=rows.astype(np.int64), links="").loc[:, QUARANTINE_COLUMNS]


def run(cfg: Config, *, clean: Path, out: Path, summary: Path, rejects: Path | None = None,
        resize_rejects: Path | None = None) -> dict[str, Any]:
    """Read the clean table, split it, write the split table, the split's quarantine and its summary atomically; return
    the summary.

    When ``out`` (persisted by DVC) holds the previous split and ``summary`` says it was made with the
    same ``split`` params, the new split extends it: a patient in test stays in test, and new images that
    would join units of different splits go to ``rejects`` (default: split_rejects.csv beside ``out``)
    instead of a split. Other split params split from scratch. The rows listed in ``resize_rejects`` (the
    resize step's rejects) go to ``rejects`` as they are, in no split; the other rows keep their ``row``.
    """
    df = _read_clean(Path(clean))
    rejects = Path(out).with_name("split_rejects.csv") if rejects is None else Path(rejects)
    late = _resize_rejects(None if resize_rejects is None else Path(resize_rejects), df, Path(clean))
    if len(late):  # left out of the split; every other row keeps its position in the clean table (= the image store)
        df = df.assign(row=np.arange(len(df), dtype=np.int64)).drop(index=df.index[late["row"].to_numpy()])
    previous = _previous(Path(out), Path(summary), cfg.split)
    try:
        if previous is None:
            result, linking = assign_splits(df, cfg.split), pd.DataFrame(columns=QUARANTINE_COLUMNS)
        else:
            result, linking = extend_split(previous, df, cfg.split)
    except StepError as e:
        raise StepError(f"{clean}: {e}") from None
    parts = [part for part in (late, linking) if len(part)]
    quarantined = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0] if parts else linking
    write_csv(rejects, quarantined)
    _write_split(Path(out), result, Path(clean))
    counts = split_summary(result)
    kept = 0 if previous is None else int(result["path"].isin(previous["path"]).sum())
    source_test = source_test_summary(result, cfg.split)
    write_json(summary, {**counts, "extended": previous is not None, "kept": kept, "source_test": source_test,
                         "quarantined": quarantine_summary(quarantined, str(rejects)),
                         "params": cfg.split.model_dump()})
    log.info("split %s -> %s (%s): %s; test: %s%s", clean, out, f"extended, {kept} images kept"
             if previous is not None else "from scratch", _format(counts), source_test["how"],
             f" ({source_test['moved_into_test']} images of other source splits moved in)" if source_test["kept"]
             else "")
    if len(late):
        log.warning("split: %d images the resize step could not decode quarantined (%s), listed in %s, e.g. %s",
                    len(late), resize_rejects, rejects, late["path"].head(3).tolist())
    if len(linking):
        log.warning("split: %d new images quarantined (links_splits: they would join images of different "
                    "splits), listed in %s, e.g. %s", len(linking), rejects, linking["path"].head(3).tolist())
    return {**counts, "quarantined": len(quarantined)}

"""The validate step (dvc.yaml stage validate): Great Expectations on the split table and the image store's header.

Reads the split manifest and the array's shape and dtype (memory-mapped, no pixels read), runs the suites
of :mod:`medflow.data.expectations` and the shortcut check of :mod:`medflow.data.shortcuts` (can file
metadata alone predict the label?), and writes the GX result JSON and a Markdown summary (atomically)
whether or not they pass. Any failed expectation then stops the pipeline with a StepError listing them; a
flagged shortcut check is a loud warning, or a StepError naming its features where
``validate.fail_on_shortcut`` is true.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medflow.config import Config
from medflow.data import expectations as gxs
from medflow.data import shortcuts
from medflow.errors import StepError
from medflow.io import atomic_open, open_images, read_csv, write_json

log = logging.getLogger(__name__)


def run(cfg: Config, *, split: Path, images: Path, result: Path, summary: Path,
        split_rejects: Path | None = None) -> dict[str, Any]:
    """Validate the split table and the image store header; write the GX result JSON and a Markdown summary
    (atomically).

    Returns counts (expectations, rows, seconds, n/n_pos/n_neg per split). Raises StepError naming the
    file when an input is missing or unreadable, and (after writing both files) when any expectation fails.
    """
    df, shape, dtype = _read_inputs(Path(split), Path(images))
    quarantined = _quarantined_rows(None if split_rejects is None else Path(split_rejects))
    tables = gxs.suite_tables(df, shape, dtype, cfg, quarantined)
    start = time.perf_counter()
    results = gxs.validate_tables(tables)
    seconds = time.perf_counter() - start
    outs = gxs.outcomes(tables, results)
    failed = [o for o in outs if not o.passed]
    splits = next(t.df for t in tables if t.name == "splits")
    shortcut = _shortcut_check(df, cfg)
    header = {"split manifest": split, "images": f"{images} {shape} {dtype}", "rows": len(df),
              "seconds": round(seconds, 3)}
    write_json(result, gxs.result_json(results, outs, seconds, shortcut))
    with atomic_open(summary) as f:
        f.write(gxs.summary_markdown(outs, splits, header, shortcut))
    log.info("validation of %s: %d expectations, %d failed, %.2f s", split, len(outs), len(failed), seconds)
    if failed:
        raise StepError(gxs.error_message(failed, len(outs), Path(summary)))
    if shortcut.failed:
        raise StepError(f"validation failed: {shortcut.describe()}; the features that carry it: "
                        f"{', '.join(shortcut.carriers)} (validate.fail_on_shortcut is true; details in {summary})")
    return {"expectations": len(outs), "failed": 0, "rows": len(df), "seconds": round(seconds, 3),
            "splits": splits.set_index("split")[["n", "n_pos", "n_neg"]].to_dict(orient="index"),
            "shortcut": shortcut.as_dict()}


def _shortcut_check(df: pd.DataFrame, cfg: Config) -> shortcuts.ShortcutCheck:
    """Metadata -> label (see medflow.data.shortcuts); flagged: a WARNING in the log, whatever fail_on_shortcut."""
    v = cfg.validate_
    check = shortcuts.check_shortcuts(df, threshold=v.shortcut_auc_max, fail_on_shortcut=v.fail_on_shortcut,
                                      seed=cfg.split.seed)
    if check.flagged:
        log.warning("SHORTCUT: %s. A model may learn how the files were stored, not what they show%s", check.describe(),
                    "" if check.failed else " (warning only: validate.fail_on_shortcut is false)")
    else:
        log.info("%s", check.describe())
    return check


def _quarantined_rows(split_rejects: Path | None) -> int:
    """Images the split step quarantined (in the image store, in no split): the rows of its split_rejects.csv."""
    if split_rejects is None:
        return 0
    try:
        return len(read_csv(split_rejects))
    except FileNotFoundError:
        raise StepError(f"{split_rejects}: the split's quarantine not found (run the split step first)") from None


def _read_inputs(split: Path, images: Path) -> tuple[pd.DataFrame, tuple[int, ...], np.dtype]:
    """The split table as a DataFrame and the images array's shape and dtype; StepError naming a missing file."""
    try:
        df = read_csv(split)
    except FileNotFoundError:
        raise StepError(f"{split}: split manifest not found (run the split step first)") from None
    array = open_images(images)
    return df, tuple(array.shape), array.dtype

"""The validate step's Great Expectations suites over the split manifest and the resized images.

The step (tasks/validate.py) reads the split table and the image store's header and writes the results; this
module builds the tables, runs the suites and words the outcome. Tables are validated in one ephemeral GX
context (nothing written to disk by GX, no Data Docs, no analytics, no progress bars):

``manifest`` (the split table, one row per image)
    columns exactly :data:`medflow.schema.SPLIT_COLUMNS`; label in {0, 1}; no nulls in the id columns;
    unique path, sha256 (across the whole dataset) and row; split in train/val/test; ``row`` within
    [0, number of images).
``patients``, ``near_duplicates``, ``split_units`` (from :func:`splits_per_group`)
    one row per patient (``group``), near-duplicate set (``dup_group``) or split unit (``split_group``)
    with the number of splits its images are in, which must be 1: **no patient, no near-duplicate set and
    no split unit in two splits**. A derived table checked by a built-in expectation replaces a custom
    column-pair expectation: each offending row is a group, named with the first image of it in each of
    its splits (``where``), so the report lists leaking patients rather than all their images.
``splits`` (one row per split, from :func:`split_table`)
    both classes in every split (n_pos >= 1, n_neg >= 1); ``|share - target| <= validate.split_tolerance``;
    ``|positive share - overall positive share| <= validate.class_ratio_tolerance``. Targets are
    split.train/val/test; where ``split.keep_source_test`` keeps the source's test split the test share is the
    source's own (so the test share check always passes) and train/val targets are the rest in the ratio train
    : val.
``images`` (one row from the image store's header, read memory-mapped)
    n == number of manifest rows plus the images the split step quarantined (split_rejects.csv: in
    the image store, in no split; their ``row`` is simply absent from the manifest), shape (n, size, size,
    channels) with resize.size and dataset.channels,
    dtype uint8.

Beside the suites, :func:`medflow.data.shortcuts.check_shortcuts` asks whether file metadata alone (format,
mode, size, source folder) predicts the label; its AUC and verdict go into both files, flagged loudly at the
top of the summary above ``validate.shortcut_auc_max`` (a failure where ``validate.fail_on_shortcut``).

Failing rows are named by ``path`` (manifest), ``where`` (the group tables) or ``split`` (splits table).
An expectation that raised an exception counts as failed, never as passed. Any failure stops the pipeline
with a StepError that lists the failed expectations and offending rows, after the JSON result and the
Markdown summary are written.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before GX is imported: no analytics, and none of its INFO chatter (it logs while registering classes).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
logging.getLogger("great_expectations").setLevel(logging.WARNING)

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.expectation import Expectation  # noqa: E402

from medflow.config import Config  # noqa: E402
from medflow.data import shortcuts  # noqa: E402
from medflow.data.shortcuts import ShortcutCheck  # noqa: E402
from medflow.schema import SPLIT_COLUMNS, SPLITS  # noqa: E402

log = logging.getLogger(__name__)

MAX_LISTED = 20  # offending rows named per failed expectation
NOT_NULL = ("path", "relpath", "class_name", "label", "group", "sha256", "split", "split_group", "dup_group",
            "row")
# Manifest column -> (derived table, check): each such group must lie in one split.
ONE_SPLIT_PER = {"group": ("patients", "no patient in two splits"),
                 "dup_group": ("near_duplicates", "no near-duplicate set in two splits"),
                 "split_group": ("split_units", "no split unit in two splits")}
_NULL = "<null>"


# ------------------------------------------------------------------------------------------ tables
def target_shares(split: pd.Series, cfg: Config, source_split: pd.Series | None = None) -> dict[str, float]:
    """Expected share of images per split (see the module docstring for ``keep_source_test``)."""
    s = cfg.split
    has_test = source_split is not None and bool((source_split == "test").any())
    if not s.keeps_source_test(has_test):
        return {"train": s.train, "val": s.val, "test": s.test}
    test = float((split == "test").mean()) if len(split) else 0.0
    rest = (1.0 - test) / (s.train + s.val)
    return {"train": rest * s.train, "val": rest * s.val, "test": test}


def split_table(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """One row per split: n, share, target, share_deviation, n_pos, n_neg, pos_share, pos_share_deviation.

    Works on broken manifests too (missing columns give zero counts, which the expectations then reject).
    """
    split = df["split"] if "split" in df.columns else pd.Series(index=df.index, dtype=object)
    label = df["label"] if "label" in df.columns else pd.Series(index=df.index, dtype=float)
    total, overall_pos = len(df), float((label == 1).mean()) if len(df) else math.nan
    targets = target_shares(split, cfg, df["source_split"] if "source_split" in df.columns else None)
    rows = []
    for name in SPLITS:
        part = label[split == name]
        n, n_pos, n_neg = len(part), int((part == 1).sum()), int((part == 0).sum())
        share = n / total if total else math.nan
        pos_share = n_pos / n if n else math.nan
        rows.append({"split": name, "n": n, "share": share, "target": targets[name],
                     "share_deviation": share - targets[name], "n_pos": n_pos, "n_neg": n_neg,
                     "pos_share": pos_share, "pos_share_deviation": pos_share - overall_pos})
    return pd.DataFrame(rows)


def splits_per_group(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per distinct ``column`` value (a patient, near-duplicate set or split unit) of the manifest.

    Columns: ``value``; ``n_splits``, the number of distinct splits its images are in (1 when the split is
    sound); ``where``, how a failure names it: for a group in two or more splits the value and the first path
    (in manifest order) in each of its splits, e.g. ``person7 (train: .../person7_virus_1.jpeg; test:
    .../person7_virus_3.jpeg)``, else the value alone (no text per image: at 27,558 images, mostly singleton
    near-duplicate sets and units, that text was about 0.4 KB an image of the step's peak memory).
    A null split is a split of its own and null values form one group (as in a groupby). Without
    ``column``, ``split`` or ``path`` the table is one row with ``n_splits`` 0 saying what is missing, so
    the check fails rather than passing on nothing.
    """
    missing = [c for c in (column, "split", "path") if c not in df.columns]
    if missing:
        return pd.DataFrame({"value": [_NULL], "n_splits": [0],
                             "where": [f"the split manifest has no {', '.join(missing)} column"]})
    rows = pd.DataFrame({c: df[name].astype(object).where(df[name].notna(), _NULL).astype(str)
                         for c, name in (("value", column), ("split", "split"), ("path", "path"))})
    first = rows.drop_duplicates(["value", "split"])  # each group's first image in each of its splits
    n_splits = first.groupby("value", sort=False).size()
    where = n_splits.index.to_series().astype(object)
    named = first.loc[first["value"].map(n_splits) > 1]  # text made only for the groups it names (a leak)
    if len(named):
        at = (named["split"] + ": " + named["path"]).groupby(named["value"], sort=False).agg("; ".join)
        where[at.index] = at.index.to_series() + " (" + at + ")"
    out = pd.DataFrame({"n_splits": n_splits, "where": where})
    return out.rename_axis("value").reset_index()


def image_table(shape: Sequence[int], dtype: np.dtype) -> pd.DataFrame:
    """One row describing the image store: n, ndim, height, width, channels, dtype (-1 for absent axes)."""
    dims = list(shape) + [-1] * (4 - len(shape))
    return pd.DataFrame([{"n": int(dims[0]), "ndim": len(shape), "height": int(dims[1]),
                          "width": int(dims[2]), "channels": int(dims[3]), "dtype": str(dtype)}])


# ------------------------------------------------------------------------------------------- suites
def _manifest_expectations(n_images: int) -> list[Expectation]:
    exps: list[Expectation] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(SPLIT_COLUMNS), exact_match=True,
                                         description="columns are exactly the split manifest schema"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1], description="labels are 0 or 1"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                        description="split is train, val or test"),
    ]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"every row has a {c}")
             for c in NOT_NULL]
    exps += [gxe.ExpectColumnValuesToBeUnique(column=c, description=f"{c} is unique")
             for c in ("path", "sha256", "row")]
    exps.append(gxe.ExpectColumnValuesToBeBetween(column="row", min_value=0, max_value=n_images - 1,
                                                  description=f"row indexes the image store (0..{n_images - 1})"))
    return exps


def _group_expectations(description: str) -> list[Expectation]:
    return [gxe.ExpectColumnValuesToBeInSet(column="n_splits", value_set=[1], description=description)]


def _split_expectations(cfg: Config) -> list[Expectation]:
    tol, ctol = cfg.validate_.split_tolerance, cfg.validate_.class_ratio_tolerance
    exps: list[Expectation] = [
        gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} is defined (split not empty)")
        for c in ("share_deviation", "pos_share_deviation")
    ]
    exps += [
        gxe.ExpectColumnValuesToBeBetween(column="n_pos", min_value=1, description="positives in each split"),
        gxe.ExpectColumnValuesToBeBetween(column="n_neg", min_value=1, description="negatives in each split"),
        gxe.ExpectColumnValuesToBeBetween(column="share_deviation", min_value=-tol, max_value=tol,
                                          description=f"split share within {tol:g} of target "
                                                      "(validate.split_tolerance)"),
        gxe.ExpectColumnValuesToBeBetween(column="pos_share_deviation", min_value=-ctol, max_value=ctol,
                                          description=f"positive share within {ctol:g} of the overall "
                                                      "(validate.class_ratio_tolerance)"),
    ]
    return exps


def _image_expectations(cfg: Config, n_rows: int) -> list[Expectation]:
    size = cfg.resize.size
    expected: dict[str, Any] = {"n": n_rows, "ndim": 4, "height": size, "width": size,
                                "channels": cfg.dataset.channels, "dtype": "uint8"}
    return [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[v], description=f"images {c} == {v}")
            for c, v in expected.items()]


# -------------------------------------------------------------------------------------------- running
def _context() -> Any:
    """A quiet in-memory GX context (no docs site, no analytics, no progress bars)."""
    stores = InMemoryStoreBackendDefaults(init_temp_docs_sites=False)
    config = DataContextConfig(store_backend_defaults=stores, analytics_enabled=False,
                               progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False))
    return gx.get_context(mode="ephemeral", project_config=config)


@dataclass(frozen=True)
class Table:
    """One DataFrame to validate, its expectations, and the column that names offending rows."""

    name: str
    df: pd.DataFrame
    expectations: Sequence[Expectation]
    id_column: str | None = None


@dataclass
class Outcome:
    """One expectation's verdict, in a form for the summary and the error message."""

    table: str
    expectation: str
    args: str
    description: str
    passed: bool
    unexpected_count: int | None = None
    offending: list[str] = field(default_factory=list)
    detail: str = ""


def validate_tables(tables: Sequence[Table]) -> dict[str, Any]:
    """Run each table's expectations in one ephemeral context; table name -> suite validation result."""
    context = _context()
    source = context.data_sources.add_pandas("medflow")
    results: dict[str, Any] = {}
    for table in tables:
        batch_def = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe("all")
        batch = batch_def.get_batch(batch_parameters={"dataframe": table.df})
        suite = gx.ExpectationSuite(name=f"medflow-{table.name}", expectations=list(table.expectations))
        result_format: dict[str, Any] = {"result_format": "COMPLETE"}
        if table.id_column and table.id_column in table.df.columns:
            result_format["unexpected_index_column_names"] = [table.id_column]
        results[table.name] = batch.validate(suite, result_format=result_format)
    return results


def _raised(info: Any) -> str | None:
    """The exception message if an expectation raised (GX nests it per metric), else None."""
    if not isinstance(info, Mapping):
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message") or "exception") if info["raised_exception"] else None
    for value in info.values():
        message = _raised(value)
        if message:
            return message
    return None


def _args(kwargs: Mapping[str, Any]) -> str:
    keep = {k: v for k, v in kwargs.items() if k not in {"batch_id", "result_format"}}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


def _outcome(table: Table, result: Any) -> Outcome:
    config = result.expectation_config
    res: Mapping[str, Any] = result.result or {}
    error = _raised(result.exception_info)
    out = Outcome(table=table.name, expectation=config.type, args=_args(config.kwargs),
                  description=config.description or "", passed=result.success is True and error is None,
                  unexpected_count=res.get("unexpected_count"))
    if table.id_column:
        ids = [str(d[table.id_column]) for d in res.get("unexpected_index_list") or []
               if isinstance(d, Mapping) and table.id_column in d]
        out.offending = list(dict.fromkeys(ids))
    if error:
        out.detail = f"raised: {error.splitlines()[0][:300]}"
    elif not out.passed and not out.offending:
        mismatched = (res.get("details") or {}).get("mismatched")
        if mismatched:  # table columns: say which are missing and which are extra
            out.detail = "; ".join(f"{k}: {v}" for k, v in mismatched.items() if v)
        else:
            observed = res.get("observed_value", res.get("partial_unexpected_list"))
            out.detail = f"observed: {observed}"[:300]
    return out


def outcomes(tables: Sequence[Table], results: Mapping[str, Any]) -> list[Outcome]:
    """Every expectation's verdict; a missing result or a raised exception is a failure."""
    out: list[Outcome] = []
    for table in tables:
        suite_result = results[table.name]
        out += [_outcome(table, r) for r in suite_result.results]
        if len(suite_result.results) != len(table.expectations):
            out.append(Outcome(table.name, "result count", "", "one result per expectation", False,
                               detail=f"{len(suite_result.results)} results for "
                                      f"{len(table.expectations)} expectations"))
    return out


# -------------------------------------------------------------------------------------------- reports
def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _listed(o: Outcome) -> str:
    if not o.offending:
        return o.detail
    more = f" (+{len(o.offending) - MAX_LISTED} more)" if len(o.offending) > MAX_LISTED else ""
    return ", ".join(o.offending[:MAX_LISTED]) + more


def summary_markdown(outs: Sequence[Outcome], splits: pd.DataFrame, header: Mapping[str, Any],
                     shortcut: ShortcutCheck | None = None) -> str:
    """Readable report: verdict (a flagged shortcut check loudly under it), the per-split table, the shortcut
    check and one line per expectation."""
    failed = [o for o in outs if not o.passed]
    verdict = "PASSED" if not failed else f"FAILED ({len(failed)} of {len(outs)} expectations)"
    if shortcut is not None and shortcut.failed:
        verdict = f"FAILED (shortcut check{'' if not failed else f'; {len(failed)} of {len(outs)} expectations'})"
    lines = [f"# Validation {verdict}", ""]
    if shortcut is not None and shortcut.flagged:
        lines += [shortcuts.banner(shortcut), ""]
    lines += [f"- {k}: {_cell(v)}" for k, v in header.items()]
    lines += ["", "## Splits", "", "| split | n | share | target | n_pos | n_neg | pos_share |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in splits.itertuples(index=False):
        lines.append(f"| {r.split} | {r.n} | {r.share:.3f} | {r.target:.3f} | {r.n_pos} | {r.n_neg} | "
                     f"{r.pos_share:.3f} |")
    if shortcut is not None:
        lines += ["", *shortcuts.markdown(shortcut)]
    lines += ["", "## Expectations", "", "| table | expectation | arguments | check | result | unexpected | "
              "offending rows / detail |", "|---|---|---|---|---|---:|---|"]
    for o in sorted(outs, key=lambda o: o.passed):  # failures first
        count = "" if o.unexpected_count is None else o.unexpected_count
        lines.append(f"| {o.table} | {o.expectation} | {_cell(o.args)} | {_cell(o.description)} | "
                     f"{'pass' if o.passed else '**FAIL**'} | {count} | {_cell(_listed(o))} |")
    return "\n".join(lines) + "\n"


def error_message(failed: Sequence[Outcome], total: int, summary: Path) -> str:
    """The StepError text: one line per failed expectation with its offending rows (see ``summary``)."""
    lines = [f"validation failed: {len(failed)} of {total} expectations (details in {summary}):"]
    for o in failed:
        parts = [f"{o.unexpected_count} rows" if o.unexpected_count else "", _listed(o)]
        lines.append(f"  - {o.table}: {o.expectation}({o.args}) [{o.description}]: "
                     + ": ".join(p for p in parts if p))
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively, so the result is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- suite
def suite_tables(df: pd.DataFrame, shape: Sequence[int], dtype: np.dtype, cfg: Config,
                 quarantined: int = 0) -> list[Table]:
    """Every table of the suite with its expectations: the manifest, the three group tables, the per-split
    table and the image store's header (``shape``, ``dtype``; ``quarantined`` images of it are in no split)."""
    tables = [Table("manifest", df, _manifest_expectations(shape[0] if len(shape) else 0), "path")]
    tables += [Table(name, splits_per_group(df, column), _group_expectations(description), "where")
               for column, (name, description) in ONE_SPLIT_PER.items()]
    tables += [Table("splits", split_table(df, cfg), _split_expectations(cfg), "split"),
               Table("images", image_table(shape, dtype), _image_expectations(cfg, len(df) + quarantined))]
    return tables


def result_json(results: Mapping[str, Any], outs: Sequence[Outcome], seconds: float,
                shortcut: ShortcutCheck | None = None) -> dict[str, Any]:
    """The validation result file: success, the failed expectations (and a failed shortcut check), the
    shortcut check and every suite's GX result (strict JSON)."""
    failed = [f"{o.table}: {o.expectation}({o.args})" for o in outs if not o.passed]
    if shortcut is not None and shortcut.failed:
        failed.append(f"shortcut check: {shortcut.describe()}")
    return _json_safe({"success": not failed, "seconds": seconds, "failed": failed,
                       "shortcut": None if shortcut is None else shortcut.as_dict(),
                       "suites": {k: v.to_json_dict() for k, v in results.items()}})

"""Split step: seeded train/val/test assignment grouped by patient and near-duplicate group.

Grouping rule (the one place it is implemented): **each patient (`group`) contributes to one split only,
and so does each near-duplicate image set (`dup_group`)**. Patients that share a near-duplicate group are
joined into one *unit*: the connected components of the graph whose nodes are patients and near-duplicate
groups and whose edges are the images (patient A and patient B with two near-identical images become one
unit, and so does everything chained to them), and a unit goes to exactly one split. So no patient and no
near-duplicate image set can span two splits. A unit's id (`split_group`) is its smallest member `group`
id, which does not depend on row order.

Assignment (stratified by label, seeded by ``split.seed``):

1. Units are sorted by id, shuffled with ``numpy.random.default_rng(seed)``, then stably sorted by size,
   largest first (big units are hardest to place; the shuffle decides among equal sizes, so the seed
   matters and the input row order does not).
2. Each unit goes, in that order, to the split that most reduces the chi-square distance
   ``sum over (split, label) of (count - target)**2 / target`` between the current per-(split, label)
   image counts and their targets ``ratio[split] * total[label]``. Filling the largest relative deficit
   first keeps both the split sizes and each split's positive share close to target even when patients
   have very different numbers of images.

``split.keep_source_test`` (``auto``: where any row has ``source_split`` test; ``true``: required; ``false``:
ignored): every unit with at least one row whose ``source_split`` is ``test`` goes to test, whole (rows of
such a unit from outside the source test set follow it, with a warning); val is then carved out of the
remaining units with ratio ``val / (train + val)``.

:func:`extend_split` keeps the split of every unit already present in an earlier split manifest and places
only the new units by the rule above. The split step (tasks/split.py) extends its own previous output
whenever the split params are unchanged, so new data never moves an image that was already assigned.

An increment never stops the pipeline: a unit that would join patients or near-duplicate sets of
*different* previous splits (a new image near-duplicating a train image and a test image, a new slice
joining two cases) cannot be placed without moving an assigned image or leaking. Its new images are
quarantined (reason ``links_splits``, the images they link to named) and left out of every split; its
images already assigned keep their split and the patient and near-duplicate ids they had in the previous
split (the new ids were joined only through the quarantined images). A quarantined image is looked at
again on every run: once what it linked is gone it is placed like any new image. Re-splitting from
scratch (changing a ``split`` param, or deleting the split table) stays an explicit choice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from medflow.config import SplitConfig
from medflow.errors import StepError
from medflow.io import read_csv
from medflow.schema import CLEAN_COLUMNS, REJECT_COLUMNS, SPLIT_COLUMNS, SPLITS

log = logging.getLogger(__name__)

LABELS = (0, 1)
_ID_COLUMNS = ("path", "group", "dup_group", "label")
LINKS_SPLITS = "links_splits"  # the quarantine reason of a new image that would join units of different splits
PREVIOUS_COLUMNS = ("path", "group", "dup_group", "split")  # what extend_split reads of the previous split
# The clean-table columns the split works on. It carries the others through unchanged: given a frame without them
# (the split step reads them again, a chunk at a time, as it writes the split table) it returns none of them.
SPLIT_READS = ("path", "root", "label", "group", "source_split", "sha256", "bytes", "dup_group")
CARRIED_COLUMNS = tuple(c for c in CLEAN_COLUMNS if c not in SPLIT_READS)
QUARANTINE_COLUMNS = [*REJECT_COLUMNS, "row", "links"]  # row: in the clean table / the store; links: ';'-joined paths
_NAMED = 3  # linked images named per split in a quarantine detail
_LINKS = 20  # linked paths listed per quarantined image


# ----------------------------------------------------------------------------------------------- units
def split_units(groups: pd.Series, dup_groups: pd.Series) -> pd.Series:
    """Unit id per row: patients joined through shared near-duplicate groups (connected components).

    Nodes are the distinct patients and the distinct near-duplicate groups (two separate id spaces); each
    row is an edge between its patient and its near-duplicate group. The id of a unit is its smallest member
    group id, so it is the same for any row order. Both series must be set on every row (no NaN).
    """
    if groups.isna().any() or dup_groups.isna().any():
        raise ValueError("split_units: every row needs a group and a dup_group id")
    group_codes, group_ids = pd.factorize(groups)
    dup_codes, dup_ids = pd.factorize(dup_groups)
    n_groups, n_nodes = len(group_ids), len(group_ids) + len(dup_ids)
    edges = coo_array((np.ones(len(groups), dtype=np.int8), (group_codes, n_groups + dup_codes)),
                      shape=(n_nodes, n_nodes))
    _, component = connected_components(edges, directed=False)
    smallest = pd.Series(group_ids, dtype=object).groupby(component[:n_groups]).min()
    unit_of_group = smallest.to_numpy()[component[:n_groups]]
    return pd.Series(unit_of_group[group_codes], index=groups.index, name="split_group", dtype=object)


# ------------------------------------------------------------------------------------------ checking
def _check_input(df: pd.DataFrame, what: str = "clean manifest") -> pd.DataFrame:
    """The columns the split works on present (:data:`SPLIT_READS`), ids and labels set; returns a copy with
    string ids."""
    missing = [c for c in SPLIT_READS if c not in df.columns]
    if missing:
        raise StepError(f"{what} lacks columns {missing} (expected {CLEAN_COLUMNS})")
    if df.empty:
        raise StepError(f"{what} has no rows: nothing to split")
    for col in _ID_COLUMNS:
        nulls = df[col].isna()
        if nulls.any():
            raise StepError(f"{what}: {int(nulls.sum())} rows have no {col!r}, e.g. "
                            f"{df.loc[nulls, 'path'].head(5).tolist()}")
    bad = ~df["label"].isin(LABELS)
    if bad.any():
        raise StepError(f"{what}: label must be 0 or 1; {int(bad.sum())} rows are not, e.g. "
                        f"{df.loc[bad, 'path'].head(5).tolist()}")
    dup_paths = df["path"].duplicated(keep=False)
    if dup_paths.any():
        raise StepError(f"{what}: paths listed twice: {sorted(set(df.loc[dup_paths, 'path']))[:5]}")
    out = df.reset_index(drop=True)  # new columns only below: no copy of the table (copy-on-write)
    if "row" not in out.columns:  # set by the split step when it leaves out rows resize could not decode
        out["row"] = np.arange(len(out), dtype=np.int64)  # position in the clean table: the image's row in the store
    out["label"] = out["label"].astype(int)
    for col in ("group", "dup_group"):
        out[col] = out[col].astype(str)
    return out


# ------------------------------------------------------------------------------------------- greedy
def _unit_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per unit (index: split_group): n0, n1 (images per label), n and is_test (any source test)."""
    counts = pd.crosstab(df["split_group"], df["label"]).reindex(columns=list(LABELS), fill_value=0)
    table = pd.DataFrame({"n0": counts[0], "n1": counts[1]})
    table["n"] = table["n0"] + table["n1"]
    table["is_test"] = (df["source_split"] == "test").groupby(df["split_group"]).any()
    return table.sort_index()


def _placement_order(units: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Sorted by id, seeded shuffle, then stable sort by size (largest first)."""
    ordered = units.sort_index()
    shuffled = ordered.iloc[np.random.default_rng(seed).permutation(len(ordered))]
    return shuffled.sort_values("n", ascending=False, kind="stable")


def _greedy(units: pd.DataFrame, splits: tuple[str, ...], targets: np.ndarray,
            counts: np.ndarray) -> dict[str, str]:
    """Place each unit (in the given order) where it most reduces sum((count - target)^2 / target).

    ``targets`` and ``counts`` are (len(splits), 2) arrays of images per (split, label); counts is updated.
    """
    safe = np.where(targets > 0, targets, 1.0)
    weight = np.where(targets > 0, 1.0, 0.0) / safe
    out: dict[str, str] = {}
    for unit, n0, n1 in zip(units.index, units["n0"], units["n1"], strict=True):
        u = np.array([n0, n1], dtype=float)
        # change of the cost when adding u to each split: sum_l u_l (u_l - 2 (target - count)) / target
        delta = (u * (u - 2.0 * (targets - counts)) * weight).sum(axis=1)
        best = int(np.argmin(delta))
        counts[best] += u
        out[str(unit)] = splits[best]
    return out


def _label_totals(units: pd.DataFrame) -> np.ndarray:
    return np.array([units["n0"].sum(), units["n1"].sum()], dtype=float)


def _counts_of(units: pd.DataFrame, assigned: Mapping[str, str], splits: tuple[str, ...]) -> np.ndarray:
    """Images per (split, label) of the units already assigned."""
    where = pd.Series(assigned, dtype=object).reindex(units.index)
    return np.array([units.loc[where == s, ["n0", "n1"]].sum().to_numpy(dtype=float) for s in splits])


def _place(units: pd.DataFrame, fixed: Mapping[str, str], cfg: SplitConfig, keep_test: bool) -> dict[str, str]:
    """Split per unit: ``fixed`` units keep theirs; the rest follow the rule in the module docstring."""
    assigned = dict(fixed)
    free = units.loc[[u for u in units.index if u not in assigned]]
    if keep_test:
        assigned.update({str(u): "test" for u in free.index[free["is_test"]]})
        free = free.loc[~free["is_test"]]
        splits: tuple[str, ...] = ("train", "val")
        rest = units.loc[[u for u in units.index if assigned.get(u) != "test"]]
        ratios = np.array([cfg.train, cfg.val]) / (cfg.train + cfg.val)
        totals = _label_totals(rest)
    else:
        splits = SPLITS
        ratios = np.array([cfg.train, cfg.val, cfg.test])
        totals = _label_totals(units)
    targets = ratios[:, None] * totals[None, :]
    counts = _counts_of(units, assigned, splits)
    assigned.update(_greedy(_placement_order(free, cfg.seed), splits, targets, counts))
    return assigned


def _warn_pulled_into_test(df: pd.DataFrame, assigned: Mapping[str, str]) -> None:
    in_test = df["split_group"].map(assigned) == "test"
    pulled = in_test & (df["source_split"] != "test")
    if pulled.any():
        log.warning("keep_source_test: %d rows outside the source test set go to test because they share a "
                    "patient or near-duplicate group with source test rows, e.g. %s",
                    int(pulled.sum()), df.loc[pulled, "path"].head(5).tolist())


def source_test_summary(result: pd.DataFrame, cfg: SplitConfig) -> dict[str, Any]:
    """What split.json says about the source's own test split: kept or not, its images, and the images of
    other source splits that joined test because they share a patient (or near-duplicate group) with it."""
    has = bool((result["source_split"] == "test").any())
    kept = cfg.keeps_source_test(has)
    pulled = (result["split"] == "test") & (result["source_split"] != "test")
    return {"kept": kept, "source_test_images": int((result["source_split"] == "test").sum()),
            "moved_into_test": int(pulled.sum()) if kept else 0,
            "how": ("the source's own test split, whole patients moved in with it" if kept else
                    "carved by split.test (the source has no test folder)" if not has else
                    "carved by split.test (split.keep_source_test: false ignores the source's test folder)")}


def _keeps_test(clean: pd.DataFrame, cfg: SplitConfig) -> bool:
    has = bool((clean["source_split"] == "test").any())
    if cfg.keep_source_test is True and not has:
        _require_source_test(clean)
    return cfg.keeps_source_test(has)


def _finish(df: pd.DataFrame, assigned: Mapping[str, str]) -> pd.DataFrame:
    out = df.assign(split=df["split_group"].map(assigned))
    return out.loc[:, [c for c in SPLIT_COLUMNS if c in out.columns]].reset_index(drop=True)


def _require_source_test(df: pd.DataFrame) -> None:
    if not (df["source_split"] == "test").any():
        raise StepError("split.keep_source_test is true, but no row has source_split 'test' (the source has "
                        "no test folder); set split.keep_source_test: auto or false in params.yaml")


# --------------------------------------------------------------------------------------------- public
def assign_splits(df: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Split a clean manifest: returns its rows, in the same order, with ``row``, ``split_group``, ``split``
    (columns in SPLIT_COLUMNS order; of :data:`CARRIED_COLUMNS`, those ``df`` has).

    ``row`` is the position in ``df`` (the row of the image in the image store), or ``df``'s own ``row`` column
    when it has one (the clean table less some rows: the others keep their position). Deterministic for one seed and
    one set of rows, whatever their order. Raises StepError for missing columns, ids or labels, and for
    ``keep_source_test`` without any source test row.
    """
    clean = _check_input(df)
    clean["split_group"] = split_units(clean["group"], clean["dup_group"])
    keep_test = _keeps_test(clean, cfg)
    assigned = _place(_unit_table(clean), {}, cfg, keep_test)
    if keep_test:
        _warn_pulled_into_test(clean, assigned)
    return _finish(clean, assigned)


def _previous_split_of(previous: pd.DataFrame, col: str) -> dict[str, str]:
    """id -> split of an earlier split manifest; an id in two splits there is an error (the first such id in
    sorted order is named)."""
    pairs = pd.DataFrame({"id": previous[col].astype(str).to_numpy(),
                          "split": previous["split"].astype(str).to_numpy()}).drop_duplicates()
    spread = pairs[pairs["id"].duplicated(keep=False)]
    if not spread.empty:
        first = min(spread["id"])
        raise StepError(f"previous split puts {col} {first!r} in several splits "
                        f"{sorted(spread.loc[spread['id'] == first, 'split'])}: it is not a grouped split")
    return dict(zip(pairs["id"], pairs["split"], strict=True))


def _old_splits(clean: pd.DataFrame, previous: pd.DataFrame) -> pd.Series:
    """Per unit seen before, the set of splits its patients and near-duplicate groups had in ``previous``."""
    units = clean["split_group"].to_numpy()
    by_group = clean["group"].map(_previous_split_of(previous, "group")).to_numpy()
    by_dup = clean["dup_group"].map(_previous_split_of(previous, "dup_group")).to_numpy()
    pairs = pd.DataFrame({"unit": np.concatenate([units, units]),
                          "split": np.concatenate([by_group, by_dup])}).dropna().drop_duplicates()
    seen: dict[str, set[str]] = {}  # one pass over the distinct pairs (a groupby would call Python per unit)
    for unit, split in zip(pairs["unit"], pairs["split"], strict=True):
        seen.setdefault(unit, set()).add(split)
    old = pd.Series({u: frozenset(s) for u, s in seen.items()}, dtype=object, name="split")
    return old.rename_axis("unit").sort_index()


class Extension(NamedTuple):
    """What :func:`extend_split` returns: the split manifest and the new images it quarantined."""

    split: pd.DataFrame  # SPLIT_COLUMNS, clean-table order, quarantined rows left out (``row`` still indexes the store)
    quarantined: pd.DataFrame  # QUARANTINE_COLUMNS, reason links_splits, clean-table order


def extend_split(previous: pd.DataFrame, df: pd.DataFrame, cfg: SplitConfig) -> Extension:
    """Split ``df`` keeping the assignments of ``previous`` (an earlier split manifest).

    A unit of ``df`` that holds a patient or near-duplicate group of ``previous`` keeps that split; new
    units are placed by the rule of :func:`assign_splits`, filling what the kept units left of each
    target. A unit that joins old units of different splits (e.g. a new image near-duplicating images of
    a train and a test patient) cannot be placed without moving one: its new images are quarantined
    (:data:`LINKS_SPLITS`) and its old images keep their split and previous ids (module docstring).
    """
    _check_previous(previous)
    clean = _check_input(df)
    clean["split_group"] = split_units(clean["group"], clean["dup_group"])
    old = _old_splits(clean, previous)
    linking = [str(u) for u in old.index[old.map(len) > 1]]  # units whose ids had more than one split before
    is_new = ~clean["path"].isin(previous["path"])
    quarantine = clean["split_group"].isin(linking) & is_new
    quarantined = _quarantine_table(clean, quarantine, previous)
    restore = clean["split_group"].isin(linking) & ~is_new
    kept = clean  # units (and their old splits) recomputed only where images left or took their previous ids back
    if quarantine.any() or restore.any():
        kept = _with_previous_ids(clean.loc[~quarantine], previous, restore)
        old = _old_splits(kept, previous)
    _raise_on_merged(kept, old)  # cannot happen once the linking images are out; a leak is never written
    fixed = {str(u): next(iter(s)) for u, s in old.items()}
    assigned = _place(_unit_table(kept), fixed, cfg, _keeps_test(kept, cfg))
    log.info("extend_split: %d units kept from the previous split, %d new, %d new images quarantined (%s)",
             len(fixed), len(assigned) - len(fixed), len(quarantined), LINKS_SPLITS)
    result = _finish(kept, assigned)
    check_none_moved(previous, result)
    return Extension(result, quarantined)


def _check_previous(previous: pd.DataFrame) -> None:
    missing = [c for c in PREVIOUS_COLUMNS if c not in previous.columns]
    if missing:
        raise StepError(f"previous split manifest lacks columns {missing}")
    bad = ~previous["split"].isin(SPLITS)
    if bad.any():
        raise StepError(f"previous split manifest has splits outside {list(SPLITS)}: "
                        f"{sorted(set(map(str, previous.loc[bad, 'split'])))[:5]}")


def _with_previous_ids(kept: pd.DataFrame, previous: pd.DataFrame, restore: pd.Series) -> pd.DataFrame:
    """``kept`` with the previous ``group`` and ``dup_group`` on the ``restore`` rows (old images of a linking
    unit: their new ids were joined through the quarantined images) and its units recomputed."""
    out = kept.copy(deep=False)  # the columns changed below are replaced, not written into
    rows = restore.reindex(out.index, fill_value=False).to_numpy(dtype=bool)
    if rows.any():
        before = previous.drop_duplicates("path").set_index("path")
        for col in ("group", "dup_group"):
            out[col] = out[col].where(~rows, out["path"].map(before[col].astype(str)))
        log.warning("extend_split: %d images already assigned keep the patient and near-duplicate ids of the "
                    "previous split: new images would have joined them across splits", int(rows.sum()))
    out["split_group"] = split_units(out["group"], out["dup_group"])
    return out


def _quarantine_table(clean: pd.DataFrame, quarantine: pd.Series, previous: pd.DataFrame) -> pd.DataFrame:
    """One QUARANTINE_COLUMNS row per quarantined image: reason links_splits, a detail naming the images of
    each previous split it would join (``links`` lists them, ';'-joined)."""
    rows = clean.loc[quarantine]
    detail: dict[str, str] = {}
    links: dict[str, str] = {}
    if len(rows):  # else no index of the previous split's paths is made
        before = previous.drop_duplicates("path").set_index("path")["split"]
        old = clean.loc[clean["split_group"].isin(set(rows["split_group"])) & clean["path"].isin(before.index)]
        for unit, part in old.assign(split=old["path"].map(before)).groupby("split_group"):
            named = "; ".join(f"{s}: {_names(p['path'])}" for s, p in part.groupby("split", sort=True))
            detail[str(unit)] = (f"would join images of different splits ({named}) through a shared patient or "
                                 "near-duplicate group; left out of every split so no assigned image moves "
                                 "(re-split from scratch to place it)")
            links[str(unit)] = ";".join(part["path"].astype(str).head(_LINKS))
    out = pd.DataFrame({"path": rows["path"], "reason": LINKS_SPLITS,
                        "detail": rows["split_group"].map(detail), "sha256": rows["sha256"],
                        "bytes": rows["bytes"], "row": rows["row"], "links": rows["split_group"].map(links)})
    return out.loc[:, QUARANTINE_COLUMNS].reset_index(drop=True)


def _names(paths: pd.Series) -> str:
    """Up to _NAMED file paths and how many more."""
    shown = ", ".join(paths.astype(str).head(_NAMED))
    return shown + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")


def _raise_on_merged(clean: pd.DataFrame, old: pd.Series) -> None:
    merged = old[old.map(len) > 1]
    if merged.empty:
        return
    unit = merged.index[0]
    members = sorted(set(clean.loc[clean["split_group"] == unit, "group"]))
    raise StepError(f"{len(merged)} units join patients of different previous splits, e.g. patients "
                    f"{members[:10]} (previously in {sorted(merged.iloc[0])}), even with the new images that "
                    "linked them quarantined: the previous split is not a grouped split")


def read_quarantine(*files: Path | None) -> pd.DataFrame | None:
    """Every quarantined file of the pipeline: the filter's rejects.csv and the split's split_rejects.csv
    (``path``, ``reason``, ``detail``, ... and ``links``, '' where none), in that order. Absent files (or None)
    are skipped; None when none exists. What the Prefect artifact and the report list."""
    frames = [read_csv(f) for f in files if f is not None and Path(f).is_file()]
    if not frames:
        return None
    out = pd.concat(frames, ignore_index=True)
    out["links"] = out["links"].fillna("").astype(str) if "links" in out.columns else ""
    return out


def quarantine_summary(quarantined: pd.DataFrame, rejects: str) -> dict[str, Any]:
    """split.json's ``quarantined`` block: images per reason, the file that lists them, a few examples."""
    return {"images": len(quarantined),
            "by_reason": {str(k): int(v) for k, v in quarantined["reason"].value_counts().sort_index().items()},
            "file": rejects, "examples": quarantined["path"].astype(str).head(5).tolist()}


def split_summary(split: pd.DataFrame) -> dict[str, Any]:
    """Images per split and label, patients and units per split."""
    per: dict[str, Any] = {}
    for name in SPLITS:
        part = split.loc[split["split"] == name]
        per[name] = {"images": len(part),
                     **{f"label_{lab}": int((part["label"] == lab).sum()) for lab in LABELS},
                     "patients": int(part["group"].nunique()),
                     "units": int(part["split_group"].nunique())}
    return {"images": len(split), "patients": int(split["group"].nunique()),
            "units": int(split["split_group"].nunique()), "splits": per}


def check_none_moved(previous: pd.DataFrame, result: pd.DataFrame) -> None:
    """StepError naming the images that an extended split moved to another split.

    :func:`extend_split` places only new units, so none should move; it checks its result anyway, because
    a moved image is a leak: an image the champion was tested on could land in the challenger's training set.
    """
    both = result[["path", "split"]].merge(previous[["path", "split"]], on="path", suffixes=("", "_old"))
    moved = both[both["split"] != both["split_old"]]
    if not moved.empty:
        examples = [f"{r.path} ({r.split_old} -> {r.split})" for r in moved.head(3).itertuples()]
        raise StepError(f"extending the previous split would move {len(moved)} images: {examples}")

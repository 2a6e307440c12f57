"""Grouped k-fold cross-validation of a dataset's training recipe (the ``crossval`` stage, ``crossval.folds``).

A small dataset's test split holds too few patients for a verdict: COVID-CT's 31 test images come from 11
cases, and the CI of their AUC spans 0.25-0.93. Cross-validation scores every image once, by a model that
never saw its patient:

- the split units (``split_group``: patients joined through near-duplicate groups, what the split keeps
  together) are dealt into ``k`` folds, stratified by class (scikit-learn's ``StratifiedGroupKFold``, seeded);
- model ``i`` tests on fold ``i``, selects on fold ``i + 1`` (val: the kept epoch, early stopping and the
  operating threshold, as the train and evaluate stages do) and trains on the other ``k - 2`` folds, with the
  dataset's own train params;
- the ``k`` models' out-of-fold probabilities are pooled: ROC AUC, PR AUC and the rest with bootstrap CIs
  (``evaluate.bootstrap_by``: whole patients where it says so), sensitivity and specificity at each fold's
  own val-chosen threshold, and each fold's AUC beside them (pooled scores mix k models' scales; the mean of
  the folds' AUCs does not).

The verdict: the recipe beats chance when the pooled AUC's CI excludes 0.5. This estimates the recipe (the
params), not the one model the train stage ships (trained on the split's train part, scored on its test split
by the evaluate stage): the test split's images are dealt into folds like every other, and nothing here feeds
training, selection or thresholds of the shipped model. A finished fold's scores are kept in the cache folder
under a fingerprint of the data and params, and a killed fold resumes from its checkpoints, so a re-run after a
crash trains only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medflow.config import Config
from medflow.errors import StepError
from medflow.evaluation import metrics
from medflow.evaluation.pseudonym import pseudonymizer
from medflow.io import ImageStore, atomic_open, open_images, read_csv, read_json, write_csv, write_json

if TYPE_CHECKING:  # training imports Keras: only a run with folds needs it
    from medflow.training.distribute import Placement
    from medflow.training.inputs import SplitData

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "crossval.md"
FOLD_SCORES = "scores.json"  # <cache>/fold-<i>/: a finished fold's scores, under its fingerprint
PREDICTION_COLUMNS = ["path", "group", "fold", "label", "probability", "threshold", "predicted"]


def assign_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold ``0..k-1`` of each image: a group's images share one fold, and each fold holds about ``1/k`` of
    each class's groups (``StratifiedGroupKFold``, shuffled with ``seed``).

    Raises :class:`StepError` naming ``crossval.folds`` when a class has fewer groups than folds (some fold
    would have no image of it to test or select on).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups).astype(str)
    for cls in (0, 1):
        n = len(np.unique(groups[labels == cls]))
        if n < k:
            raise StepError(f"crossval.folds: {k} folds need at least {k} patients/groups of label {cls}; the split "
                            f"table has {n} (lower crossval.folds, or set it to 0)")
    fold = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold[test] = i
    return fold


def fold_roles(fold: np.ndarray, k: int, i: int) -> dict[str, np.ndarray]:
    """Masks of model ``i``'s splits: test = fold ``i``, val = fold ``i + 1`` (mod ``k``), train = the rest."""
    test, val = fold == i, fold == (i + 1) % k
    return {"train": ~(test | val), "val": val, "test": test}


@dataclass(frozen=True)
class Table:
    """The split table's columns cross-validation reads, in table order."""

    path: np.ndarray
    label: np.ndarray  # int8 0/1
    row: np.ndarray  # int64, in the image store
    group: np.ndarray  # split_group: the unit the split keeps together

    @classmethod
    def read(cls, split: Path) -> Table:
        try:
            df = read_csv(split)
        except FileNotFoundError:
            raise StepError(f"{split}: split table not found (run the split step first)") from None
        missing = {"path", "label", "row", "split_group"} - set(df.columns)
        if missing:
            raise StepError(f"{split}: missing columns {sorted(missing)}")
        return cls(df["path"].to_numpy(dtype=str), df["label"].to_numpy(dtype=np.int8),
                   df["row"].to_numpy(dtype=np.int64), df["split_group"].to_numpy(dtype=str))


def fold_fingerprint(base: str, cfg: Config, i: int) -> str:
    """A fold's identity: the training run's (data, train params, flip rule), the folds and this fold's number."""
    key = json.dumps({"run": base, "crossval": cfg.crossval.model_dump(), "threshold": _threshold_params(cfg),
                      "fold": i}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _threshold_params(cfg: Config) -> dict[str, Any]:
    ev = cfg.evaluate
    return {"rule": ev.threshold_rule, "target_sensitivity": ev.target_sensitivity, "fixed": ev.fixed_threshold}


def _fold_data(store: ImageStore, table: Table, roles: dict[str, np.ndarray]) -> SplitData:
    from medflow.training.inputs import SplitData

    return SplitData(images=store, rows={s: table.row[m] for s, m in roles.items()},
                     labels={s: table.label[m].astype(np.float32) for s, m in roles.items()})


def _train_fold(cfg: Config, store: ImageStore, table: Table, fold: np.ndarray, i: int, fingerprint: str,
                folder: Path, placement: Placement) -> dict[str, Any]:
    """Train model ``i`` (resuming from ``folder/checkpoints``), score its val and test folds; its record."""
    from medflow.evaluation.assess import predict_array
    from medflow.training import fit

    k = cfg.crossval.folds
    roles, val_fold = fold_roles(fold, k, i), (i + 1) % k + 1
    for name, mask in roles.items():
        if len(np.unique(table.label[mask])) < 2:
            raise StepError(f"crossval.folds: fold {i + 1}'s {name} part has images of one class only; lower "
                            "crossval.folds")
    log.info("crossval: fold %d of %d: train %d, val %d (fold %d), test %d", i + 1, k, int(roles["train"].sum()),
             int(roles["val"].sum()), val_fold, int(roles["test"].sum()))
    data = _fold_data(store, table, roles)
    result = fit.train_model(cfg, data, placement=placement, fingerprint=fingerprint,
                             checkpoints=folder / "checkpoints", live_dir=folder / "live")
    ev = cfg.evaluate
    p_val = predict_array(result.model, store, data.rows["val"], ev.batch_size)
    p_test = predict_array(result.model, store, data.rows["test"], ev.batch_size)
    y_val, y_test = table.label[roles["val"]], table.label[roles["test"]]
    threshold = metrics.select_threshold(y_val, p_val, ev.threshold_rule, target_sensitivity=ev.target_sensitivity,
                                         fixed=ev.fixed_threshold)
    record = {"fingerprint": fingerprint, "fold": i + 1, "val_fold": val_fold,
              "n": {s: int(m.sum()) for s, m in roles.items()},
              "best_epoch": result.state.best_epoch + 1, "epochs_run": result.state.epoch + 1,
              "train_seconds": round(result.seconds, 1), "threshold": threshold,
              "val_auc": metrics.point_metrics(y_val, p_val, threshold)["roc_auc"],
              "test_auc": metrics.point_metrics(y_test, p_test, threshold)["roc_auc"],
              "test_index": np.flatnonzero(roles["test"]).tolist(), "test_probability": p_test.tolist()}
    return record


def _cached(folder: Path, fingerprint: str, n: int) -> dict[str, Any] | None:
    path = folder / FOLD_SCORES
    try:
        record = read_json(path)
    except (OSError, ValueError, StepError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    index = record.get("test_index")
    if not isinstance(index, list) or not all(isinstance(j, int) and 0 <= j < n for j in index):
        return None
    return record


def write_off(out: Path, cache: Path) -> dict[str, Any]:
    """crossval.folds 0: small outputs that say so (DVC needs every output), no stale folds left behind."""
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    headline: dict[str, Any] = {"folds": 0, "run": False}
    write_json(out / METRICS_FILE, headline)
    write_csv(out / PREDICTIONS_FILE, pd.DataFrame(columns=PREDICTION_COLUMNS))
    with atomic_open(out / SUMMARY_FILE, encoding="utf-8") as f:
        f.write("# Cross-validation\n\nNot run: `crossval.folds` is 0 for this dataset.\n")
    return headline


def run(cfg: Config, *, images: Path, split: Path, out: Path, cache: Path) -> dict[str, Any]:
    """Cross-validate the dataset's train params on the split table's images; write ``out``; the headline."""
    out, cache = Path(out), Path(cache)
    k = cfg.crossval.folds
    if k == 0:
        log.info("crossval: off (crossval.folds is 0)")
        return write_off(out, cache)
    from medflow.training import fit
    from medflow.training.distribute import place

    placement = place(cfg.train.strategy)  # first: as the train step, before other TensorFlow work
    table = Table.read(Path(split))
    store = open_images(images)
    fold = assign_folds(table.label, table.group, k, cfg.crossval.seed)
    base = fit.run_fingerprint(cfg, Path(images), Path(split))
    records = []
    for i in range(k):
        folder = cache / f"fold-{i + 1}"
        fingerprint = fold_fingerprint(base, cfg, i)
        record = _cached(folder, fingerprint, len(table.label))
        if record is None:
            record = _train_fold(cfg, store, table, fold, i, fingerprint, folder, placement)
            if placement.is_chief:
                write_json(folder / FOLD_SCORES, record)
                fit.clear_checkpoints(folder / "checkpoints")
        else:
            log.info("crossval: fold %d of %d: kept from %s (same data and params)", i + 1, k, folder / FOLD_SCORES)
        log.info("crossval: fold %d: test AUC %.3f, val AUC %.3f, epoch %d of %d kept", i + 1, record["test_auc"],
                 record["val_auc"], record["best_epoch"], record["epochs_run"])
        records.append(record)
    kept = {f"fold-{i + 1}" for i in range(k)}
    for stale in (p for p in cache.glob("fold-*") if p.name not in kept):
        shutil.rmtree(stale)
    if not placement.is_chief:
        return {}
    return write_results(cfg, table, records, out)


def pooled(table: Table, records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per image of the table: its fold, label, out-of-fold probability and its fold's threshold."""
    fold = np.zeros(len(table.label), dtype=np.int64)
    p = np.full(len(table.label), np.nan)
    threshold = np.full(len(table.label), np.nan)
    for r in records:
        index = np.asarray(r["test_index"], dtype=np.int64)
        fold[index], p[index], threshold[index] = r["fold"], r["test_probability"], r["threshold"]
    if np.isnan(p).any():
        raise StepError(f"crossval: {int(np.isnan(p).sum())} images were scored by no fold (the folds' records do not "
                        "cover the split table)")
    columns = {"path": table.path, "group": table.group, "fold": fold, "label": table.label, "probability": p,
               "threshold": threshold, "predicted": (p >= threshold).astype(np.int8)}
    return pd.DataFrame({c: columns[c] for c in PREDICTION_COLUMNS})


def write_results(cfg: Config, table: Table, records: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The pooled out-of-fold figures: ``metrics.json``, ``predictions.csv`` and ``crossval.md`` in ``out``."""
    ev = cfg.evaluate
    df = pooled(table, records)
    y, p = df["label"].to_numpy(), df["probability"].to_numpy()
    groups = df["group"].to_numpy() if ev.bootstrap_by == "patient" else None
    ranked = metrics.bootstrap(y, p, 0.5, n=ev.bootstrap, seed=ev.seed, confidence=ev.confidence,
                               bins=ev.calibration_bins, groups=groups)
    # each image's decision at its own fold's threshold, bootstrapped as a 0/1 score: its sensitivity and
    # specificity intervals (a single cut at 0.5 of the decisions)
    decided = metrics.bootstrap(y, df["predicted"].to_numpy(dtype=np.float64), 0.5, n=ev.bootstrap, seed=ev.seed,
                                confidence=ev.confidence, bins=ev.calibration_bins, groups=groups)
    fold_aucs = np.array([r["test_auc"] for r in records], dtype=np.float64)
    auc = ranked["roc_auc"]
    at_chance = not (math.isfinite(auc.low) and auc.low > 0.5)
    headline = {
        "folds": cfg.crossval.folds, "run": True, "images": len(y), "positives": int(y.sum()),
        "groups": int(len(np.unique(table.group))), "bootstrap_by": ev.bootstrap_by, "confidence": ev.confidence,
        "roc_auc": auc.as_dict(), "pr_auc": ranked["pr_auc"].as_dict(),
        "sensitivity": decided["sensitivity"].as_dict(), "specificity": decided["specificity"].as_dict(),
        "fold_auc_mean": float(np.mean(fold_aucs)), "fold_auc_sd": float(np.std(fold_aucs, ddof=1)),
        "at_chance": at_chance,
        "per_fold": [{k: r[k] for k in ("fold", "val_fold", "n", "best_epoch", "epochs_run", "train_seconds",
                                        "threshold", "val_auc", "test_auc")} for r in records],
    }
    out.mkdir(parents=True, exist_ok=True)
    pz = pseudonymizer(ev.pseudonymize, Path.cwd())
    shown = df.assign(path=[pz.path(v) for v in df["path"]], group=[pz.patient(v) for v in df["group"]])
    write_csv(out / PREDICTIONS_FILE, shown)
    write_json(out / METRICS_FILE, headline)
    with atomic_open(out / SUMMARY_FILE, encoding="utf-8") as f:
        f.write(summary_markdown(cfg, headline))
    (log.warning if at_chance else log.info)("crossval: %s", verdict_line(headline))
    return headline


def verdict_line(h: dict[str, Any]) -> str:
    """One line: does the recipe beat chance out of fold, with the pooled AUC and its CI."""
    auc = h["roc_auc"]
    level = metrics.ci_level(h["confidence"])
    facts = (f"pooled out-of-fold ROC AUC {_f(auc['value'])} ({level} CI {_f(auc['low'])}-{_f(auc['high'])}, "
             f"{h['images']} images, {h['groups']} groups, resampled by {h['bootstrap_by']}); mean of the "
             f"{h['folds']} folds' AUCs {_f(h['fold_auc_mean'])} (sd {_f(h['fold_auc_sd'])})")
    if h["at_chance"]:
        return f"AT CHANCE: the recipe does not beat chance out of fold (the CI reaches 0.5): {facts}"
    return f"the recipe beats chance out of fold: {facts}"


def _f(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _interval(d: dict[str, Any]) -> str:
    return f"{_f(d['value'])} ({_f(d['low'])}-{_f(d['high'])})"


def summary_markdown(cfg: Config, h: dict[str, Any]) -> str:
    """crossval.md: the verdict, the pooled figures and one row per fold."""
    level = metrics.ci_level(h["confidence"])
    lines = [
        f"# Cross-validation: {cfg.dataset.name}", "",
        f"**{verdict_line(h)}**", "",
        f"{h['folds']} folds of whole patients/groups (`split_group`), stratified by class (seed "
        f"{cfg.crossval.seed}). Model i tests on fold i, selects on fold i + 1 (kept epoch, early stopping, the "
        f"threshold: `evaluate.threshold_rule` {cfg.evaluate.threshold_rule}) and trains on the rest, with this "
        f"dataset's train params ({cfg.train.model}, {cfg.train.epochs} epochs at most, selecting on "
        f"{cfg.train.select_on}). This scores the recipe, not the model the train stage ships.", "",
        f"| pooled out of fold ({level} CI, resampled by {h['bootstrap_by']}) | value |", "|---|---|",
        f"| ROC AUC | {_interval(h['roc_auc'])} |", f"| PR AUC | {_interval(h['pr_auc'])} |",
        f"| sensitivity at each fold's val threshold | {_interval(h['sensitivity'])} |",
        f"| specificity at each fold's val threshold | {_interval(h['specificity'])} |",
        f"| mean of the folds' ROC AUCs (sd) | {_f(h['fold_auc_mean'])} ({_f(h['fold_auc_sd'])}) |", "",
        "| fold | train / val / test | val fold | kept epoch / run | threshold | val AUC | test AUC | training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['fold']} | {r['n']['train']} / {r['n']['val']} / {r['n']['test']} | {r['val_fold']} | "
              f"{r['best_epoch']} / {r['epochs_run']} | {r['threshold']:.4f} | {_f(r['val_auc'])} | "
              f"{_f(r['test_auc'])} | {r['train_seconds']:.0f} s |" for r in h["per_fold"]]
    return "\n".join(lines) + "\n"

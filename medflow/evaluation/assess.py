"""Scoring a trained model: a split of the pipeline's dataset, an external labelled folder; the threshold.

- :func:`load_trained` / :func:`score_split`: the model folder the train step wrote, and its probabilities on
  one split of the image store (also used by the predict command and the champion/challenger flow);
- :func:`choose_threshold`: the operating threshold, chosen on val scores (``evaluate.threshold_rule``);
- :func:`check_chance`: whether the model beats always predicting the training prevalence on val (stored
  with the threshold, shown at the top of the report; :mod:`medflow.evaluation.chance`);
- :func:`assess`: every metric of :mod:`medflow.evaluation.metrics` with a stratified bootstrap CI, the
  confusion matrix, ROC / PR / reliability / threshold curves and Grad-CAM overlays of the most confident
  true and false positives and negatives, as one :class:`~medflow.evaluation.results.Evaluation`;
- :func:`evaluate_folder` (``medflow evaluate --images DIR``): the same for an external labelled folder at
  the model's stored threshold, report included.

The evaluate step (``tasks/evaluate.py``) is the only place the test split is scored. Images of a folder
are preprocessed by the resize step's own decoder (:func:`medflow.imaging.decode.decode_image`), exactly as
for training, within the pipeline's limits on inputs (:mod:`medflow.imaging.limits`).
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from medflow.config import Config, EvaluateConfig
from medflow.data.manifest import class_of, file_groups, iter_images
from medflow.errors import StepError
from medflow.evaluation import chance, gradcam, metrics, report
from medflow.evaluation.chance import ChanceVerdict
from medflow.evaluation.results import Evaluation, Scores
from medflow.imaging.limits import Decoder, InputLimits, file_item
from medflow.io import ImageStore, n_workers, open_images, read_csv, read_json
from medflow.patients import project_salt
from medflow.schema import SPLITS
from medflow.training.models import allow_jit, custom_objects

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
THRESHOLD_FILE = "threshold.json"
HISTORY_FILE = "history.csv"
OUTCOMES = ("TP", "FP", "TN", "FN")


# --- the model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A model folder written by the train step: the Keras model and its metadata."""

    folder: Path
    model: keras.Model
    metadata: dict[str, Any]

    @property
    def size(self) -> int:
        return int(self.metadata["preprocessing"]["size"])

    @property
    def channels(self) -> int:
        return int(self.metadata["preprocessing"]["channels"])

    @property
    def threshold(self) -> dict[str, Any]:
        """The stored operating threshold (``threshold.json``), written by the evaluate stage."""
        return read_threshold(self.folder)

    @property
    def history(self) -> pd.DataFrame:
        """The per-epoch training history (``history.csv``); empty when the folder has none."""
        path = self.folder / HISTORY_FILE
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def load_trained(folder: Path | str) -> TrainedModel:
    """Load ``folder/model.keras`` and ``folder/metadata.json``; StepError naming what is missing."""
    folder = Path(folder)
    for name in (MODEL_FILE, METADATA_FILE):
        if not (folder / name).is_file():
            raise StepError(f"{folder / name}: not found (train a model first: dvc repro train)")
    if not zipfile.is_zipfile(folder / MODEL_FILE):  # Keras would say "File not found" about it
        raise StepError(f"{folder / MODEL_FILE}: damaged: not a complete .keras (zip) file, e.g. cut short "
                        f"({(folder / MODEL_FILE).stat().st_size} bytes); train it again: dvc repro train")
    try:
        model = keras.saving.load_model(folder / MODEL_FILE, custom_objects=custom_objects(), compile=False,
                                         safe_mode=True)  # never run code from a model file (SECURITY.md)
    except Exception as e:  # Keras raises many types for a damaged or foreign file
        raise StepError(f"{folder / MODEL_FILE}: cannot load the model ({type(e).__name__}: {e})") from e
    allow_jit(model, asked=None)  # JAX: compiled, not op by op; other backends: Keras decides, as before
    meta = read_json(folder / METADATA_FILE)
    if "preprocessing" not in meta:
        raise StepError(f"{folder / METADATA_FILE}: no 'preprocessing' entry (not written by medflow train)")
    return TrainedModel(folder, model, meta)


def read_threshold(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / THRESHOLD_FILE
    if not path.is_file():
        raise StepError(f"{path}: no operating threshold yet (run the evaluate stage: dvc repro evaluate), "
                        "or pass --threshold")
    data = read_json(path)
    if not isinstance(data.get("threshold"), int | float) or not 0 <= data["threshold"] <= 1:
        raise StepError(f"{path}: 'threshold' must be a number in [0, 1]")
    return data  # type: ignore[no-any-return]


def predict_array(model: keras.Model, images: ImageStore | np.ndarray, rows: np.ndarray | None = None,
                  batch_size: int = 64) -> np.ndarray:
    """Probabilities for ``images[rows]`` (an image store is read one batch at a time)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        where = images.locations(chunk) if isinstance(images, ImageStore) else chunk
        order = np.argsort(where, kind="stable")  # each shard's rows together, in order
        batch = np.asarray(images[chunk[order]])
        probs = np.asarray(model.predict_on_batch(batch.astype(np.float32))).reshape(-1)
        out[start + order] = probs
    return out


# --- scores ------------------------------------------------------------------------------------------


def _split_frame(split: Path, split_name: str) -> pd.DataFrame:
    if split_name not in SPLITS:
        raise StepError(f"unknown split {split_name!r}; expected one of {', '.join(SPLITS)}")
    try:
        df = read_csv(split)
    except FileNotFoundError:
        raise StepError(f"{split}: split manifest not found (run the split step first)") from None
    missing = {"path", "label", "split", "row", "split_group"} - set(df.columns)
    if missing:
        raise StepError(f"{split}: missing columns {sorted(missing)}")
    part = df[df["split"] == split_name]
    if part.empty:
        raise StepError(f"{split}: no rows in split {split_name!r}")
    return part


def score_split(model_dir: Path | str, images: Path | str, split: Path | str, split_name: str = "test",
                *, trained: TrainedModel | None = None, batch_size: int = 64) -> Scores:
    """Score one split of the pipeline's dataset with the model in ``model_dir``."""
    trained = trained or load_trained(model_dir)
    part = _split_frame(Path(split), split_name)
    array = open_images(images)
    if tuple(array.shape[1:]) != tuple(trained.metadata["input_shape"]):
        raise StepError(f"{images}: images are {array.shape[1:]}, the model in {trained.folder} takes "
                        f"{tuple(trained.metadata['input_shape'])} (re-run resize with the model's params)")
    rows = part["row"].to_numpy(dtype=np.int64)
    p = predict_array(trained.model, array, rows, batch_size)
    return Scores(part["label"].to_numpy(dtype=np.int8), p, part["split_group"].to_numpy(dtype=str),
                  part["path"].to_numpy(dtype=str), rows)


# --- the evaluation ----------------------------------------------------------------------------------


def assess(title: str, dataset: str, source: str, trained: TrainedModel, scores: Scores,
           threshold: dict[str, Any], ev: EvaluateConfig, images: ImageStore | np.ndarray) -> Evaluation:
    """Metrics with CIs, curves and Grad-CAM examples for ``scores`` at ``threshold['threshold']``.

    ``images`` are the model inputs in the order of ``scores`` (a memory map indexed by ``scores.row``, or
    the decoded array itself when ``scores.row`` is empty).
    """
    t = float(threshold["threshold"])
    y, p = metrics.check_inputs(scores.y, scores.p, source)
    groups = scores.patient if ev.bootstrap_by == "patient" else None
    start = time.perf_counter()
    intervals = metrics.bootstrap(y, p, t, n=ev.bootstrap, seed=ev.seed, confidence=ev.confidence,
                                  bins=ev.calibration_bins, groups=groups)
    log.info("evaluate: %d bootstrap resamples (%s level) in %.2f s", ev.bootstrap, ev.bootstrap_by,
             time.perf_counter() - start)
    curves = {
        "roc": pd.DataFrame(metrics.roc_points(y, p)),
        "pr": pd.DataFrame(metrics.pr_points(y, p)),
        "calibration": pd.DataFrame(metrics.calibration_table(y, p, ev.calibration_bins)),
        "thresholds": pd.DataFrame(metrics.threshold_sweep(y, p)),
    }
    return Evaluation(
        title=title, dataset=dataset, source=source, metadata=trained.metadata, threshold=threshold,
        scores=scores, intervals=intervals, confusion=metrics.confusion(y, p, t), curves=curves,
        gradcams=_gradcams(trained.model, scores, t, images, ev.gradcam_examples),
        history=trained.history, settings=ev.model_dump(),
    )


def pick_examples(y: np.ndarray, p: np.ndarray, threshold: float, k: int) -> dict[str, np.ndarray]:
    """Indices of the ``k`` most confident examples of each outcome (TP/FP highest p, TN/FN lowest p)."""
    pred = p >= threshold
    yb = y.astype(bool)
    masks = {"TP": yb & pred, "FP": ~yb & pred, "TN": ~yb & ~pred, "FN": yb & ~pred}
    picked = {}
    for name, mask in masks.items():
        idx = np.flatnonzero(mask)
        order = np.argsort(-p[idx] if name in ("TP", "FP") else p[idx], kind="stable")
        picked[name] = idx[order[:k]]
    return picked


def _gradcams(model: keras.Model, scores: Scores, threshold: float, images: ImageStore | np.ndarray,
              k: int) -> list[dict[str, Any]]:
    if k == 0:
        return []
    picked = pick_examples(scores.y, scores.p, threshold, k)
    chosen = [(name, int(i)) for name in OUTCOMES for i in picked[name]]
    if not chosen:
        return []
    index = np.array([i for _, i in chosen])
    batch = np.asarray(images[scores.row[index]] if len(scores.row) else images[index])
    try:
        cams = gradcam.gradcam(model, batch)
    except StepError as e:
        log.warning("evaluate: no Grad-CAM overlays: %s", e)
        return []
    return [{"outcome": name, "path": str(scores.path[i]), "label": int(scores.y[i]),
             "probability": float(scores.p[i]), "image": gradcam.overlay(batch[j], cams[j])}
            for j, (name, i) in enumerate(chosen)]


def choose_threshold(val: Scores, ev: EvaluateConfig) -> dict[str, Any]:
    """The operating threshold chosen on val, with the val sensitivity and specificity it gives."""
    t = metrics.select_threshold(val.y, val.p, ev.threshold_rule, target_sensitivity=ev.target_sensitivity,
                                 fixed=ev.fixed_threshold)
    at = metrics.point_metrics(val.y, val.p, t)
    how = {"target_sensitivity": f"highest threshold with val sensitivity >= {ev.target_sensitivity:g}",
           "youden": "maximises val sensitivity + specificity - 1 (Youden's J)",
           "fixed": "fixed in params (evaluate.fixed_threshold)"}[ev.threshold_rule]
    return {"threshold": t, "rule": ev.threshold_rule, "chosen_on": "val", "how": how,
            "target_sensitivity": ev.target_sensitivity if ev.threshold_rule == "target_sensitivity" else None,
            "val": {"n": len(val.y), "sensitivity": at["sensitivity"], "specificity": at["specificity"],
                    "roc_auc": at["roc_auc"]}}


def check_chance(trained: TrainedModel, val: Scores, split: Path | str, ev: EvaluateConfig) -> ChanceVerdict:
    """Whether the model beats always predicting the training prevalence on ``val`` (the chance guard of
    :mod:`medflow.evaluation.chance`): the train split's class counts from ``split``, the loss weighted as
    the model was trained (its metadata's ``train.class_weights``), the AUC resampled by ``bootstrap_by``."""
    labels = _split_frame(Path(split), "train")["label"].to_numpy()
    weighted = bool(trained.metadata.get("params", {}).get("train", {}).get("class_weights", False))
    return chance.verdict(val.y, val.p, (int((labels == 0).sum()), int((labels == 1).sum())), weighted=weighted,
                          ev=ev, groups=val.patient if ev.bootstrap_by == "patient" else None)


# --- data facts for the report -----------------------------------------------------------------------


def split_counts(df: pd.DataFrame, labels: Mapping[str, int]) -> pd.DataFrame:
    """Images and patients per split and class."""
    names = {v: k for k, v in labels.items() if v in (0, 1)}
    rows = []
    for s in SPLITS:
        part = df[df["split"] == s]
        row: dict[str, Any] = {"split": s, "images": len(part), "patients": part["group"].nunique()}
        for value in (0, 1):
            sub = part[part["label"] == value]
            cls = "positive" if value == 1 else "negative"
            row[f"{cls} images"] = len(sub)
            row[f"{cls} patients"] = sub["group"].nunique()
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["class_names"] = names
    return out


def validation_summary(result: Mapping[str, Any], path: Path | str) -> dict[str, Any]:
    """The Great Expectations result (the validate step's JSON) as the report shows it."""
    suites = result.get("suites", {})
    n = sum(len(s.get("results", [])) for s in suites.values())
    return {"success": bool(result.get("success")), "expectations": n, "failed": list(result.get("failed", [])),
            "path": str(path), "shortcut": result.get("shortcut")}


# --- an external folder --------------------------------------------------------------------------------


def labelled_files(folder: Path, labels: Mapping[str, int], where: str) -> list[tuple[Path, str]]:
    """Images under class folders named as ``labels`` (at any depth), with their class; StepError if none.

    Walked as the manifest walks (:func:`medflow.data.manifest.iter_images`: symlinked folders followed with
    a loop guard, hidden entries skipped)."""
    if not folder.is_dir():
        raise StepError(f"{where}: not a folder")
    files = []
    for path in iter_images(folder):
        cls = class_of(path.relative_to(folder).parts[:-1], labels)
        if cls is not None:
            files.append((path, cls))
    if not files:
        raise StepError(f"{where}: no images under class folders named {', '.join(labels)}")
    return files


def decode_files(paths: list[Path], size: int, channels: int, workers: int = 0,
                 limits: InputLimits | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Preprocess ``paths`` as for training, in threads; (uint8 array, per-file error or None).

    An unreadable file gets a zero image and its error message, so callers can report it and go on. Only
    regular files are read, within ``limits`` (byte and pixel caps, memory held while decoding; default:
    the params.yaml defaults), see :mod:`medflow.imaging.limits`.
    """
    limits = limits or InputLimits()
    out = np.zeros((len(paths), size, size, channels), dtype=np.uint8)
    errors: list[str | None] = []
    with ThreadPoolExecutor(n_workers(workers)) as pool:
        decoded = Decoder(size, channels, limits, pool).decode([file_item(p, limits.max_bytes) for p in paths])
    for i, (img, err) in enumerate(decoded):
        if img is not None:
            out[i] = img
        errors.append(err)
    return out, errors


def _in_set(path: Path, folder: Path) -> str:
    """A file of an external set, relative to the set's folder (an archive's is a temporary folder): reports
    never show where the set lies on this machine."""
    return Path(path).relative_to(folder).as_posix()


def assess_folder(cfg: Config, trained: TrainedModel, folder: Path, threshold: dict[str, Any], source: str, *,
                  where: str) -> Evaluation:
    """Decode, score and assess a labelled folder (class subfolders) at ``threshold``: the evaluation, with the
    class counts and unreadable files in its data. ``where`` names the folder in errors."""
    labels = dict(cfg.dataset.labels)
    files = labelled_files(Path(folder), labels, where)
    decoded, errors = decode_files([f for f, _ in files], trained.size, trained.channels,
                                   limits=InputLimits.of(cfg.extract, cfg.filter))
    ok = np.array([e is None for e in errors])
    if not ok.any():
        raise StepError(f"{where}: no readable image")
    scores = Scores(
        y=np.array([labels[c] for _, c in files], dtype=np.int8)[ok],
        p=predict_array(trained.model, decoded[ok], batch_size=cfg.evaluate.batch_size),
        patient=np.array(file_groups([f for f, _ in files], cfg.dataset.group_pattern, cfg.dataset.group_rule,
                                     project_salt(Path.cwd()) if cfg.dataset.group_rule == "dicom" else None))[ok],
        path=np.array([_in_set(f, folder) for f, _ in files])[ok],
    )
    evaluation = assess(f"{cfg.dataset.name}: {trained.metadata['params']['train']['model']} on {source}",
                        cfg.dataset.name, source, trained, scores, threshold, cfg.evaluate, decoded[ok])
    counts = pd.DataFrame([{"class": c, "label": labels[c], "images": sum(1 for _, k in files if k == c)}
                           for c in labels])
    unreadable = pd.DataFrame([{"path": _in_set(f, folder), "reason": "unreadable", "detail": e}
                               for (f, _), e in zip(files, errors, strict=True) if e is not None],
                              columns=["path", "reason", "detail"])
    evaluation.data = {"external_counts": counts, "rejects": unreadable, "labels": labels,
                       "group_rule": cfg.dataset.group_rule, "card": cfg.dataset.card.model_dump()}
    return evaluation


def stored_threshold(trained: TrainedModel) -> dict[str, Any]:
    """The model's stored operating threshold (chosen on val by the evaluate stage), as applied elsewhere."""
    return {**trained.threshold, "chosen_on": trained.threshold.get("chosen_on", "val"),
            "how": f"the model's stored threshold ({trained.folder / THRESHOLD_FILE}), not re-tuned"}


def evaluate_folder(cfg: Config, *, images: Path, model: Path, out: Path) -> dict[str, Any]:
    """Evaluate the model on an external labelled folder (class subfolders) at its stored threshold."""
    trained = load_trained(model)
    evaluation = assess_folder(cfg, trained, Path(images), stored_threshold(trained), f"external folder {images}",
                               where=f"--images {images}")
    return report.write_all(evaluation, Path(out))

"""Write an :class:`~medflow.evaluation.results.Evaluation`: HTML report, summary, model card, metrics, plots.

The HTML report is one self-contained file rendered from ``templates/report.html.j2`` (Jinja2, autoescaped:
class names, paths and card text cannot inject markup): figures are PNGs (matplotlib, Agg) embedded as data
URIs and the style sheet is inline, so it renders offline and can be mailed or attached to a ticket.
``metrics.json`` is for ``dvc metrics show``; ``plots/*.csv`` and ``predictions.csv`` are declared in
dvc.yaml for ``dvc plots``. Every file is written atomically. Interval labels ("95% CI") follow
``evaluate.confidence``.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import io
import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import jinja2
import matplotlib
from markupsafe import Markup

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402

from medflow.evaluation.metrics import LABELS, METRICS, Interval, ci_level  # noqa: E402
from medflow.evaluation.pseudonym import Pseudonymizer, pseudonymizer  # noqa: E402
from medflow.evaluation.results import Evaluation  # noqa: E402
from medflow.io import atomic_open, is_outside, write_csv, write_json  # noqa: E402

log = logging.getLogger(__name__)

REPORT = "report.html"
SUMMARY = "summary.md"
MODEL_CARD = "model_card.md"
METRICS_FILE = "metrics.json"
DETAILS_FILE = "details.json"
PREDICTIONS = "predictions.csv"
PLOTS_DIR = "plots"

HEADLINE = ("roc_auc", "sensitivity", "specificity")
_DPI = 110
_REJECTS_SHOWN = 200  # quarantined files listed one by one; the rest are counted
_CONFLICTS_SHOWN = 10  # label conflicts named in the data section's text
_LABEL_CONFLICT = "label_conflict"  # medflow.imaging.quality.LABEL_CONFLICT (not imported: no decoder imports here)


# --- formatting ------------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def fmt_interval(iv: Interval) -> str:
    return f"{fmt(iv.value)} ({fmt(iv.low)}-{fmt(iv.high)})"


def _ci_label(ev: Evaluation) -> str:
    s = ev.settings
    return (f"{ci_level(ev.confidence)} CI: {s['bootstrap']} stratified bootstrap resamples by "
            f"{s['bootstrap_by']}, seed {s['seed']}")


def _model_name(ev: Evaluation) -> str:
    return str(ev.metadata.get("params", {}).get("train", {}).get("model", "model"))


# --- figures ---------------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _operating_point(ev: Evaluation) -> tuple[float, float]:
    c = ev.confusion
    sens = c["tp"] / max(c["tp"] + c["fn"], 1)
    spec = c["tn"] / max(c["tn"] + c["fp"], 1)
    return sens, spec


def roc_figure(ev: Evaluation) -> bytes:
    roc = ev.curves["roc"]
    sens, spec = _operating_point(ev)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot(roc["fpr"], roc["tpr"], lw=2, label=f"AUC {fmt_interval(ev.intervals['roc_auc'])}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.plot(1 - spec, sens, "o", c="crimson", label=f"threshold {ev.threshold['threshold']:.3f}")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title="ROC curve", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def pr_figure(ev: Evaluation) -> bytes:
    pr = ev.curves["pr"]
    sens, _ = _operating_point(ev)
    c = ev.confusion
    prec = c["tp"] / max(c["tp"] + c["fp"], 1)
    prevalence = float(np.mean(ev.scores.y))
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.step(pr["recall"], pr["precision"], where="post", lw=2,
            label=f"AP {fmt_interval(ev.intervals['pr_auc'])}")
    ax.axhline(prevalence, ls="--", c="grey", lw=1, label=f"prevalence {prevalence:.2f}")
    ax.plot(sens, prec, "o", c="crimson", label="operating point")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall curve",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def calibration_figure(ev: Evaluation) -> bytes:
    cal = ev.curves["calibration"]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.6, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ok = cal["count"] > 0
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.plot(cal["mean_predicted"][ok], cal["fraction_positive"][ok], "o-", lw=2,
            label=f"ECE {fmt_interval(ev.intervals['ece'])}")
    ax.set(ylabel="observed positive fraction", title="Reliability diagram", ylim=(-0.01, 1.01))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    width = cal["bin_high"] - cal["bin_low"]
    hist.bar(cal["bin_low"], cal["count"], width=width, align="edge", color="steelblue", edgecolor="white")
    hist.set(xlabel="predicted probability", ylabel="images", xlim=(0, 1))
    return _png(fig)


def threshold_figure(ev: Evaluation) -> bytes:
    sweep = ev.curves["thresholds"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot(sweep["threshold"], sweep["sensitivity"], lw=2, label="sensitivity")
    ax.plot(sweep["threshold"], sweep["specificity"], lw=2, label="specificity")
    ax.axvline(ev.threshold["threshold"], c="crimson", ls=":", label=f"threshold ({ev.threshold['rule']})")
    ax.set(xlabel="threshold", ylabel="rate", title="Sensitivity and specificity vs threshold",
           xlim=(0, 1), ylim=(-0.01, 1.01))
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def confusion_figure(ev: Evaluation) -> bytes:
    c = ev.confusion
    m = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    names = _class_names(ev)
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=13,
                color="white" if v > m.max() / 2 else "black")
    ax.set_xticks([0, 1], [f"{names[0]}\n(pred 0)", f"{names[1]}\n(pred 1)"])
    ax.set_yticks([0, 1], [f"{names[0]} (0)", f"{names[1]} (1)"])
    ax.set(xlabel="predicted", ylabel="actual", title=f"Confusion matrix at {ev.threshold['threshold']:.3f}")
    return _png(fig)


def history_figure(ev: Evaluation) -> bytes | None:
    h = ev.history
    if h.empty or "epoch" not in h or len(h) < 1 or "loss" not in h:
        return None
    pairs = [(k, f"val_{k}") for k in ("loss", "auc", "accuracy") if k in h]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.4))
    for ax, (train_key, val_key) in zip(np.atleast_1d(axes), pairs, strict=True):
        ax.plot(h["epoch"], h[train_key], "o-", ms=3, label="train")
        if val_key in h:
            ax.plot(h["epoch"], h[val_key], "o-", ms=3, label="val")
        best = ev.metadata.get("best_epoch")
        if best:
            ax.axvline(best, c="grey", ls=":", label=f"best epoch {best}")
        ax.set(xlabel="epoch", title=train_key)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


def _class_names(ev: Evaluation) -> dict[int, str]:
    """The binary classes' names (``dataset.class_names``, recorded in the model's metadata)."""
    names = ev.metadata.get("class_names", {})
    return {0: str(names.get("0", "negative")), 1: str(names.get("1", "positive"))}


def _source_classes(ev: Evaluation) -> str:
    """Which source classes (class folders) make up each binary class, e.g. "benign (0): nevus, ..."."""
    labels = ev.metadata.get("labels") or {}
    names = _class_names(ev)
    parts = [f"{names[v]} ({v}): {', '.join(sorted(k for k, lab in labels.items() if lab == v))}" for v in (0, 1)
             if any(lab == v for lab in labels.values())]
    return "; ".join(parts)


def _selection_line(meta: dict[str, Any]) -> str:
    """How the kept epoch was chosen (train.select_on), from the metadata; older models said val loss."""
    sel = meta.get("selection")
    trained = (f"- Trained {meta.get('epochs_run', '?')} epochs; kept epoch {meta.get('best_epoch', '?')} "
               "(weights restored)")
    if not sel:
        return f"{trained}, best val loss {fmt(meta.get('best_val_loss'), 4)}."
    val = sel.get("val_at_best") or {}
    also = ", ".join(f"{k} {fmt(val[k], 4)}" for k in ("val_loss", "val_auc", "val_pr_auc")
                     if k in val and k != sel.get("select_on"))
    return (f"{trained}, selected on {md_code(sel.get('select_on'))} = {fmt(sel.get('best_value'), 4)}, "
            f"{sel.get('criterion')}" + (f"; there {also}" if also else "") + ".")


def _gradcam_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 RGB array
        raise RuntimeError("PNG encoding failed")
    return bytes(buf)


# --- tables ----------------------------------------------------------------------------------------------


def metrics_header(ev: Evaluation) -> list[str]:
    """Column names of the metrics table, the interval's level included."""
    level = ci_level(ev.confidence)
    return ["metric", "value", f"{level} CI low", f"{level} CI high"]


def metrics_rows(ev: Evaluation) -> list[tuple[str, str, str, str]]:
    return [(LABELS[k], fmt(ev.intervals[k].value), fmt(ev.intervals[k].low), fmt(ev.intervals[k].high))
            for k in METRICS]


def external_rows(ev: Evaluation) -> list[dict[str, Any]]:
    """The external sets scored beside this (test) evaluation: their metrics.json blocks, with name and path."""
    return list(ev.data.get("external_results") or [])


def _iv_text(block: dict[str, Any] | None) -> str:
    if not block:
        return "n/a"
    return f"{fmt(block.get('value'))} ({fmt(block.get('low'))}-{fmt(block.get('high'))})"


def comparison_header(ev: Evaluation) -> list[str]:
    level = ci_level(ev.confidence)
    return ["set", "kind", "images", "positive", f"ROC AUC ({level} CI)", f"sensitivity ({level} CI)",
            f"specificity ({level} CI)", "ECE", "AUC gap", "patients also in training"]


def comparison_rows(ev: Evaluation) -> list[list[str]]:
    """Internal (the test split) and each external set side by side, at the one stored threshold; the gap is the
    external ROC AUC minus the test split's."""
    iv = ev.intervals
    rows = [["test split", "internal", str(int(np.sum(ev.scores.y))), fmt_interval(iv["roc_auc"]),
             fmt_interval(iv["sensitivity"]), fmt_interval(iv["specificity"]), fmt(iv["ece"].value), "",
             "none (split by patient)"]]
    for r in external_rows(ev):
        unseen = r.get("unseen_roc_auc")
        overlap = str(r["train_patient_images"]) + (f" images (AUC without them {_iv_text(unseen)})"
                                                      if r["train_patient_images"] else "")
        rows.append([f"{r['name']}", "external", str(r["n_positive"]), _iv_text(r["roc_auc"]),
                     _iv_text(r["sensitivity"]), _iv_text(r["specificity"]), fmt(r["ece"]),
                     f"{r['auc_gap']:+.3f}", overlap])
    sizes = [len(ev.scores.y), *(r["n"] for r in external_rows(ev))]
    return [[row[0], row[1], str(n), *row[2:]] for n, row in zip(sizes, rows, strict=True)]


def comparison_markdown(ev: Evaluation) -> list[str]:
    """The internal-vs-external section of the summary and the model card (nothing without external sets)."""
    if not external_rows(ev):
        return []
    return ["## Internal and external validation", "",
            "The test split and each external set (`evaluate.external`), at the threshold chosen on val. An external "
            "set comes from another collection: the gap is what the test split does not show. Full reports in "
            "`external/<set>/`.", "", _md_table(comparison_header(ev), comparison_rows(ev)), ""]


def _md_table(header: list[str], rows: list[list[Any]] | list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(md_text(h).replace("|", "\\|") for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_text(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _frame_rows(df: pd.DataFrame) -> tuple[list[str], list[list[Any]]]:
    return [str(c) for c in df.columns], df.astype(object).where(df.notna(), "").values.tolist()


def _reject_summary(ev: Evaluation) -> tuple[pd.DataFrame | None, dict[str, int]]:
    """The quarantined files, label conflicts first (they are what the listed rows must show), and counts."""
    rejects = ev.data.get("rejects")
    if rejects is None or len(rejects) == 0:
        return rejects, {}
    rejects = rejects.sort_values("reason", key=lambda r: r != _LABEL_CONFLICT, kind="stable")
    return rejects, rejects["reason"].value_counts().sort_index().to_dict()


def _conflict_lines(rejects: pd.DataFrame) -> list[str]:
    """Markdown lines naming the files whose content carried two labels (the filter's ``label_conflict``)."""
    rows = rejects[rejects["reason"] == _LABEL_CONFLICT]
    if rows.empty:
        return []
    named = [f"- {md_code(p)}: {md_text(d)}" for p, d in
             zip(rows["path"].head(_CONFLICTS_SHOWN), rows["detail"].fillna("").head(_CONFLICTS_SHOWN), strict=True)]
    more = [f"- and {len(rows) - _CONFLICTS_SHOWN} more (rejects.csv)"] if len(rows) > _CONFLICTS_SHOWN else []
    return [f"Label conflicts: {len(rows)} files whose image is (nearly) the same as one under another class; "
            "all copies are quarantined:", "", *named, *more, ""]


# --- warnings at the top ------------------------------------------------------------------------------------


def chance_verdict(ev: Evaluation) -> dict[str, Any] | None:
    """The chance guard's verdict on val (stored with the threshold by the evaluate stage), if there is one."""
    verdict = ev.threshold.get("chance")
    return verdict if isinstance(verdict, dict) else None


def chance_metrics(ev: Evaluation) -> dict[str, Any] | None:
    """The chance verdict's figures for metrics.json (numbers only: ``dvc metrics show`` prints every value;
    the reasons are in threshold.json and the report)."""
    v = chance_verdict(ev)
    if v is None:
        return None
    auc = {"value": "val_auc", "low": "val_auc_low", "high": "val_auc_high"}
    return {"at_chance": bool(v.get("at_chance")), "weighted": bool(v.get("weighted")), "n_val": v.get("n_val"),
            **{k: _round(v.get(k)) for k in ("val_loss", "baseline_loss", "val_loss_weighted",
                                               "baseline_loss_weighted", "train_prevalence")},
            "val_auc": {k: _round(v.get(name)) for k, name in auc.items()}}


def _round(v: Any) -> float | None:
    return round(float(v), 6) if isinstance(v, int | float) else None


def banners(ev: Evaluation) -> list[str]:
    """What the report, the summary and the model card open with: a model that does not beat chance on val,
    and a validation whose shortcut check was flagged."""
    out = []
    verdict = chance_verdict(ev)
    if verdict and verdict.get("at_chance"):
        out.append(f"AT CHANCE: {verdict['summary']}. Do not use this model: the figures below describe one that "
                   "did not learn the task.")
    shortcut = (ev.data.get("validation") or {}).get("shortcut") or {}
    if shortcut.get("flagged"):
        out.append(f"SHORTCUT IN THE DATA: {shortcut.get('message', '')} (validation). A model can score well by "
                   "learning how the files were stored instead of what they show.")
    return out


# --- the model card ----------------------------------------------------------------------------------------

_MD_ACTIVE = re.compile(r"([\\`\[\]<>])")  # what turns text into HTML, an image, a link or a code span


def md_text(value: Any) -> str:
    """Text from users or data (card text, class, set and file names) as literal Markdown, on one line: raw
    HTML, images, links and code spans are escaped, so model_card.md and summary.md stay inert in any viewer."""
    return _MD_ACTIVE.sub(r"\\\1", " ".join(str(value).split()))


def md_code(value: Any) -> str:
    """``value`` as one inline code span that no backtick in it can close (CommonMark's longer fence)."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def model_card(ev: Evaluation, card: dict[str, Any]) -> str:
    """The model card (Mitchell et al. 2019) as Markdown."""
    meta = ev.metadata
    names = _class_names(ev)
    t = ev.threshold
    lines = [f"# Model card: {md_text(ev.dataset)} / {md_text(_model_name(ev))}", ""]
    lines += [line for text in banners(ev) for line in (f"> **{md_text(text)}**", "")]
    lines += ["## Model details", "",
              f"- Architecture: {md_code(_model_name(ev))} (Keras {meta.get('versions', {}).get('keras', '?')}), input "
              f"{'x'.join(map(str, meta.get('input_shape', [])))} uint8, scaled inside the model.",
              f"- Output: probability of **{md_text(names[1])}** (label 1) vs {md_text(names[0])} (label 0)"
              + (f"; source classes {md_text(_source_classes(ev))}." if _source_classes(ev) else "."),
              _selection_line(meta),
              f"- Data fingerprint `{str(meta.get('data_fingerprint', ''))[:16]}`.",
              f"- Preprocessing: {meta.get('preprocessing', {}).get('decoder', '')}, "
              f"{meta.get('preprocessing', {}).get('size', '?')} px, area interpolation, "
              f"{meta.get('preprocessing', {}).get('channels', '?')} channel(s).", ""]
    lines += ["## Intended use", "", md_text(card.get("intended_use") or "Not stated."), ""]
    lines += ["## Data", ""]
    if card.get("title"):
        lines += [f"**{md_text(card['title'])}.** {md_text(card.get('provenance', ''))}".strip(), ""]
    lines += _data_markdown(ev)
    lines += ["## Operating threshold", "",
              f"- Threshold **{t['threshold']:.4f}**, rule `{t.get('rule')}`: {t.get('how', '')}; chosen on the "
              f"{t.get('chosen_on', 'val')} split, never on test."]
    if t.get("val"):
        lines += [f"- On val ({t['val']['n']} images): sensitivity {fmt(t['val']['sensitivity'])}, specificity "
                  f"{fmt(t['val']['specificity'])}."]
    lines += ["", f"## Performance ({md_text(ev.source)}, {len(ev.scores.y)} images)", "", _ci_label(ev) + ".", "",
              _md_table(metrics_header(ev), metrics_rows(ev)), "", *comparison_markdown(ev)]
    limitations = list(card.get("limitations") or [])
    limitations.append(f"Confidence intervals reflect sampling of {len(ev.scores.y)} test images "
                       f"(resampled by {ev.settings['bootstrap_by']}); they do not cover shifts in population, "
                       "scanner or labelling.")
    lines += ["## Limitations", "", *[f"- {md_text(x)}" for x in limitations], ""]
    return "\n".join(lines)


def _data_markdown(ev: Evaluation) -> list[str]:
    lines: list[str] = []
    counts = ev.data.get("counts")
    if counts is not None:
        header, rows = _frame_rows(counts)
        lines += [f"Split by patient (`{ev.data.get('group_rule')}` rule): no patient and no near-duplicate "
                  "group is in two splits.", "", _md_table(header, rows), ""]
    ext = ev.data.get("external_counts")
    if ext is not None:
        header, rows = _frame_rows(ext)
        lines += [_md_table(header, rows), ""]
    if ev.data.get("external_overlap"):
        lines += [f"Patients shared with the training split: {ev.data['external_overlap']}.", ""]
    rejects, by_reason = _reject_summary(ev)
    if rejects is not None:
        what = ", ".join(f"{n} {r}" for r, n in by_reason.items()) or "none"
        lines += [f"Quarantined files (listed, never deleted): {len(rejects)} ({what}).", ""]
        lines += _conflict_lines(rejects)
    val = ev.data.get("validation")
    if val:
        state = "passed" if val["success"] else "FAILED"
        lines += [f"Great Expectations validation {state}: {val['expectations']} expectations, "
                  f"{len(val['failed'])} failed.", ""]
    sources = ev.data.get("sources")
    if sources:
        for src in sources if isinstance(sources, list) else sources.get("sources", []):
            digest = f"sha256 `{src['sha256']}`" if src.get("sha256") else f"a {src.get('kind', 'local')} (no digest)"
            lines.append(f"- Source {md_code(source_text(src))}: {digest}")
        lines.append("")
    return lines


def source_text(src: dict[str, Any]) -> str:
    """How a source of sources.json is shown: a URL (redacted) as is; a local archive or folder by its
    project-relative path (its url is the text the user wrote, which may be absolute); one outside the project
    by its name only."""
    url, path = str(src.get("url") or ""), str(src.get("path") or "")
    if "://" in url or not path:
        return url
    return f"(outside the project)/{Path(path).name}" if is_outside(path) else path


def pseudonymized(ev: Evaluation, pz: Pseudonymizer) -> Evaluation:
    """``ev`` with its file paths and patient ids (scores, Grad-CAM examples, quarantined files) as salted
    hashes (``evaluate.pseudonymize``); ``ev`` itself when ``pz`` is off."""
    if not pz.on:
        return ev
    scores = replace(ev.scores, path=np.array([pz.path(p) for p in ev.scores.path], dtype=object),
                     patient=np.array([pz.patient(p) for p in ev.scores.patient], dtype=object))
    gradcams = [{**g, "path": pz.path(g["path"])} for g in ev.gradcams]
    data = dict(ev.data)
    rejects = data.get("rejects")
    if rejects is not None and len(rejects):
        paths = rejects["path"].fillna("").astype(str)
        # a split quarantine (links_splits) names the images it links to: their names are hashed too
        links = [str(x).split(";") if x else [] for x in rejects.get("links", pd.Series("", index=rejects.index))
                 .fillna("")]
        data["rejects"] = rejects.assign(
            path=[pz.path(p) for p in paths],
            detail=[pz.text(d, [p, *ln]) for d, p, ln in zip(rejects["detail"].fillna("").astype(str), paths, links,
                                                              strict=True)],
            links=[";".join(pz.path(x) for x in ln) for ln in links])
    return replace(ev, scores=scores, gradcams=gradcams, data=data)


# --- HTML --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    header: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class _Figure:
    alt: str
    uri: str  # a data: URI, so the page needs no other file
    caption: str = ""


@functools.cache
def _templates() -> jinja2.Environment:
    """The report templates, shipped inside the package (templates/); every value is HTML-escaped."""
    return jinja2.Environment(loader=jinja2.PackageLoader("medflow.evaluation", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _figure(png: bytes, alt: str, caption: str = "") -> _Figure:
    return _Figure(alt, "data:image/png;base64," + base64.b64encode(png).decode("ascii"), caption)


def _frame_table(df: pd.DataFrame) -> _Table:
    return _Table(*_frame_rows(df))


def _headline(ev: Evaluation) -> list[dict[str, str]]:
    return [{"label": LABELS[k], "value": fmt(ev.intervals[k].value), "low": fmt(ev.intervals[k].low),
             "high": fmt(ev.intervals[k].high)} for k in HEADLINE]


def _threshold_view(ev: Evaluation) -> dict[str, str]:
    t = ev.threshold
    val_line = ""
    if t.get("val"):
        val_line = (f" On val ({t['val']['n']} images) it gives sensitivity {fmt(t['val']['sensitivity'])} and "
                    f"specificity {fmt(t['val']['specificity'])}.")
    return {"short": f"{t['threshold']:.3f}", "long": f"{t['threshold']:.4f}", "rule": str(t.get("rule")),
            "how": str(t.get("how", "")), "chosen_on": str(t.get("chosen_on", "val")), "val_line": val_line}


def _figures(ev: Evaluation, figures: dict[str, bytes | None]) -> list[_Figure]:
    c = ev.confusion
    captions = {
        "roc": ("ROC", "Operating point in red."),
        "pr": ("PR", "Dashed: a classifier without skill (the prevalence)."),
        "calibration": ("Calibration", "Points on the diagonal: probabilities mean what they say."),
        "thresholds": ("Thresholds", "Dotted: the operating threshold chosen on val."),
        "confusion": ("Confusion", f"TP {c['tp']}, FP {c['fp']}, TN {c['tn']}, FN {c['fn']}."),
    }
    return [_figure(png, alt, caption) for key, (alt, caption) in captions.items()
            if (png := figures.get(key)) is not None]


def _gradcam_figures(ev: Evaluation) -> list[_Figure]:
    names = _class_names(ev)
    return [_figure(_gradcam_png(g["image"]), f"Grad-CAM {g['outcome']}",
                    f"{g['outcome']}: p={g['probability']:.3f}, actual {names[g['label']]} - {Path(g['path']).name}")
            for g in ev.gradcams]


def _data_view(ev: Evaluation) -> dict[str, Any]:
    counts, ext = ev.data.get("counts"), ev.data.get("external_counts")
    view: dict[str, Any] = {"counts": None if counts is None else _frame_table(counts),
                            "group_rule": str(ev.data.get("group_rule")),
                            "external": None if ext is None else _frame_table(ext),
                            "validation": ev.data.get("validation") or None, "rejects": None,
                            "overlap": str(ev.data.get("external_overlap") or "")}
    rejects, by_reason = _reject_summary(ev)
    if rejects is not None:
        shown = rejects[["path", "reason", "detail"]].head(_REJECTS_SHOWN) if len(rejects) else rejects
        view["rejects"] = {"n": len(rejects), "by_reason": _Table(["reason", "files"], [[r, n] for r, n in
                                                                                    by_reason.items()]),
                           "shown": _frame_table(shown), "more": len(rejects) - len(shown)}
    return view


def render_html(ev: Evaluation, card_md: str, figures: dict[str, bytes | None]) -> str:
    """The whole report as one HTML string (templates/report.html.j2; no external resources)."""
    history = figures.get("history")
    return _templates().get_template("report.html.j2").render(
        title=ev.title, banners=banners(ev), source=ev.source, n=len(ev.scores.y), n_positive=int(np.sum(ev.scores.y)),
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), ci_label=_ci_label(ev),
        ci_level=ci_level(ev.confidence), headline=_headline(ev), threshold=_threshold_view(ev),
        metrics=_Table(metrics_header(ev), [list(r) for r in metrics_rows(ev)]), figures=_figures(ev, figures),
        history=None if history is None else _figure(
            history, "training curves", "Per-epoch loss and metrics; dotted: the epoch whose weights were kept."),
        gradcams=_gradcam_figures(ev), data=_data_view(ev), model_card=Markup(markdown_html(card_md)),
        comparison=_Table(comparison_header(ev), comparison_rows(ev)) if external_rows(ev) else None,
    )


def markdown_html(text: str) -> str:
    """Markdown (CommonMark + tables) as HTML, raw HTML in the text escaped and no images (nothing the page
    would fetch); headings moved down two levels."""
    out = MarkdownIt("commonmark", {"html": False}).enable("table").disable("image").render(text)
    for level in (4, 3, 2, 1):
        out = out.replace(f"<h{level}>", f"<h{level + 2}>").replace(f"</h{level}>", f"</h{level + 2}>")
    return out


# --- Markdown summary, metrics and plot data -------------------------------------------------------------


def summary_markdown(ev: Evaluation) -> str:
    t = ev.threshold
    c = ev.confusion
    lines = [f"# {md_text(ev.title)}", "", *[line for text in banners(ev) for line in (f"> **{md_text(text)}**", "")],
             f"Test images: {len(ev.scores.y)} ({int(np.sum(ev.scores.y))} positive). {_ci_label(ev)}.", "",
             f"Operating threshold **{t['threshold']:.4f}** ({t.get('rule')}, chosen on "
             f"{t.get('chosen_on', 'val')}): {t.get('how', '')}.", "",
             _md_table(metrics_header(ev), metrics_rows(ev)), "",
             f"Confusion at the threshold: TP {c['tp']}, FP {c['fp']}, TN {c['tn']}, FN {c['fn']}.", "",
             *comparison_markdown(ev), *_data_markdown(ev),
             f"Full report: [{REPORT}]({REPORT}); model card: [{MODEL_CARD}]({MODEL_CARD}).",
             ""]
    return "\n".join(lines)


def metrics_json(ev: Evaluation) -> dict[str, Any]:
    """The headline for ``dvc metrics show`` / ``dvc exp show`` (a few columns per dataset): the threshold, the
    test split's AUC, sensitivity and specificity with CIs and its ECE, the chance verdict, and one block per
    external set. Everything else is in details.json."""
    verdict = chance_verdict(ev)
    return {
        "threshold": float(ev.threshold["threshold"]),  # exactly threshold.json's
        "n": len(ev.scores.y),
        "test": {**{k: ev.intervals[k].as_dict() for k in HEADLINE}, "ece": ev.intervals["ece"].as_dict()["value"]},
        **({"at_chance": bool(verdict.get("at_chance"))} if verdict is not None else {}),
        **({"external": {r["name"]: {k: v for k, v in r.items() if k not in ("name", "path")}
                         for r in external_rows(ev)}} if external_rows(ev) else {}),
    }


def details_json(ev: Evaluation) -> dict[str, Any]:
    """Every figure of the evaluation (details.json): all metrics with CIs, the confusion matrix, the chance
    verdict's numbers, the bootstrap settings and the external sets' blocks with their paths."""
    return {
        "threshold": float(ev.threshold["threshold"]),
        "threshold_rule": ev.threshold.get("rule"),
        "n": len(ev.scores.y), "n_positive": int(np.sum(ev.scores.y)),
        "test": {k: ev.intervals[k].as_dict() for k in METRICS},
        "confusion": ev.confusion,
        "chance": chance_metrics(ev),
        "external": external_rows(ev),
        "bootstrap": {"resamples": ev.settings["bootstrap"], "by": ev.settings["bootstrap_by"],
                      "confidence": ev.settings["confidence"], "seed": ev.settings["seed"]},
    }


def predictions_frame(ev: Evaluation) -> pd.DataFrame:
    t = float(ev.threshold["threshold"])
    return pd.DataFrame({"path": ev.scores.path, "patient": ev.scores.patient, "label": ev.scores.y.astype(int),
                         "probability": np.round(ev.scores.p, 6), "predicted": (ev.scores.p >= t).astype(int)})


def write_all(ev: Evaluation, out: Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every report file into ``out``; return the headline metrics."""
    out = Path(out)
    ev = pseudonymized(ev, pseudonymizer(bool(ev.settings.get("pseudonymize")), Path.cwd()))
    card = card if card is not None else ev.data.get("card", {})
    figures = {"roc": roc_figure(ev), "pr": pr_figure(ev), "calibration": calibration_figure(ev),
               "thresholds": threshold_figure(ev), "confusion": confusion_figure(ev), "history": history_figure(ev)}
    card_md = model_card(ev, card)
    with atomic_open(out / REPORT, encoding="utf-8") as f:
        f.write(render_html(ev, card_md, figures))
    with atomic_open(out / SUMMARY, encoding="utf-8") as f:
        f.write(summary_markdown(ev))
    with atomic_open(out / MODEL_CARD, encoding="utf-8") as f:
        f.write(card_md)
    write_json(out / METRICS_FILE, metrics_json(ev))
    write_json(out / DETAILS_FILE, details_json(ev))
    write_csv(out / PREDICTIONS, predictions_frame(ev))
    for name in ("roc", "pr", "calibration", "thresholds"):
        write_csv(out / PLOTS_DIR / f"{name}.csv", ev.curves[name].round(6))
    headline = {k: ev.intervals[k].as_dict() for k in HEADLINE}
    log.info("evaluate: %s -> %s; %s", ev.source, out / REPORT,
             ", ".join(f"{k} {fmt_interval(ev.intervals[k])}" for k in HEADLINE))
    return {"threshold": float(ev.threshold["threshold"]), **headline, "report": str(out / REPORT)}

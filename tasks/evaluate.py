"""The evaluate step (dvc.yaml stage ``evaluate``): the only place the test split is scored.

1. scores the val split and chooses the operating threshold there (``evaluate.threshold_rule``), storing it
   beside the model (``<model>/threshold.json``, read by ``medflow predict``) with the chance verdict (does
   the model beat always predicting the training prevalence on val? :mod:`medflow.evaluation.chance`);
2. scores the test split once and assesses it (:func:`medflow.evaluation.assess.assess`: metrics with
   bootstrap CIs, curves, Grad-CAM);
3. writes the report folder ``out`` (:func:`medflow.evaluation.report.write_all`: self-contained HTML,
   Markdown summary, model card, ``metrics.json``, predictions and plot tables for ``dvc metrics`` /
   ``dvc plots``), with the data facts read here: counts per split, quarantined files, the Great
   Expectations result and the sources;
4. scores each external set of ``evaluate.external`` at the same threshold (:mod:`medflow.evaluation.external`):
   a full report per set in ``out/external/<set>/``, and the sets beside the test split in the report and
   ``metrics.json``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from medflow.config import Config
from medflow.data.split import read_quarantine
from medflow.evaluation import assess, external, report
from medflow.evaluation.assess import THRESHOLD_FILE
from medflow.io import atomic_open, open_images, read_csv, read_json, write_json

log = logging.getLogger(__name__)

EXTERNAL_DIR = "external"  # out/external/<set>/: one full report per external set


def _data_facts(cfg: Config, split: Path, rejects: Path | None, validation: Path | None,
                sources: Path | None, split_rejects: Path | None = None) -> dict[str, Any]:
    """What the report says about the data; each optional input is left out when its file is absent."""
    facts: dict[str, Any] = {"counts": assess.split_counts(read_csv(split), cfg.dataset.labels),
                             "labels": dict(cfg.dataset.labels), "group_rule": cfg.dataset.group_rule,
                             "card": cfg.dataset.card.model_dump()}
    facts["rejects"] = read_quarantine(rejects, split_rejects)  # the filter's and the split's
    if validation is not None and validation.is_file():
        facts["validation"] = assess.validation_summary(read_json(validation), validation)
    if sources is not None and sources.is_file():
        facts["sources"] = read_json(sources)
    return facts


def run(cfg: Config, *, model: Path, images: Path, split: Path, out: Path, rejects: Path | None = None,
        validation: Path | None = None, sources: Path | None = None,
        split_rejects: Path | None = None) -> dict[str, Any]:
    """Threshold on val (stored in the model folder), the test report into ``out``; returns the headline."""
    ev = cfg.evaluate
    model, images, split = Path(model), Path(images), Path(split)
    sets = external.external_sets(ev.external)  # checked before anything is scored or written
    trained = assess.load_trained(model)
    val = assess.score_split(model, images, split, "val", trained=trained, batch_size=ev.batch_size)
    threshold = assess.choose_threshold(val, ev)
    verdict = assess.check_chance(trained, val, split, ev)
    threshold["chance"] = verdict.as_dict()  # the model's val facts, with it wherever it goes (registry)
    write_json(model / THRESHOLD_FILE, threshold)
    log.info("evaluate: threshold %.4f (%s), val sensitivity %.3f specificity %.3f", threshold["threshold"],
             threshold["rule"], threshold["val"]["sensitivity"], threshold["val"]["specificity"])
    (log.warning if verdict.at_chance else log.info)("evaluate: %s%s", "AT CHANCE: " if verdict.at_chance else "",
                                                     verdict.summary())
    test = assess.score_split(model, images, split, "test", trained=trained, batch_size=ev.batch_size)
    evaluation = assess.assess(f"{cfg.dataset.name}: {trained.metadata['params']['train']['model']} on the test "
                               "split", cfg.dataset.name, f"test split of {split}", trained, test, threshold, ev,
                               open_images(images))
    evaluation.data = _data_facts(cfg, split, rejects, validation, sources, split_rejects)
    evaluation.data["external_results"] = _external(cfg, sets, trained, threshold, split, Path(out) / EXTERNAL_DIR,
                                                    evaluation.intervals["roc_auc"].value)
    return report.write_all(evaluation, Path(out))


def _external(cfg: Config, sets: list[external.ExternalSet], trained: assess.TrainedModel, threshold: dict[str, Any],
              split: Path, folder: Path, internal_auc: float) -> list[dict[str, Any]]:
    """Every external set scored into ``folder`` (emptied first: a set no longer listed leaves no report behind),
    with an index; their metrics.json blocks."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    results = external.evaluate_sets(cfg, sets, trained, threshold, read_csv(split), folder)
    rows = [{"name": r.name, "path": r.path, **r.headline(internal_auc)} for r in results]
    with atomic_open(folder / "index.md", encoding="utf-8") as f:
        f.write("# External validation\n\n" + ("".join(f"- [{r['name']}]({r['name']}/report.html): `{r['path']}`\n"
                                                      for r in rows) or "No external sets (evaluate.external is [])."
                                                  "\n"))
    return rows


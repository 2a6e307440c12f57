"""The train flow (Prefect flow ``medflow``; deployments ``train-<dataset>``): the DVC pipeline as Prefect tasks.

``prefect deployment run medflow/train-pneumonia`` runs the dataset's stages of dvc.yaml
(``download@pneumonia`` ... ``evaluate@pneumonia``, ``crossval@pneumonia``), in dependency order, as one
Prefect task each, all of them in one ``dvc repro --single-item <stage> ...`` (unchanged stages are skipped
from DVC's cache, and dvc.lock stays true).
Then it registers the trained model (the first one becomes champion; a later one must beat the champion,
see ``medflow.lifecycle.retrain``) and posts three artifacts: a Markdown summary (decision, champion, test
metrics, threshold, chance guard, the crossval verdict where it ran, stages; linked to the next), the
evaluation report (the evaluate stage's summary.md) and a table of quarantined files. A model that does not
beat chance on val (the evaluate stage's chance guard) is named first in the summary and in the run's state
message, and is never promoted.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prefect import flow, get_run_logger

from flows import stages
from flows.common import (
    DASK_STEPS,
    Project,
    artifact_key,
    challenge,
    chance_warning,
    fingerprint,
    open_project,
    outcome,
    post_quarantine,
    post_summary,
    run_dask_address,
    stage_task,
)
from medflow.imaging.cluster import ADDRESS_ENV
from medflow.lifecycle.retrain import Busy, dataset_lock, record_fingerprint

log = logging.getLogger(__name__)

FLOW_NAME = "medflow"


def _dask_env(order: list[Any]) -> dict[str, str]:
    """``$DASK_SCHEDULER_ADDRESS`` for the run's stages when its task runner is a DaskTaskRunner and a filter or
    resize stage is among them (:func:`flows.common.dask_runner`: the cluster starts here); else nothing."""
    if not any(s.step in DASK_STEPS for s in order):
        return {}
    address = run_dask_address()
    return {ADDRESS_ENV: address} if address else {}


def run_pipeline(project: Project, until: str | None = None) -> list[dict[str, Any]]:
    """Run the dataset's dvc.yaml stages (or those up to the step ``until``) as Prefect tasks, in DVC's
    dependency order; a failure stops the rest. Other datasets' stages are not touched.

    One ``dvc repro --single-item`` runs them all (:class:`flows.stages.Repro`: one DVC start-up, DVC's own
    check of each stage); each task reports its stage's share of it. Each task waits for the tasks of the
    stages it depends on (``wait_for``), so the run's graph in the UI is dvc.yaml's."""
    order = list(project.stages)
    if until is not None:
        last = next(i for i, s in enumerate(order) if s.step == until)
        order = order[:last + 1]
    results: list[dict[str, Any]] = []
    done: dict[str, dict[str, Any]] = {}
    names, always = [s.name for s in order], {s.name for s in order if s.always_changed}
    with stages.Repro(project.root, names, always, env=_dask_env(order)) as repro:
        for s in order:
            upstream = [done[n] for n in sorted(s.needs) if n in done]
            done[s.name] = stage_task(s.name)(str(project.root), s.name, repro, wait_for=upstream)
            results.append(done[s.name])
    return results


def decision_outcome(decision: dict[str, Any], at_chance: bool) -> str:
    """The run's state name: what the champion/challenger step did."""
    if at_chance:
        return "At chance"
    if decision.get("promote"):
        return "Promoted"
    return "Unchanged" if str(decision.get("reason", "")).startswith("unchanged") else "Kept champion"


@flow(name=FLOW_NAME, flow_run_name="train-{dataset}", log_prints=True,
      description="Run the DVC pipeline (download ... train, evaluate) as Prefect tasks; promote a better model.")
def train_flow(dataset: str = "pneumonia", project_dir: str | None = None,
               on_busy: Literal["wait", "skip"] = "wait") -> Any:
    """Train ``dataset`` in the project (default: $MEDFLOW_PROJECT or the working directory; under ``medflow
    serve`` the served checkout, and no other: see :func:`flows.common.project_root`).

    Calling the flow returns the run's summary dict; a completed run ends in a Completed state named for its
    outcome ("Promoted", "Kept champion", "Unchanged", "At chance", "Skipped: busy") carrying it, whose message
    gives the decision, led by the chance warning when the model does not beat chance. What the run ingested
    (the source fingerprint) is recorded, so a retrain or ``medflow watch`` afterwards counts only newer files.
    """
    project = open_project(project_dir, dataset)  # first: a foreign project_dir is refused before all else
    logger = get_run_logger()
    try:
        with dataset_lock(project.root, dataset, wait=on_busy == "wait"):
            fp = fingerprint(project)  # before the stages: files landing meanwhile count as new
            results = run_pipeline(project)
            start = time.perf_counter()
            decision = challenge(project, {"flow": FLOW_NAME, "source_fingerprint": fp["now"]})
            decision["seconds"] = round(time.perf_counter() - start, 2)
            record_fingerprint(project.model_root, fp["now"], files=fp["files"], decision=decision.get("reason"))
            n_rejects = post_quarantine(project)
            post_summary(project, results, decision, f"medflow train: {dataset}",
                         key=f"{artifact_key(dataset)}-train-summary")
    except Busy as e:
        logger.warning("%s: skipped, another run is in progress: %s", dataset, e)
        return outcome("Skipped: busy", f"train {dataset}: skipped, another run holds the dataset ({e})",
                       {"dataset": dataset, "status": "skipped: busy"})
    ran = [r["stage"] for r in results if r["ran"]]
    logger.info("train %s: stages run %s, %d quarantined files; %s", dataset, ran or "none (all cached)",
                n_rejects, decision.get("reason"))
    warning = chance_warning(project)
    if warning:
        logger.warning("train %s: %s", dataset, warning)
    message = f"{warning + ' | ' if warning else ''}train {dataset}: {decision.get('reason')}"
    return outcome(decision_outcome(decision, bool(warning)), message,
                   {"dataset": dataset, "status": "completed", "stages": results, "decision": decision,
                    "quarantined": n_rejects, "at_chance": bool(warning)})


if __name__ == "__main__":  # pragma: no cover
    train_flow()

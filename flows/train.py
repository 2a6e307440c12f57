"""The train flow (Prefect flow ``medflow``; deployments ``train-<dataset>``): the DVC pipeline as Prefect tasks.

``prefect deployment run medflow/train-pneumonia`` runs the dataset's stages of dvc.yaml
(``download@pneumonia`` ... ``evaluate@pneumonia``), in dependency order, as one Prefect task each
(``dvc repro --single-item <stage>``: unchanged stages are skipped from DVC's cache, and dvc.lock stays true).
Then it registers the trained model (the first one becomes champion; a later one must beat the champion,
see ``medflow.lifecycle.retrain``) and posts two artifacts: a Markdown summary (stages, headline metrics,
link to the HTML report, champion) and a table of quarantined files. A model that does not beat chance on
val (the evaluate stage's chance guard) is named first in the summary and in the run's state message, and
is never promoted.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.states import Completed

from flows import stages
from flows.common import (
    Project,
    challenge,
    chance_warning,
    open_project,
    post_quarantine,
    post_summary,
    stage_task,
)
from medflow.lifecycle.retrain import Busy, dataset_lock

log = logging.getLogger(__name__)

FLOW_NAME = "medflow"


def run_pipeline(project: Project, until: str | None = None) -> list[dict[str, Any]]:
    """Run the dataset's dvc.yaml stages (or those up to the step ``until``) as Prefect tasks, in DVC's
    dependency order; a failure stops the rest. Other datasets' stages are not touched."""
    results = []
    ran: set[str] = set()  # a stage downstream of one that ran is checked (download always runs: see plan)
    for item in stages.plan(project.root, project.dataset):
        results.append(stage_task(item.stage)(str(project.root), item.stage,
                                              up_to_date=not (item.check or item.needs & ran), stale=item.stale))
        if results[-1]["ran"]:
            ran.add(item.stage)
        if item.stage.split("@", 1)[0] == until:
            break
    return results


@flow(name=FLOW_NAME, flow_run_name="train-{dataset}", log_prints=True,
      description="Run the DVC pipeline (download ... train, evaluate) as Prefect tasks; promote a better model.")
def train_flow(dataset: str = "pneumonia", project_dir: str | None = None,
               on_busy: Literal["wait", "skip"] = "wait") -> Any:
    """Train ``dataset`` in the project (default: $MEDFLOW_PROJECT or the working directory; under ``medflow
    serve`` the served checkout, and no other: see :func:`flows.common.project_root`).

    Calling the flow returns the run's summary dict; a completed run ends in a Completed state carrying it,
    whose message gives the decision, led by the chance warning when the model does not beat chance.
    """
    project = open_project(project_dir, dataset)  # first: a foreign project_dir is refused before all else
    logger = get_run_logger()
    try:
        with dataset_lock(project.root, dataset, wait=on_busy == "wait"):
            results = run_pipeline(project)
            start = time.perf_counter()
            decision = challenge(project, {"flow": FLOW_NAME})
            decision["seconds"] = round(time.perf_counter() - start, 2)
            n_rejects = post_quarantine(project)
            post_summary(project, results, decision, f"medflow train: {dataset}", key=f"{dataset}-train-summary")
    except Busy as e:
        logger.warning("%s: skipped, another run is in progress: %s", dataset, e)
        return {"dataset": dataset, "status": "skipped: busy"}
    ran = [r["stage"] for r in results if r["ran"]]
    logger.info("train %s: stages run %s, %d quarantined files; %s", dataset, ran or "none (all cached)",
                n_rejects, decision.get("reason"))
    warning = chance_warning(project)
    if warning:
        logger.warning("train %s: %s", dataset, warning)
    message = f"{warning + ' | ' if warning else ''}train {dataset}: {decision.get('reason')}"
    return Completed(message=message, data={"dataset": dataset, "status": "completed", "stages": results,
                                            "decision": decision, "quarantined": n_rejects,
                                            "at_chance": bool(warning)})


if __name__ == "__main__":  # pragma: no cover
    train_flow()

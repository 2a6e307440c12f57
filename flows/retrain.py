"""The retrain flow (Prefect flow ``medflow-retrain``; deployments ``retrain-<dataset>``): new data -> challenger.

Started nightly (``retrain.cron``), by a ``medflow.data.landed`` event (``medflow watch``), or by hand:

1. Take the dataset's lock (one run per dataset; a second trigger meanwhile is skipped, or waits).
2. Fingerprint the source (``dataset.sources`` + inbox listing). Same as the last ingested one: complete at
   once with "no new data".
3. Run the DVC stages (:func:`flows.train.run_pipeline`). Ingestion is incremental: download keeps
   finished files, extract is content-addressed, and filter and resize decode only images they have not
   seen (their caches).
4. The split keeps every earlier assignment: the split stage extends its persisted previous output (old
   patients keep their split, new ones follow the rule, and it fails if any image would move; see
   :func:`tasks.split.run`). Validation then runs on it; a failed validation fails the run with the failed
   expectations in the message, and nothing after it runs.
5. Train the challenger (the train stage), score it and the champion on the same test split, and promote
   only if it is not worse beyond ``retrain.tolerance`` (paired bootstrap on AUC). The decision and both
   sets of metrics are posted as an artifact; the champion pointer changes only on promotion.
6. Record the fingerprint, so the same data is not trained on twice.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import Project, challenge, open_project, post_decision, post_quarantine, post_summary
from flows.train import run_pipeline
from medflow.lifecycle.retrain import (
    Busy,
    dataset_lock,
    inbox_files,
    last_fingerprint,
    record_fingerprint,
    source_fingerprint,
)

FLOW_NAME = "medflow-retrain"
NO_NEW_DATA = "no new data"


@task(name="fingerprint-source", task_run_name="fingerprint-source", cache_policy=NO_CACHE)
def fingerprint(project: Project) -> dict[str, Any]:
    """The source fingerprint now and at the last ingestion, and the inbox files it covers."""
    inbox = project.path("download", "--inbox")
    listing = inbox_files(inbox)  # one walk: the fingerprint and the recorded files agree
    return {"now": source_fingerprint(project.cfg, inbox, listing), "last": last_fingerprint(project.model_root),
            "files": [rel for rel, _, _ in listing]}


@flow(name=FLOW_NAME, flow_run_name="retrain-{dataset}", log_prints=True,
      description="Retrain when the source changed; promote the challenger only if it is not worse.")
def retrain_flow(dataset: str = "pneumonia", project_dir: str | None = None,
                 on_busy: Literal["wait", "skip"] = "skip") -> dict[str, Any]:
    """Retrain ``dataset`` if its source changed since the last ingestion (see the module docstring)."""
    project = open_project(project_dir, dataset)  # first: a foreign project_dir is refused before all else
    logger = get_run_logger()
    try:
        with dataset_lock(project.root, dataset, wait=on_busy == "wait"):
            fp = fingerprint(project)
            if fp["now"] == fp["last"]:
                logger.info("%s: %s since the last ingestion (fingerprint %s)", dataset, NO_NEW_DATA,
                            fp["now"][:12])
                create_markdown_artifact(f"# Retrain {dataset}: {NO_NEW_DATA}\n\nSource fingerprint `{fp['now']}` "
                                         "is the one last ingested; nothing was run.",
                                         key=f"{dataset}-retrain-summary", description=NO_NEW_DATA)
                return {"dataset": dataset, "status": NO_NEW_DATA}
            results = run_pipeline(project)
            decision = challenge(project, {"flow": FLOW_NAME, "source_fingerprint": fp["now"]})
            record_fingerprint(project.model_root, fp["now"], files=fp["files"], decision=decision.get("reason"))
            post_decision(project, decision)
            post_quarantine(project)
            post_summary(project, results, decision, f"medflow retrain: {dataset}", key=f"{dataset}-retrain-summary")
    except Busy as e:
        logger.warning("%s: skipped, another run is in progress: %s", dataset, e)
        return {"dataset": dataset, "status": "skipped: busy"}
    status = ("promoted" if decision.get("promote") else
              "no new model" if str(decision.get("reason", "")).startswith("unchanged") else "not promoted")
    logger.info("retrain %s (%s): %s", dataset, status, decision.get("reason"))
    return {"dataset": dataset, "status": status, "stages": results, "decision": decision}


if __name__ == "__main__":  # pragma: no cover
    retrain_flow()

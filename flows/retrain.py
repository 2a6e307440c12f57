"""The retrain flow (Prefect flow ``medflow-retrain``; deployments ``retrain-<dataset>``): new data -> challenger.

Started nightly (``retrain.cron``), by a ``medflow.data.landed`` event (``medflow watch``), or by hand:

1. Take the dataset's lock (one run per dataset; a second trigger meanwhile waits for it, or is skipped with
   ``on_busy="skip"``). Nothing to ingest (no source, empty inbox): complete at once with "no data".
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

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import (
    artifact_key,
    challenge,
    chance_warning,
    fingerprint,
    has_data,
    open_project,
    outcome,
    post_decision,
    post_quarantine,
    post_summary,
)
from flows.train import decision_outcome, run_pipeline
from medflow.lifecycle.retrain import Busy, dataset_lock, record_fingerprint

FLOW_NAME = "medflow-retrain"
NO_NEW_DATA = "no new data"
NO_DATA = "no data"


@flow(name=FLOW_NAME, flow_run_name="retrain-{dataset}", log_prints=True,
      description="Retrain when the source changed; promote the challenger only if it is not worse.")
def retrain_flow(dataset: str = "pneumonia", project_dir: str | None = None,
                 on_busy: Literal["wait", "skip"] = "wait") -> Any:
    """Retrain ``dataset`` if its source changed since the last ingestion (see the module docstring).

    Ends in a Completed state named for what happened: "Promoted", "Kept champion", "Unchanged", "At chance",
    "No new data", "No data" (nothing to ingest: no source, empty inbox) or "Skipped: busy" (``on_busy="skip"``
    only: by default a trigger that finds the dataset busy waits for the lock, then finds out whether the run
    that held it already ingested its data, so an event is never lost and never trains twice).
    """
    project = open_project(project_dir, dataset)  # first: a foreign project_dir is refused before all else
    logger = get_run_logger()
    key = f"{artifact_key(dataset)}-retrain-summary"
    try:
        with dataset_lock(project.root, dataset, wait=on_busy == "wait"):
            fp = fingerprint(project)
            if not has_data(project, fp):
                message = (f"retrain {dataset}: no data (dataset.sources is empty and "
                           f"{project.path('download', '--inbox').relative_to(project.root)}/ holds no file)")
                logger.info(message)
                create_markdown_artifact(f"# Retrain {dataset}: {NO_DATA}\n\n{message}; nothing was run.", key=key,
                                         description=NO_DATA)
                return outcome("No data", message, {"dataset": dataset, "status": NO_DATA})
            if fp["now"] == fp["last"]:
                message = f"retrain {dataset}: {NO_NEW_DATA} since the last ingestion (fingerprint {fp['now'][:12]})"
                logger.info(message)
                create_markdown_artifact(f"# Retrain {dataset}: {NO_NEW_DATA}\n\nSource fingerprint `{fp['now']}` "
                                         "is the one last ingested; nothing was run.", key=key,
                                         description=NO_NEW_DATA)
                return outcome("No new data", message, {"dataset": dataset, "status": NO_NEW_DATA})
            results = run_pipeline(project)
            decision = challenge(project, {"flow": FLOW_NAME, "source_fingerprint": fp["now"]})
            record_fingerprint(project.model_root, fp["now"], files=fp["files"], decision=decision.get("reason"))
            post_decision(project, decision)
            post_quarantine(project)
            post_summary(project, results, decision, f"medflow retrain: {dataset}", key=key)
    except Busy as e:
        logger.warning("%s: skipped, another run is in progress: %s", dataset, e)
        return outcome("Skipped: busy", f"retrain {dataset}: skipped, another run holds the dataset ({e})",
                       {"dataset": dataset, "status": "skipped: busy"})
    status = ("promoted" if decision.get("promote") else
              "no new model" if str(decision.get("reason", "")).startswith("unchanged") else "not promoted")
    logger.info("retrain %s (%s): %s", dataset, status, decision.get("reason"))
    warning = chance_warning(project)
    return outcome(decision_outcome(decision, bool(warning)),
                   f"{warning + ' | ' if warning else ''}retrain {dataset}: {decision.get('reason')}",
                   {"dataset": dataset, "status": status, "stages": results, "decision": decision})


if __name__ == "__main__":  # pragma: no cover
    retrain_flow()

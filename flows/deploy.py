"""Deployments: ``train-<dataset>`` and ``retrain-<dataset>`` for every dataset of the catalog (datasets/*.yaml).

``medflow serve`` serves them all from this checkout (a Prefect runner process; runs execute here):

- ``medflow/train-<ds>``: on demand (``prefect deployment run medflow/train-pneumonia``).
- ``medflow-retrain/retrain-<ds>``: on the ``retrain.cron`` schedule (``retrain.timezone``), and on every
  ``medflow.data.landed`` event for that dataset and checkout (``medflow watch``).

Every dataset of params.yaml's ``datasets:`` gets both deployments, each runnable from this one checkout
(dvc.yaml has its own stages and paths per dataset). Each deployment runs one flow run at a time; on top
of that, the dataset lock (``medflow.lifecycle.retrain.dataset_lock``) keeps train and retrain runs of one
dataset from overlapping. Runs of different datasets may overlap: they share no output.

Every deployment is pinned to the checkout it was built from: its parameters hold the dataset only (no
``project_dir``, which is also dropped from the parameter schema the UI shows), and ``medflow serve`` sets
``$MEDFLOW_SERVED_PROJECT``, so a run asking for another ``project_dir`` (anyone who reaches the API can ask) fails
in :func:`flows.common.project_root` before anything of that folder is read or run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from medflow.catalog import preflight
from medflow.config import load_config

log = logging.getLogger(__name__)


def catalog(project: Path) -> list[str]:
    """The datasets the checkout builds: params.yaml's ``datasets:``, checked against datasets/*.yaml (the
    pre-flight: every name checked before a deployment or DVC sees it)."""
    return preflight(Path(project) / "params.yaml")


def build_deployments(project: Path) -> list[Any]:
    """RunnerDeployments for every dataset: train on demand, retrain on schedule and on data-landed events."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from flows.events import DATA_LANDED, dataset_resource
    from flows.retrain import retrain_flow
    from flows.train import train_flow

    project = Path(project).resolve()
    out = []
    for ds in catalog(project):
        retrain = load_config(project / "params.yaml", ds).retrain  # a dataset may have its own schedule
        params = {"dataset": ds}  # the project is the served checkout (pinned), never a parameter
        out.append(_pinned(train_flow.to_deployment(
            name=f"train-{ds}", parameters=params, tags=["medflow", ds], concurrency_limit=1,
            description=f"Run the DVC pipeline for {ds} in this checkout ({project.name}/) as Prefect tasks.")))
        resource = dataset_resource(ds, project)
        trigger = DeploymentEventTrigger(
            name=f"{ds} data landed", expect={DATA_LANDED},
            match={"prefect.resource.id": resource["prefect.resource.id"],
                   "medflow.project": resource["medflow.project"]},
            parameters=params)
        out.append(_pinned(retrain_flow.to_deployment(
            name=f"retrain-{ds}", parameters=params, tags=["medflow", ds, "retrain"], concurrency_limit=1,
            schedules=[Cron(retrain.cron, timezone=retrain.timezone)], triggers=[trigger],
            description=f"Retrain {ds} when new data lands (cron {retrain.cron} {retrain.timezone}, "
                        f"or a {DATA_LANDED} event); promote only a challenger that is not worse.")))
    return out


def _pinned(deployment: Any) -> Any:
    """Drop ``project_dir`` from the deployment's parameter schema, so the UI and the CLI do not offer it.

    Convenience only: a client may switch schema enforcement off per run, so the guard is in the flow
    (:func:`flows.common.project_root`)."""
    schema = getattr(deployment, "_parameter_openapi_schema", None)
    if schema is not None:
        schema.properties.pop("project_dir", None)
    return deployment


RUNNER_POLL_S = 2.0  # how often the runner asks the API for runs to start (Prefect's default: 10 s)
POLL_ENV = "PREFECT_RUNNER_POLL_FREQUENCY"  # Prefect's own setting: when set, it wins


def poll_seconds() -> float | None:
    """The runner's poll interval: :data:`RUNNER_POLL_S`, or None (Prefect's own setting) when
    ``$PREFECT_RUNNER_POLL_FREQUENCY`` is set. A run waits for the next poll before it starts: 5 s on average
    at Prefect's 10 s, 1 s at 2 s; each poll is one small query to the local API."""
    return None if os.environ.get(POLL_ENV) else RUNNER_POLL_S


def serve(project: Path, limit: int | None = None) -> None:
    """Serve every deployment of ``project`` until interrupted (runs execute in this process's machine)."""
    from prefect import serve as prefect_serve

    from flows.common import SERVED_PROJECT_ENV

    os.environ[SERVED_PROJECT_ENV] = str(Path(project).resolve())  # the runs' pin (flow runs inherit it)
    deployments = build_deployments(project)
    log.info("serving %s", ", ".join(d.name for d in deployments))
    prefect_serve(*deployments, limit=limit, query_seconds=poll_seconds())

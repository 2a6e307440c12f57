"""Deployments: ``train-<dataset>`` and ``retrain-<dataset>`` for every dataset of the catalog (datasets/*.yaml).

``medflow serve`` serves them all from this checkout (a Prefect runner process; runs execute here):

- ``medflow/train-<ds>``: on demand (``prefect deployment run medflow/train-pneumonia``).
- ``medflow-retrain/retrain-<ds>``: on the ``retrain.cron`` schedule (``retrain.timezone``), and on every
  ``medflow.data.landed`` event for that dataset and checkout (``medflow watch``).

Every dataset of params.yaml's ``datasets:`` gets both deployments, each runnable from this one checkout
(dvc.yaml has its own stages and paths per dataset). Each deployment runs one flow run at a time; on top
of that, the dataset lock (``medflow.lifecycle.retrain.dataset_lock``) keeps train and retrain runs of one
dataset from overlapping. Runs of different datasets may overlap: they share no output.

``medflow deploy --pool POOL`` registers the same deployments in a process work pool instead (created when
missing); ``prefect worker start --pool POOL`` on any machine that has this checkout at the same path runs
them there: each deployment's pull step sets the working directory to the checkout, and its job variables set
``$MEDFLOW_SERVED_PROJECT`` to it. Serving again takes them back out of the pool (a deployment is run by the
runner or by the pool's workers, never both).

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


POOL_TYPE = "process"  # the work pool type whose workers run flow runs as processes on their own machine


def deploy(project: Path, pool: str) -> list[str]:
    """Register every deployment of ``project`` in the process work pool ``pool`` (created when it does not exist);
    returns their names. A worker (``prefect worker start --pool POOL``) runs each flow run in the checkout's folder,
    which must be at the same path on the worker's machine, pinned to it as ``medflow serve`` pins its runs. The
    flow code is the checkout's ``flows/`` (by its path in the checkout), or where the checkout has none, the one
    :func:`medflow.cli.load_project_module` found (by its absolute path: the same path on workers too)."""
    from prefect.runner.storage import LocalStorage

    from flows.common import SERVED_PROJECT_ENV

    project = Path(project).resolve()
    _ensure_pool(pool)
    names = []
    for deployment in build_deployments(project):
        file, _, function = deployment.entrypoint.rpartition(":")  # relative to the working directory
        code = (Path.cwd() / file).resolve()  # the checkout's flows/, else the code checkout's (as serve loads them)
        deployment.entrypoint = f"{code.relative_to(project) if code.is_relative_to(project) else code}:{function}"
        deployment.storage = LocalStorage(str(project))  # pull step: set_working_directory (nothing copied)
        deployment.job_variables = {"env": {SERVED_PROJECT_ENV: str(project)}}
        deployment.apply(work_pool_name=pool)
        names.append(f"{deployment.flow_name}/{deployment.name}")
    log.info("deployed to work pool %r: %s; run them with `prefect worker start --pool %s` in %s", pool,
             ", ".join(names), pool, project)
    return names


def _ensure_pool(pool: str) -> None:
    """The work pool ``pool`` exists and is a process pool: created as one when missing, else ConfigError."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from medflow.config import ConfigError

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=POOL_TYPE))
            log.info("created the %s work pool %r", POOL_TYPE, pool)
            return
    if found.type != POOL_TYPE:
        raise ConfigError(f"work pool {pool!r} is a {found.type!r} pool; medflow deploys to a {POOL_TYPE!r} pool "
                          f"(prefect work-pool create NAME --type {POOL_TYPE})")


def serve(project: Path, limit: int | None = None) -> None:
    """Serve every deployment of ``project`` until interrupted (runs execute in this process's machine)."""
    from prefect import serve as prefect_serve

    from flows.common import SERVED_PROJECT_ENV

    os.environ[SERVED_PROJECT_ENV] = str(Path(project).resolve())  # the runs' pin (flow runs inherit it)
    deployments = build_deployments(project)
    for deployment in deployments:  # out of any work pool `medflow deploy` put them in: this runner runs them
        deployment.work_pool_name = deployment.work_queue_name = None
        deployment.job_variables = {}
    _reclaim(deployments)
    log.info("serving %s", ", ".join(d.name for d in deployments))
    prefect_serve(*deployments, limit=limit, query_seconds=poll_seconds())


def _reclaim(deployments: list[Any]) -> None:
    """Give deployments that ``medflow deploy`` registered in a work pool their code path back.

    Prefect's update of an existing deployment (what serving it does) leaves its ``path`` alone, and a pool's
    deployment has none (its pull step sets the folder): the runner's flow runs would look for their flow in
    ``<checkout>/None``."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                found = client.read_deployment_by_name(f"{deployment.flow_name}/{deployment.name}")
            except ObjectNotFound:
                continue
            if found.path != deployment._path:
                client.update_deployment(found.id, DeploymentUpdate(path=deployment._path))

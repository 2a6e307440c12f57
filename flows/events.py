"""The ``medflow.data.landed`` event: emitted by ``medflow watch`` when files land in a dataset's inbox.

Each ``retrain-<dataset>`` deployment carries a trigger on this event (matched on the dataset's resource id
and the project id, a hash of its folder), so an emitted event starts a retrain run of that dataset in that checkout.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from medflow.io import display_path

log = logging.getLogger(__name__)

DATA_LANDED = "medflow.data.landed"


def project_id(project: Path) -> str:
    """The checkout's id in events: a hash of its resolved folder (one id per checkout, and the folder, the
    home folder among it, never reaches the Prefect server)."""
    return "project-" + hashlib.sha256(str(Path(project).resolve()).encode()).hexdigest()[:16]


def dataset_resource(dataset: str, project: Path) -> dict[str, str]:
    """The event resource of one dataset in one checkout (what the deployment triggers match on)."""
    return {"prefect.resource.id": f"medflow.dataset.{dataset}", "prefect.resource.name": dataset,
            "medflow.project": project_id(project)}


def landed_event(dataset: str, project: Path, payload: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """The resource and payload of a data-landed event: no absolute path (the inbox as the project sees it,
    ``data/inbox/<ds>``; the checkout by :func:`project_id`)."""
    if "inbox" in payload:
        payload = {**payload, "inbox": display_path(payload["inbox"], project)}
    return dataset_resource(dataset, project), payload


def emit_data_landed(dataset: str, project: Path, payload: dict[str, Any]) -> None:
    """Send one data-landed event to the Prefect API (``PREFECT_API_URL``) and wait until it is delivered."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    resource, payload = landed_event(dataset, project, payload)
    event = emit_event(event=DATA_LANDED, resource=resource, payload=payload)
    EventsWorker.drain_all()
    if event is None:
        raise RuntimeError("the event was not sent: no Prefect API is configured (set PREFECT_API_URL)")
    log.info("emitted %s for %s (%d new files)", DATA_LANDED, dataset,
             payload.get("n_new_files", len(payload.get("new_files", []))))

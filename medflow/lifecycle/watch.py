"""Inbox watcher behind ``medflow watch``: polls ``data/inbox/<ds>/`` (and the local folders of
``dataset.sources``) and reports when new data has landed, changed or gone.

No Prefect here: the caller passes ``emit`` (the CLI sends a ``medflow.data.landed`` Prefect event with it,
see ``flows/events.py``). Data counts as landed when the source fingerprint (``medflow.lifecycle.retrain``) differs both
from the last ingested one (``models/<ds>/retrain.json``) and from the last one reported, and the inbox
listing has been the same for two polls in a row, so a file still being copied is not reported half-way. The
listing is the download step's own walk (:mod:`medflow.data.walk`: symlinked folders followed, hidden entries
skipped), so the watcher sees exactly the changes that re-run the pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medflow.config import Config
from medflow.data.walk import Listing
from medflow.lifecycle.retrain import (
    inbox_files,
    ingested_files,
    last_fingerprint,
    project_of,
    source_files,
    source_fingerprint,
)

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]


class InboxWatcher:
    """Stateful poller: :meth:`check` returns the event payload when new data has landed, else None."""

    def __init__(self, cfg: Config, inbox: Path, model_root: Path) -> None:
        self.cfg, self.inbox, self.model_root = cfg, Path(inbox), Path(model_root)
        self._listing: tuple[Listing, Listing] | None = None
        self._reported: str | None = None
        # New files are counted against the last ingestion (else against the inbox as first seen)
        known = ingested_files(self.model_root)
        self._known = known if known is not None else {rel for rel, _, _ in inbox_files(self.inbox)}

    def check(self, settle: bool = True) -> dict[str, Any] | None:
        listing = inbox_files(self.inbox)
        sources = source_files(self.cfg, project_of(self.inbox))
        stable = (listing, sources) == self._listing
        self._listing = listing, sources
        if settle and not stable:
            return None
        fp = source_fingerprint(self.cfg, self.inbox, listing, sources)
        if fp in (self._reported, last_fingerprint(self.model_root)):
            return None
        self._reported = fp
        names = {rel for rel, _, _ in listing}
        new, self._known = sorted(names - self._known), names
        return {"dataset": self.cfg.dataset.name, "inbox": str(self.inbox), "fingerprint": fp,
                "files": len(listing), "new_files": new[:100], "n_new_files": len(new)}


def watch(cfg: Config, inbox: Path, model_root: Path, emit: Emit, *, interval_s: float, once: bool = False,
          max_polls: int | None = None) -> int:
    """Poll every ``interval_s`` and call ``emit(payload)`` for each landing; return the number emitted.

    ``once``: one check, no settling (for cron jobs and tests): emit if the source differs from the last
    ingested one.
    """
    watcher = InboxWatcher(cfg, inbox, model_root)
    if once:
        payload = watcher.check(settle=False)
        if payload:
            emit(payload)
        return int(payload is not None)
    emitted, polls = 0, 0
    log.info("watching %s every %g s", inbox, interval_s)
    while max_polls is None or polls < max_polls:
        payload = watcher.check()
        if payload:
            log.info("new data in %s: %d new files", inbox, payload["n_new_files"])
            emit(payload)
            emitted += 1
        polls += 1
        time.sleep(interval_s)
    return emitted

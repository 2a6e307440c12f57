"""The download step (dvc.yaml stage download): resolve every source to a local archive or folder.

Reads ``dataset.sources`` and ``download.*`` from the config and lists the dataset's inbox; fetches remote
archives into ``out_dir`` (resumed, retried, sha256-verified: :mod:`medflow.data.fetch`); uses local paths in
place; writes ``sources.json`` (a list of :class:`medflow.data.fetch.SourceRecord`), which extract reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medflow.config import Config, Source
from medflow.data.fetch import (
    FetchError,
    SourceRecord,
    check_filenames,
    default_filename,
    inbox_sources,
    resolve_local,
    resolve_remote,
)
from medflow.errors import StepError
from medflow.io import write_json

log = logging.getLogger(__name__)


def run(cfg: Config, *, out_dir: Path, sources_json: Path, inbox: Path) -> dict[str, Any]:
    """Resolve ``dataset.sources`` followed by whatever lies in ``inbox``; write ``sources_json``.

    Remote archives are downloaded into ``out_dir`` (skipped when an unchanged copy is there); local paths
    are used where they are. Nothing is written when a source fails. Returns counts of sources, archives,
    folders, downloads made, and the indices of unpinned archives.
    """
    out_dir, sources_json, inbox = Path(out_dir), Path(sources_json), Path(inbox)
    sources = [*cfg.dataset.sources, *inbox_sources(inbox)]
    if not sources:
        raise StepError(f"no sources: set dataset.sources in params.yaml, or drop archives or folders into {inbox}")
    check_filenames(sources)
    out_dir.mkdir(parents=True, exist_ok=True)  # a DVC output, even when every source is local
    records: list[SourceRecord] = []
    fetched = 0
    for i, src in enumerate(sources):
        if src.is_remote:
            record, was_fetched = _download(cfg, i, src, out_dir, inbox)
            fetched += was_fetched
        else:
            record = resolve_local(i, src)
        records.append(record)
    write_json(sources_json, records)
    log.info("wrote %d source(s) to %s", len(records), sources_json)
    return {
        "sources": len(records),
        "archives": sum(r["kind"] == "archive" for r in records),
        "folders": sum(r["kind"] == "folder" for r in records),
        "downloaded": fetched,
        "unpinned": [r["index"] for r in records if r["kind"] == "archive" and sources[r["index"]].sha256 is None],
    }


def _download(cfg: Config, i: int, src: Source, out_dir: Path, inbox: Path) -> tuple[SourceRecord, bool]:
    """Fetch one remote source; when it cannot be fetched, say how to supply the archive by hand."""
    try:
        return resolve_remote(i, src, out_dir, cfg.download)
    except FetchError as e:
        filename = src.filename or default_filename(src.url)
        raise StepError(
            f"dataset.sources[{i}]: {e}. If you are offline or the URL is gone, get the archive another "
            f"way and set dataset.sources[{i}].url in params.yaml to a local path of the archive or "
            f"folder, or drop it into the dataset's inbox and set dataset.sources to [] "
            f"(e.g. {inbox / filename})") from None

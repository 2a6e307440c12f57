"""The extract step (dvc.yaml stage extract): unpack the archives of sources.json; write roots.json.

Reads ``sources.json`` (written by download) and ``extract.*`` limits; each archive is extracted safely into a
content-addressed folder under ``out_dir`` (:func:`medflow.data.archives.extract_into`: no path escapes,
links, devices or bombs; reused when already there); folder sources are listed in place. ``roots.json`` (a
list of :class:`medflow.data.archives.RootRecord`) names the folders manifest indexes, each with the digest of
its content (a folder source's listing digest from sources.json), so the manifest stage re-runs when a file
is added to, changed in or removed from a folder source. Archives are built outside ``out_dir`` and renamed
into place, so a killed run leaves nothing partial in it; the next run removes what it left
(:func:`medflow.data.archives.remove_stale_partials`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medflow.config import Config
from medflow.data.archives import RootRecord, extract_into, remove_stale_partials
from medflow.data.fetch import SourceRecord
from medflow.errors import StepError
from medflow.io import read_json, write_json

log = logging.getLogger(__name__)


def run(cfg: Config, *, sources_json: Path, out_dir: Path, roots_json: Path) -> dict[str, Any]:
    """Extract every archive of ``sources_json`` under ``out_dir``; write the folders to index to ``roots_json``.

    Returns counts of roots, archives extracted now, archives whose folder was reused, and folder sources.
    """
    sources_json, out_dir = Path(sources_json), Path(out_dir)
    roots: list[RootRecord] = []
    counts = {"extracted": 0, "reused": 0, "folders": 0}
    out_dir.mkdir(parents=True, exist_ok=True)  # a DVC output, even when every source is a folder
    remove_stale_partials(out_dir)  # left by a killed run (outside out_dir, or inside it by older versions)
    for rec in _read_sources(sources_json):
        if rec["kind"] == "folder":
            if not Path(rec["path"]).is_dir():
                raise StepError(f"dataset.sources[{rec.get('index', '?')}]: folder {rec['path']} not found")
            root, key = rec["path"], "folders"
        else:
            folder, reused = extract_into(_archive(rec), out_dir, cfg.extract, sha256=rec.get("sha256"))
            root, key = str(folder), "reused" if reused else "extracted"
        if any(r["root"] == root for r in roots):
            log.warning("%s is listed twice in %s; indexing it once", root, sources_json)
            continue
        counts[key] += 1
        digest = rec.get("digest") if rec["kind"] == "folder" else rec.get("sha256")
        roots.append(RootRecord(root=root, source=rec["url"], kind=rec["kind"], digest=digest))
    write_json(roots_json, roots)
    log.info("wrote %d root(s) to %s", len(roots), roots_json)
    return {"roots": len(roots), **counts}


def _read_sources(sources_json: Path) -> list[SourceRecord]:
    """Load sources.json and check the fields this step relies on."""
    try:
        data = read_json(sources_json)
    except FileNotFoundError:
        raise StepError(f"{sources_json}: not found; run the download step first") from None
    except ValueError as e:
        raise StepError(f"{sources_json}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise StepError(f"{sources_json}: expected a list of sources, got {type(data).__name__}")
    for n, rec in enumerate(data):
        ok = (isinstance(rec, dict) and rec.get("kind") in ("archive", "folder")
              and isinstance(rec.get("path"), str) and isinstance(rec.get("url"), str)
              and (rec.get("sha256") is None or isinstance(rec.get("sha256"), str))
              and (rec.get("digest") is None or isinstance(rec.get("digest"), str)))
        if not ok:
            raise StepError(f"{sources_json}: entry {n} is not a source record "
                            "(needs url, path, kind archive|folder, sha256)")
    return data


def _archive(rec: SourceRecord) -> Path:
    """The record's archive, checked to be the file download resolved (still there, same size)."""
    archive = Path(rec["path"])
    if not archive.is_file():
        raise StepError(f"dataset.sources[{rec.get('index', '?')}]: archive {archive} not found; "
                        "re-run the download step")
    if rec.get("bytes") is not None and archive.stat().st_size != rec["bytes"]:
        raise StepError(f"{archive}: size changed since the download step ({rec['bytes']} -> "
                        f"{archive.stat().st_size} bytes); re-run the download step")
    return archive

"""Model registry: ``models/<ds>/versions/<id>/`` keeps every trained model, ``champion.json`` names the best.

Layout (next to the train stage's own outputs, which DVC owns and which always hold the *latest* model)::

    models/<ds>/model.keras, metadata.json, ...   train stage output (latest trained, DVC-tracked)
    models/<ds>/versions/<id>/                     registered copies: model.keras, metadata.json,
                                                   threshold.json (if evaluated), version.json
    models/<ds>/champion.json                      {"version": <id>, ...}: the model to serve

A version id is ``<UTC time>-<sha256 of model.keras, 10 hex>`` (``20260101T120000Z-0123456789``); registering
the same model file twice returns the existing version. champion.json is data, not a path: a version it
names must be such an id, and its folder must resolve inside ``versions/`` (no absolute path, ``..`` or
link out of the registry). Versions are written whole (a temporary folder renamed into place) and the
champion pointer is replaced atomically, so a crash or a failed run never leaves the champion half
written or pointing at a half-copied model. Nothing here deletes a version.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from medflow.errors import StepError
from medflow.io import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

MODEL_FILES = ("model.keras", "metadata.json", "threshold.json", "history.csv")
CHAMPION = "champion.json"
VERSION_INFO = "version.json"
VERSION_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{10}")  # what register() creates


def versions_dir(model_root: Path) -> Path:
    return Path(model_root) / "versions"


def version_dir(model_root: Path, version: Any) -> Path:
    """``versions/<version>``, for a version id of this registry whose folder lies inside ``versions/``.

    Raises StepError for anything else: another form, an absolute path, ``..``, or a folder that is a link
    out of the registry.
    """
    folder = versions_dir(model_root)
    if not isinstance(version, str) or not VERSION_ID.fullmatch(version):
        raise StepError(f"{version!r} is not a version id of {folder} (<UTC time>-<10 hex>, e.g. "
                        "20260101T120000Z-0123456789)")
    path = folder / version
    if path.exists() and not path.resolve().is_relative_to(folder.resolve()):
        raise StepError(f"{path}: resolves to {path.resolve()}, outside {folder}")
    return path


def list_versions(model_root: Path) -> list[str]:
    """Registered version ids, oldest first (ids start with their UTC time); other folders are ignored."""
    folder = versions_dir(model_root)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if VERSION_ID.fullmatch(p.name) and p.is_dir() and (p / VERSION_INFO).exists())


def version_info(model_root: Path, version: str) -> dict[str, Any]:
    path = version_dir(model_root, version) / VERSION_INFO
    try:
        return dict(read_json(path))
    except FileNotFoundError:
        raise StepError(f"{path}: no such model version") from None


def find_by_sha(model_root: Path, sha256: str) -> str | None:
    """The version whose model.keras has this digest, if registered."""
    for version in list_versions(model_root):
        if version_info(model_root, version).get("model_sha256") == sha256:
            return version
    return None


def register(model_root: Path, source_dir: Path, info: dict[str, Any] | None = None) -> str:
    """Copy a trained model folder's files into a new version (or return the version already holding it)."""
    model = Path(source_dir) / "model.keras"
    if not model.is_file():
        raise StepError(f"{model}: no trained model to register (run the train stage first)")
    digest = sha256_file(model)
    existing = find_by_sha(model_root, digest)
    if existing is not None:
        log.info("registry: %s is already version %s", model, existing)
        return existing
    version = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{digest[:10]}"
    with atomic_dir(versions_dir(model_root) / version) as tmp:
        for name in MODEL_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        write_json(tmp / VERSION_INFO, {"version": version, "model_sha256": digest,
                                        "registered_at": _now(), **(info or {})})
    log.info("registry: registered %s as version %s", model, version)
    return version


def champion(model_root: Path) -> dict[str, Any] | None:
    """The champion pointer (``{"version": ..., ...}``), or None before the first promotion."""
    path = Path(model_root) / CHAMPION
    if not path.exists():
        return None
    record = dict(read_json(path))
    try:
        folder = version_dir(model_root, record.get("version"))
    except StepError as e:
        raise StepError(f"{path}: points at version {record.get('version')!r}, which is refused: {e}") from None
    if not (folder / "model.keras").is_file():
        raise StepError(f"{path}: points at version {record.get('version')!r}, which has no model.keras")
    return record


def champion_dir(model_root: Path) -> Path | None:
    """The champion's version folder (checked: a version id of this registry, inside ``versions/``), or None."""
    record = champion(model_root)
    return None if record is None else version_dir(model_root, record["version"])


def promote(model_root: Path, version: str, record: dict[str, Any] | None = None) -> None:
    """Point the champion at ``version`` (atomic replace of champion.json)."""
    if not (versions_dir(model_root) / version / "model.keras").is_file():
        raise StepError(f"cannot promote {version!r}: {versions_dir(model_root) / version} holds no model.keras")
    version_dir(model_root, version)  # a version id of this registry, not a path that happens to hold a model
    previous = champion(model_root)
    write_json(Path(model_root) / CHAMPION, {"version": version, "promoted_at": _now(),
                                             "previous": previous["version"] if previous else None,
                                             **(record or {})})
    log.info("registry: champion of %s is now %s (was %s)", model_root, version,
             previous["version"] if previous else "none")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

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

Every version's ``version.json`` keeps the sha256 of its model.keras (``model_sha256``), and the file is
checked against it wherever it is used (:func:`check_model`: the champion pointer, scoring, predict and
evaluate): a file changed or cut short since is reported as damaged (:class:`DamagedModel`) with the way
back (:data:`RECOVERY`), never loaded. ``medflow registry verify`` checks every version.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from medflow.errors import StepError
from medflow.io import atomic_dir, atomic_path, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

MODEL_FILES = ("model.keras", "metadata.json", "threshold.json", "history.csv")
CHAMPION = "champion.json"
VERSION_INFO = "version.json"
VERSION_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{10}")  # what register() creates


class DamagedModel(StepError):
    """A registered model.keras whose sha256 is not the one recorded when it was registered."""


RECOVERY = ("to recover: `medflow registry verify --model-root {root}` lists the intact versions; "
            "`medflow registry promote --model-root {root} VERSION` makes one of them champion; or retrain: "
            "the next train or retrain run restores the file if the train stage's model is that version, else "
            "promotes a valid challenger over the damaged champion")


def recovery(model_root: Path) -> str:
    """The recovery steps for a damaged version of ``model_root``'s registry."""
    return RECOVERY.format(root=model_root)


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


def model_problem(folder: Path) -> str | None:
    """Why ``folder/model.keras`` (a version folder, with its version.json) is not the registered file, or None.

    A folder without version.json (the train stage's own output) has no recorded digest: None.
    """
    folder = Path(folder)
    info_path, model = folder / VERSION_INFO, folder / "model.keras"
    if not info_path.is_file():
        return None
    expected = read_json(info_path).get("model_sha256")
    if not model.is_file():
        return f"{model}: missing"
    actual = sha256_file(model)
    if expected != actual:
        return (f"{model}: damaged: its sha256 {actual[:12]}... is not the registered {str(expected)[:12]}... "
                f"({model.stat().st_size} bytes; changed or cut short since it was registered)")
    return None


def check_model(folder: Path) -> None:
    """Raise :class:`DamagedModel` (with the recovery steps) when :func:`model_problem` finds one."""
    problem = model_problem(folder)
    if problem is not None:
        raise DamagedModel(f"{problem}; {recovery(Path(folder).parent.parent)}")


def verify(model_root: Path) -> list[tuple[str, str | None]]:
    """Every version of the registry, oldest first, with its problem (None: intact)."""
    return [(v, model_problem(version_dir(model_root, v))) for v in list_versions(model_root)]


def restore(model_root: Path, source_dir: Path) -> str | None:
    """Rewrite a damaged version from an intact copy of the same file (``source_dir/model.keras`` with the
    registered digest, e.g. the train stage's output); the version restored, or None."""
    model = Path(source_dir) / "model.keras"
    if not model.is_file():
        return None
    version = find_by_sha(model_root, sha256_file(model))
    if version is None or model_problem(version_dir(model_root, version)) is None:
        return None
    with atomic_path(version_dir(model_root, version) / "model.keras", suffix=".keras") as tmp:
        shutil.copyfile(model, tmp)
    log.warning("registry: version %s's model.keras was damaged: restored from %s (same sha256)", version, model)
    return version


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


def champion(model_root: Path, *, verify: bool = True) -> dict[str, Any] | None:
    """The champion pointer (``{"version": ..., ...}``), or None before the first promotion.

    ``verify``: its model.keras must be the registered file (:class:`DamagedModel` otherwise, with the
    recovery steps); False gives the pointer whatever the state of its model (for a retrain that replaces it).
    """
    path = Path(model_root) / CHAMPION
    if not path.exists():
        return None
    record = dict(read_json(path))
    try:
        folder = version_dir(model_root, record.get("version"))
    except StepError as e:
        raise StepError(f"{path}: points at version {record.get('version')!r}, which is refused: {e}") from None
    if not verify:
        return record
    if not (folder / "model.keras").is_file():
        raise DamagedModel(f"{path}: points at version {record.get('version')!r}, which has no model.keras; "
                           f"{recovery(Path(model_root))}")
    problem = model_problem(folder)
    if problem is not None:
        raise DamagedModel(f"the champion of {model_root} (version {record['version']}) is damaged: {problem}; "
                           f"{recovery(Path(model_root))}")
    return record


def champion_dir(model_root: Path) -> Path | None:
    """The champion's version folder (checked: a version id of this registry, inside ``versions/``, and its
    model.keras the registered file), or None."""
    record = champion(model_root)
    return None if record is None else version_dir(model_root, record["version"])


def promote(model_root: Path, version: str, record: dict[str, Any] | None = None) -> None:
    """Point the champion at ``version`` (atomic replace of champion.json); it must be intact."""
    if not (versions_dir(model_root) / version / "model.keras").is_file():
        raise StepError(f"cannot promote {version!r}: {versions_dir(model_root) / version} holds no model.keras")
    folder = version_dir(model_root, version)  # a version id of this registry, not a path that holds a model
    problem = model_problem(folder)
    if problem is not None:
        raise DamagedModel(f"cannot promote {version!r}: {problem}")
    previous = champion(model_root, verify=False)  # the one replaced may be damaged
    write_json(Path(model_root) / CHAMPION, {"version": version, "promoted_at": _now(),
                                             "previous": previous["version"] if previous else None,
                                             **(record or {})})
    log.info("registry: champion of %s is now %s (was %s)", model_root, version,
             previous["version"] if previous else "none")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

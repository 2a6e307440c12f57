"""Retraining logic (no Prefect here): source fingerprints, champion/challenger decision, lock.

- :func:`source_fingerprint`: what the pipeline reads as its source (the ``dataset.sources`` params and the
  name, size and modification time of every file in ``data/inbox/<ds>/`` and in the local folders that
  ``dataset.sources`` lists, symlinked folders followed: the download step's own walk,
  :mod:`medflow.data.walk`). Unchanged fingerprint = nothing new to train on; it is a stat walk, so the check
  takes milliseconds even for large inboxes.
- :func:`decide`: never promote a challenger that does not beat chance on val (the chance guard); else
  promote it only when it is *not worse* than the champion beyond
  ``retrain.tolerance`` in test ROC AUC, shown by a paired bootstrap on the same test images: the lower
  bound of the interval of AUC(challenger) - AUC(champion) must be >= -tolerance (non-inferiority). A small
  test split gives a wide interval, and then even a good challenger is kept out: the champion only changes
  on evidence.
- :func:`dataset_lock`: one run per project and dataset at a time; a second run waits for it or is skipped,
  and never writes outputs concurrently. The lock is ``filelock.FileLock``: an exclusive ``flock`` on
  ``.dvc/tmp/medflow/<ds>.lock`` that the kernel drops when the holder exits or is killed, with the
  library's timeout and polling for "wait" and a single non-blocking try for "skip" (its ``Timeout``
  becomes :class:`Busy`). The file stays in place and names the current holder.
  It covers every way in: the flows hold it around their ``dvc repro --single-item`` calls, and every stage
  command (``medflow STEP --dataset NAME``, :func:`stage_lock`) takes it too, so a manual ``dvc repro`` and a
  flow never interleave. The holder passes a token to its children (``$MEDFLOW_LOCK_<ds>``, also written in
  the lock file): a stage a flow runs proceeds under its flow's lock. A stage run by a manual ``dvc repro``
  records that dvc process in the file, and the lock stays its own until that dvc exits (its later stages
  proceed; a flow waits or skips), so a trigger cannot slip in between two of its stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from medflow.config import Config, RetrainConfig
from medflow.data.walk import Listing, folder_listing
from medflow.io import read_json, write_json

log = logging.getLogger(__name__)

STATE_FILE = "retrain.json"  # in models/<ds>/: the fingerprint of the last ingested source


# ---------------------------------------------------------------------------------------- fingerprint
def inbox_files(inbox: Path) -> Listing:
    """(relative path, size, mtime_ns) of every file under ``inbox``, sorted: the walk of the download and
    manifest steps (:func:`medflow.data.walk.folder_listing`: hidden files and folders skipped, symlinked
    folders followed with a loop guard), so a linked folder's files count like any other."""
    return folder_listing(Path(inbox))


def source_files(cfg: Config, project: Path) -> Listing:
    """The files of the local sources of ``dataset.sources`` (paths relative to ``project``), named
    ``dataset.sources[i]/<relative path>`` (a folder) or ``dataset.sources[i]`` (an archive), sorted."""
    out: Listing = []
    for i, src in enumerate(cfg.dataset.sources):
        if src.is_remote:
            continue  # its url and sha256 are in the fingerprint; download re-verifies the file
        path = Path(project) / Path(src.url).expanduser()
        if path.is_dir():
            out += [(f"dataset.sources[{i}]/{rel}", size, mtime) for rel, size, mtime in folder_listing(path)]
        elif path.exists():
            st = path.stat()
            out.append((f"dataset.sources[{i}]", st.st_size, st.st_mtime_ns))
    return sorted(out)


def project_of(inbox: Path) -> Path:
    """The project an inbox belongs to (the nearest folder above it with dvc.yaml), else the working directory:
    what relative paths of ``dataset.sources`` are relative to (DVC runs the steps there)."""
    here = Path(os.path.abspath(inbox))
    return next((p for p in here.parents if (p / "dvc.yaml").is_file()), Path.cwd())


def source_fingerprint(cfg: Config, inbox: Path, listing: Listing | None = None,
                       sources: Listing | None = None) -> str:
    """sha256 over the configured sources, the inbox listing and the listing of the local sources
    (names, sizes, mtimes; :func:`inbox_files` and :func:`source_files`, read if not given)."""
    h = hashlib.sha256()
    h.update(json.dumps([s.model_dump() for s in cfg.dataset.sources], sort_keys=True).encode())
    if sources is None:
        sources = source_files(cfg, project_of(inbox))
    for rel, size, mtime in [*(inbox_files(inbox) if listing is None else listing), *sources]:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _last_ingestion(model_root: Path) -> dict[str, Any]:
    """What :func:`record_fingerprint` wrote last ({} before the first ingestion)."""
    path = Path(model_root) / STATE_FILE
    return dict(read_json(path)) if path.exists() else {}


def last_fingerprint(model_root: Path) -> str | None:
    fingerprint = _last_ingestion(model_root).get("fingerprint")
    return None if fingerprint is None else str(fingerprint)


def record_fingerprint(model_root: Path, fingerprint: str, *, files: Iterable[str] | None = None,
                       **extra: Any) -> None:
    """Record what was ingested: the source fingerprint and (when given) the inbox files it covered."""
    state = {"fingerprint": fingerprint, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    if files is not None:
        state["inbox_files"] = sorted(files)
    write_json(Path(model_root) / STATE_FILE, state)


def ingested_files(model_root: Path) -> set[str] | None:
    """The inbox files (relative paths) of the last ingestion; None when not recorded."""
    files = _last_ingestion(model_root).get("inbox_files")
    return None if files is None else set(files)


# ------------------------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class Decision:
    """The champion/challenger verdict and the evidence for it (written as JSON and as a Prefect artifact)."""

    promote: bool
    reason: str
    challenger: str
    champion: str | None
    tolerance: float
    n_test: int = 0
    difference: dict[str, float] = field(default_factory=dict)  # AUC new - old: point, low, high, p_worse
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    chance: dict[str, Any] = field(default_factory=dict)  # the challenger's chance verdict on val, if checked

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def headline_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Test ROC AUC, sensitivity, specificity and accuracy of one model (threshold from its threshold.json)."""
    from medflow.evaluation.metrics import point_metrics

    m = point_metrics(np.asarray(y), np.asarray(p), threshold)
    keep = ("roc_auc", "pr_auc", "sensitivity", "specificity", "accuracy")
    return {"threshold": float(threshold), **{k: float(m[k]) for k in keep if k in m}}


def decide(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray | None, cfg: RetrainConfig, *, challenger: str,
           champion: str | None, thresholds: tuple[float, float] = (0.5, 0.5),
           groups: np.ndarray | None = None, chance: dict[str, Any] | None = None) -> Decision:
    """Promote ``challenger`` iff it beats chance on val (``chance``, the verdict of
    :mod:`medflow.evaluation.chance`) and there is no champion, or the paired-bootstrap lower bound of
    AUC(new) - AUC(old) on the same test images is >= -tolerance. A model at chance is never promoted,
    even where there is no champion: no model is better than a useless one."""
    decision = _compare(y, p_new, p_old, cfg, challenger=challenger, champion=champion, thresholds=thresholds,
                        groups=groups)
    if chance and chance.get("at_chance"):
        return replace(decision, promote=False, reason=f"not promoted: {chance.get('summary', 'at chance on val')}",
                       chance=chance)
    return replace(decision, chance=chance or {})


def _compare(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray | None, cfg: RetrainConfig, *, challenger: str,
             champion: str | None, thresholds: tuple[float, float], groups: np.ndarray | None) -> Decision:
    """The champion/challenger comparison alone (see :func:`decide`)."""
    new_metrics = headline_metrics(y, p_new, thresholds[0])
    if p_old is None or champion is None:
        return Decision(True, "no champion yet: the first model becomes champion", challenger, None,
                        cfg.tolerance, len(y), {}, new_metrics, {})
    from medflow.evaluation.metrics import paired_bootstrap

    diff = paired_bootstrap(np.asarray(y), np.asarray(p_new), np.asarray(p_old), metric="roc_auc",
                            n=cfg.bootstrap, seed=cfg.seed, confidence=cfg.confidence, groups=groups)
    old_metrics = headline_metrics(y, p_old, thresholds[1])
    low = diff["low"]
    promote = bool(np.isfinite(low) and low >= -cfg.tolerance)
    interval = f"AUC difference {diff['point']:+.4f} ({cfg.confidence:.0%} CI {low:+.4f} to {diff['high']:+.4f})"
    reason = (f"promoted: not worse beyond tolerance {cfg.tolerance:g}: {interval}" if promote else
              f"kept champion: challenger may be worse beyond tolerance {cfg.tolerance:g}: {interval}")
    return Decision(promote, reason, challenger, champion, cfg.tolerance, len(y),
                    {k: float(v) for k, v in diff.items()}, new_metrics, old_metrics)


def read_threshold(model_dir: Path) -> float:
    """The model's operating threshold (threshold.json of the evaluate stage), 0.5 when it has none."""
    path = Path(model_dir) / "threshold.json"
    if not path.exists():
        return 0.5
    data = read_json(path)
    value = data.get("threshold") if isinstance(data, dict) else data
    return float(value) if isinstance(value, int | float) else 0.5


# ----------------------------------------------------------------------------------------------- lock
class Busy(RuntimeError):
    """Another run holds the dataset's lock."""


def lock_path(project: Path, dataset: str) -> Path:
    """Lock file of a project and dataset, under ``.dvc/tmp`` (ignored by git and DVC)."""
    return Path(project) / ".dvc" / "tmp" / "medflow" / f"{dataset}.lock"


TOKEN_ENV = "MEDFLOW_LOCK_"  # + dataset: the token a holder passes to its children (the stages it runs)


@contextlib.contextmanager
def dataset_lock(project: Path, dataset: str, *, wait: bool, timeout_s: float = 24 * 3600,
                 poll_s: float = 1.0) -> Iterator[Path]:
    """Hold the exclusive lock of ``dataset`` in ``project`` for the block.

    ``wait=False``: raise :class:`Busy` at once when another process holds it. ``wait=True``: poll every
    ``poll_s`` until it is free, raising Busy after ``timeout_s``. The lock is a kernel ``flock``, so the OS
    releases it when the holder dies (even by SIGKILL): a killed run never leaves a stale lock behind. It is
    also busy while a ``dvc repro`` whose stage held it last is still running (see the module docstring).
    While held, ``$MEDFLOW_LOCK_<dataset>`` carries the holder's token to its children (:func:`stage_lock`).
    """
    path = lock_path(project, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    token, deadline = secrets.token_hex(8), time.monotonic() + timeout_s
    refused: list[str] = []
    while True:
        refused.clear()
        # on_acquired also keeps filelock on flock: it never falls back to a marker file a crash would leave.
        lock = FileLock(path, timeout=max(0.0, deadline - time.monotonic()) if wait else 0, blocking=wait,
                        poll_interval=poll_s, on_acquired=lambda fd: _claim(fd, token, refused))
        try:
            lock.acquire()
        except Timeout:
            raise Busy(f"another run holds {path} ({_holder(path)})") from None
        if not refused:
            break
        lock.release()
        if not wait or time.monotonic() >= deadline:
            raise Busy(f"another run holds {path} ({refused[0]})")
        time.sleep(poll_s)
    env, before = TOKEN_ENV + dataset, os.environ.get(TOKEN_ENV + dataset)
    os.environ[env] = token
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = before
        lock.release()


@contextlib.contextmanager
def stage_lock(project: Path, dataset: str) -> Iterator[Path]:
    """The lock for one stage command: none needed under the flow (or stage) that holds it and passed its
    token down; else taken without waiting (:class:`Busy` names the holder)."""
    path = lock_path(project, dataset)
    token = os.environ.get(TOKEN_ENV + dataset)
    if token and _read_holder(path).get("token") == token and _locked(path):
        log.debug("%s: held by our parent run (%s)", path, _holder(path))
        yield path
        return
    with dataset_lock(project, dataset, wait=False) as held:
        yield held


def _claim(fd: int, token: str, refused: list[str]) -> None:
    """On acquiring the flock: refuse it (``refused`` gets the reason) while the dvc repro that held it last
    still runs and is not ours; else write who holds it now into the (locked) lock file."""
    previous = _parse_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
    dvc_pid = previous.get("dvc_pid")
    if isinstance(dvc_pid, int) and dvc_pid not in _ancestors() and _is_dvc(dvc_pid):
        refused.append(f"dvc pid {dvc_pid} is still running the stages of {_describe(previous)}")
        return
    holder = {"pid": os.getpid(), "cmd": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
              "since": time.strftime("%H:%M:%S"), "token": token}
    if os.environ.get("DVC_STAGE"):  # a stage command DVC runs: the lock stays with that dvc until it exits
        holder["dvc_pid"] = next((p for p in _ancestors() if _is_dvc(p)), None)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _ancestors() -> list[int]:
    """This process's parent, grandparent, ... (Linux /proc; empty elsewhere)."""
    out: list[int] = []
    pid = os.getppid()
    while pid > 1 and len(out) < 64:
        out.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _is_dvc(pid: int) -> bool:
    """Whether ``pid`` is a running dvc (``dvc ...`` or ``python .../bin/dvc ...``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:2])


def _locked(path: Path) -> bool:
    """Whether some process holds the flock of ``path`` now."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the flock if we got it
    return False


def _parse_holder(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return _parse_holder(path.read_text())
    except OSError:
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "unknown holder"
    inside = f", inside dvc pid {holder['dvc_pid']}" if holder.get("dvc_pid") else ""
    return f"pid {holder['pid']} ({holder.get('cmd', '?')}) since {holder.get('since', '?')}{inside}"


def _holder(path: Path) -> str:
    return _describe(_read_holder(path))


def write_decision(path: Path, decision: Decision) -> None:
    write_json(path, decision.as_dict())

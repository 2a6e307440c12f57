"""DVC side of orchestration: the stage list (read from dvc.yaml) and running one stage through DVC.

No Prefect here. DVC owns caching: every stage runs as ``dvc repro --single-item <stage>``, which runs the
exact ``medflow <step>`` command written in dvc.yaml, skips a stage whose deps, params and outs are
unchanged, and records what it did in dvc.lock. So a Prefect run leaves ``dvc status`` clean, and a Prefect
run after ``dvc repro`` recomputes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DVC_YAML = "dvc.yaml"
_ERROR_LINE = re.compile(r"^(medflow \w+: error: .*|ERROR: .*)$", re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^((?:\w+\.)*\w*(?:Error|Exception|Interrupt)\b.*)$", re.MULTILINE)


class StageFailed(RuntimeError):
    """A DVC stage failed; the message carries the step's own error line (e.g. the failed expectations)."""


@dataclass(frozen=True)
class StageResult:
    """What one ``dvc repro --single-item`` did: ran the stage or found it up to date, and how long it took."""

    stage: str
    ran: bool
    seconds: float
    output: str


def _dep_paths(spec: dict[str, Any], key: str) -> list[str]:
    """Paths of a stage's deps or outs (entries are strings or one-key mappings with options)."""
    paths = []
    for entry in spec.get(key) or []:
        paths.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return [p.split("#")[0].strip().rstrip("/") for p in paths]


def _outputs(spec: dict[str, Any]) -> list[str]:
    return [p for key in ("outs", "metrics", "plots") for p in _dep_paths(spec, key)]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def stage_order(project: Path) -> list[str]:
    """Stage names of ``project/dvc.yaml`` in dependency order (file order among independent stages).

    Read from the file rather than hard-coded, so stages added later (e.g. ``evaluate``) join the flows
    by themselves. A stage depends on another when one of its deps lies in (or is) one of the other's outs.
    """
    return stage_graph(project)[0]


def stage_graph(project: Path) -> tuple[list[str], dict[str, set[str]]]:
    """(stages in dependency order, stage -> the stages it directly depends on)."""
    path = Path(project) / DVC_YAML
    try:
        stages: dict[str, dict[str, Any]] = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except FileNotFoundError:
        raise StageFailed(f"{path}: not found; is {project} a medflow project?") from None
    outs = {name: _outputs(spec) for name, spec in stages.items()}
    needs = {name: {other for dep in _dep_paths(spec, "deps") for other, o in outs.items()
                    if other != name and any(_under(dep, out) or _under(out, dep) for out in o)}
             for name, spec in stages.items()}
    return _toposort(list(stages), needs, path), needs


def stale_stages(project: Path) -> set[str] | None:
    """Stages ``dvc status`` reports as changed (deps, params or outs), or None when it cannot tell.

    One DVC start-up for the whole pipeline instead of one per stage: the flows run only these stages
    and those downstream of them through ``dvc repro``; the rest are up to date by DVC's own account.
    """
    code, output = dvc(project, "status", "--json")
    start = output.find("{")
    if code != 0 or start < 0:
        return None
    try:
        report = json.loads(output[start:output.rfind("}") + 1])
    except json.JSONDecodeError:
        return None
    return {str(name).rsplit(":", 1)[-1] for name in report}


def plan(project: Path) -> list[tuple[str, bool]]:
    """(stage, must_check) in dependency order: a stage must go through ``dvc repro`` when ``dvc status``
    reports it changed or any stage it depends on (transitively) must; every stage does when status fails."""
    order, needs = stage_graph(project)
    stale = stale_stages(project)
    check: set[str] = set()
    for name in order:
        if stale is None or name in stale or needs[name] & check:
            check.add(name)
    return [(name, name in check) for name in order]


def _toposort(names: list[str], needs: dict[str, set[str]], path: Path) -> list[str]:
    order: list[str] = []
    pending = list(names)
    while pending:
        ready = next((n for n in pending if needs[n] <= set(order)), None)
        if ready is None:
            raise StageFailed(f"{path}: stages {pending} depend on each other in a cycle")
        order.append(ready)
        pending.remove(ready)
    return order


def stage_flags(project: Path, dataset: str) -> dict[str, dict[str, Path]]:
    """Per ``medflow`` step (the word after ``medflow`` in a stage's cmd), its ``--flag path`` arguments.

    Paths are written once, in dvc.yaml; the flows read them from there (``${dataset.name}`` filled in)
    instead of repeating them. Relative paths are resolved against ``project``.
    """
    path = Path(project) / DVC_YAML
    stages: dict[str, dict[str, Any]] = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    out: dict[str, dict[str, Path]] = {}
    for name, spec in stages.items():
        words = shlex.split(str(spec.get("cmd", "")).replace("${dataset.name}", dataset))
        if len(words) < 2 or words[0] != "medflow":
            continue
        flags = {w: Path(project) / v for w, v in zip(words[2:], words[3:], strict=False) if w.startswith("--")}
        out[words[1]] = flags
        out.setdefault(f"stage:{name}", flags)
    return out


def dvc_executable() -> str:
    """The ``dvc`` of this environment (beside the running interpreter), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def _env() -> dict[str, str]:
    """Environment for DVC: this interpreter's bin folder first, so stage commands find ``medflow``."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def dvc(project: Path, *args: str, on_line: Callable[[str], None] | None = None,
        timeout_s: float | None = None) -> tuple[int, str]:
    """Run ``dvc ARGS`` in ``project``; stream each output line to ``on_line``; return (exit code, output).

    DVC runs in its own process group, so a timeout, or the flow run being cancelled or failing, kills the
    stage's command (DVC's child) too, not only DVC.
    """
    proc = subprocess.Popen([dvc_executable(), *args], cwd=project, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    lines: list[str] = []
    assert proc.stdout is not None
    watchdog = None if timeout_s is None else threading.Timer(timeout_s, _kill_group, (proc,))
    if watchdog is not None:
        watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
        code = proc.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if proc.poll() is None:  # interrupted (cancellation, Prefect timeout): take the stage down with us
            _kill_group(proc)
    if code < 0 and timeout_s is not None:
        lines.append(f"ERROR: killed after the {timeout_s:g} s timeout\n")
    return code, "".join(lines)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def repro_stage(project: Path, stage: str, on_line: Callable[[str], None] | None = None,
                timeout_s: float | None = None) -> StageResult:
    """``dvc repro --single-item STAGE``: run it if anything it depends on changed, else skip it.

    Raises StageFailed with the step's error line(s) (e.g. ``medflow validate: error: ...``) on failure.
    """
    start = time.perf_counter()
    code, output = dvc(project, "repro", "--single-item", stage, on_line=on_line, timeout_s=timeout_s)
    seconds = time.perf_counter() - start
    if code != 0:
        raise StageFailed(f"stage {stage!r} failed: {failure_reason(output)}")
    ran = f"Running stage '{stage}'" in output
    return StageResult(stage=stage, ran=ran, seconds=seconds, output=output)


def failure_reason(output: str) -> str:
    """The informative lines of a failed ``dvc repro``: the step's own error, else the exception that ended
    a traceback plus DVC's error line."""
    found = _ERROR_LINE.findall(output)
    own = [line for line in found if line.startswith("medflow ")]
    if own:
        return "; ".join(own)
    raised = _EXCEPTION_LINE.findall(output)
    lines = ([raised[-1]] if raised else []) + found
    if lines:
        return "; ".join(lines)
    return output.strip().splitlines()[-1] if output.strip() else "no output"


def status_clean(project: Path, stages: Iterable[str] = ()) -> tuple[bool, str]:
    """(True, output) when ``dvc status`` reports every stage up to date."""
    code, output = dvc(project, "status", *stages)
    return code == 0 and "up to date" in output, output

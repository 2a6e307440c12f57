"""DVC side of orchestration: the stages as DVC resolves them (per dataset) and running one through DVC.

No Prefect here. DVC owns caching: every stage runs as ``dvc repro --single-item <stage>``, which runs the
exact ``medflow <step>`` command written in dvc.yaml, skips a stage whose deps, params and outs are
unchanged, and records what it did in dvc.lock. So a Prefect run leaves ``dvc status`` clean, and a Prefect
run after ``dvc repro`` recomputes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medflow.cli import noisy_logs
from medflow.procs import kill_group

log = logging.getLogger(__name__)

DVC_YAML = "dvc.yaml"
DVC_LOCK = "dvc.lock"
# A step's error line with its indented continuation lines (validate lists one failed expectation per line).
# DVC's own ERROR keeps its indented lines and its closing paragraph: "'x' is busy, it is being blocked by:",
# "  (PID 123): dvc repro", "", "If there are no processes with such PIDs, ..." (dvc/rwlock.py).
_ERROR_LINE = re.compile(r"^(medflow \w+: error: .*(?:\n[ \t]+\S.*)*"
                         r"|ERROR: .*(?:\n[ \t]+\S.*)*(?:\n\n(?=If there are no processes)\S.*)?)$", re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^((?:\w+\.)*\w*(?:Error|Exception|Interrupt)\b.*)$", re.MULTILINE)


# What a stage's task log leaves out by default (the switch that keeps it: medflow.cli.noisy_logs).
_ANSI = r"(?:\x1b\[[0-9;]*m)*"
_DVC_EMPTY = re.compile(rf"^{_ANSI}WARNING{_ANSI}: '.*' is empty\.{_ANSI}$")  # an output folder with no file yet
TF_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "1"}  # TensorFlow's C++ INFO lines (CPU features, oneDNN banners) off

_NOT_PATHS = {"--dataset", "--params"}  # stage command options that name something other than a path


ALWAYS_CHANGED = "always changed"  # what ``dvc status`` says of an ``always_changed`` stage with nothing else new


class StageFailed(RuntimeError):
    """A DVC stage failed; the message carries the step's own error line (e.g. the failed expectations)."""


@dataclass(frozen=True)
class Stage:
    """One stage as DVC resolves it (templating and ``foreach`` applied): ``train@malaria``."""

    name: str  # the stage key DVC uses (dvc repro NAME, dvc.lock): "train@malaria"
    step: str  # the medflow command it runs ("train"), or "" for a command that is not ``medflow STEP``
    dataset: str | None  # the foreach key ("malaria"); None for a stage that is not templated per dataset
    flags: dict[str, Path]  # its command's ``--flag value`` arguments, paths resolved against the project
    needs: frozenset[str]  # the stages whose outputs it depends on (DVC's graph)


@dataclass(frozen=True)
class Planned:
    """One stage of a flow's plan: whether it must go through ``dvc repro`` and whether DVC found it stale."""

    stage: str
    check: bool  # stale, or downstream of a stage that must be checked, or always run (``always_changed``)
    stale: bool  # ``dvc status`` reported it changed before the run ("always changed" alone does not count)
    needs: frozenset[str] = frozenset()  # the stages it depends on: one that ran makes it be checked too


@dataclass(frozen=True)
class StageResult:
    """What one ``dvc repro --single-item`` did: ran the stage or found it up to date, and how long it took."""

    stage: str
    ran: bool
    seconds: float
    output: str


def pipeline(project: Path, dataset: str | None = None) -> list[Stage]:
    """The stages of ``project/dvc.yaml`` as DVC resolves them, in dependency order (file order among
    independent stages); with ``dataset``, only that dataset's (``<step>@<dataset>``).

    DVC's own index, not a reading of the YAML: ``${item}`` and the ``foreach`` over params.yaml's
    ``datasets:`` are already expanded, and the dependency graph is the one ``dvc repro`` follows. So the
    flows take every path from the stage commands DVC will run, and stages added later join by themselves.
    """
    from dvc.exceptions import CyclicGraphError, DvcException
    from dvc.repo import Repo

    path = Path(project) / DVC_YAML
    if not path.is_file():
        raise StageFailed(f"{path}: not found; is {project} a medflow project?")
    try:
        with Repo(str(project), uninitialized=True) as repo:
            resolved = [s for s in repo.index.stages if Path(s.path).resolve().parent == Path(project).resolve()]
            graph = repo.index.graph
            found = [_stage(s, {n.name for n in graph.successors(s)}, Path(project)) for s in resolved]
    except DvcException as e:
        kind = "cycle or overlap between stages" if isinstance(e, CyclicGraphError) else "cannot resolve"
        raise StageFailed(f"{path}: {kind}: {e}") from None
    by_name = {s.name: s for s in found}
    order = _toposort([s.name for s in found], {s.name: set(s.needs) for s in found}, path)
    return [by_name[n] for n in order if dataset is None or by_name[n].dataset == dataset]


def _stage(resolved: Any, needs: set[str], project: Path) -> Stage:
    words = _step_words(resolved.cmd)
    step = words[1] if len(words) >= 2 and words[0] == "medflow" else ""
    flags = {w: project / v for w, v in zip(words[2:], words[3:], strict=False)
             if w.startswith("--") and not v.startswith("--") and w not in _NOT_PATHS}
    key = str(resolved.name)
    return Stage(name=key, step=step, dataset=key.split("@", 1)[1] if "@" in key else None, flags=flags,
                 needs=frozenset(needs))


def _step_words(cmd: Any) -> list[str]:
    """The words of a stage's ``medflow STEP`` command: its cmd, or for a list of commands (the download
    stage's ``medflow preflight`` first) the last one."""
    commands = [str(c) for c in cmd] if isinstance(cmd, list) else [str(cmd or "")]
    return shlex.split(commands[-1]) if commands else []


def step_flags(stages: Iterable[Stage]) -> dict[str, dict[str, Path]]:
    """Per ``medflow`` step, its ``--flag path`` arguments (one dataset's stages: one entry per step)."""
    return {s.step: s.flags for s in stages if s.step}


def stale_stages(project: Path, names: Iterable[str] = ()) -> set[str] | None:
    """Stages ``dvc status`` reports as changed (deps, params or outs), or None when it cannot tell.

    One DVC start-up for the whole plan instead of one per stage (``names``: only these, each on its own;
    all when empty): the flows run only these stages and those downstream of them through ``dvc repro``;
    the rest are up to date by DVC's own account. A stage reported only as "always changed" (dvc.yaml
    ``always_changed``: download, which lists the inbox each time) is not stale: see :func:`plan`.
    """
    report = _status(project, names)
    return None if report is None else {name for name, why in report.items() if why != [ALWAYS_CHANGED]}


def _status(project: Path, names: Iterable[str]) -> dict[str, Any] | None:
    """``dvc status --json`` by stage name (``download@malaria``), or None when it cannot tell."""
    code, output = dvc(project, "status", "--json", *names)
    start = output.find("{")
    if code != 0 or start < 0:
        return None
    try:
        report = json.loads(output[start:output.rfind("}") + 1])
    except json.JSONDecodeError:
        return None
    return {str(name).rsplit(":", 1)[-1]: why for name, why in report.items()}


def plan(project: Path, dataset: str | None = None) -> list[Planned]:
    """The flow's plan over the stages of ``dataset`` (all stages when None), in dependency order.

    A stage must go through ``dvc repro`` when ``dvc status`` reports it changed or any stage it depends on
    (transitively) must; every stage must when status fails. A stage DVC always runs (``always_changed``)
    goes through ``dvc repro`` too, but its dependents only when it ran (its dvc.lock entry changed), which
    the flow finds out as it goes (``Planned.needs``).
    """
    order = pipeline(project, dataset)
    report = _status(project, [s.name for s in order] if dataset is not None else [])
    stale = None if report is None else {name for name, why in report.items() if why != [ALWAYS_CHANGED]}
    always = set() if report is None or stale is None else set(report) - stale
    check: set[str] = set()
    for s in order:
        if stale is None or s.name in stale or s.needs & check:
            check.add(s.name)
    return [Planned(s.name, s.name in check or s.name in always, stale is not None and s.name in stale, s.needs)
            for s in order]


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


def lock_entry(project: Path, stage: str) -> dict[str, Any] | None:
    """The stage's record in dvc.lock (cmd, deps, params and outs with their hashes), or None if absent.

    DVC rewrites it whenever it runs the stage, so comparing it before and after ``dvc repro`` tells
    whether the stage ran.
    """
    try:
        lock = yaml.safe_load((Path(project) / DVC_LOCK).read_text()) or {}
    except FileNotFoundError:
        return None
    entry = (lock.get("stages") or {}).get(stage)
    return entry if isinstance(entry, dict) else None


def dvc_executable() -> str:
    """The ``dvc`` of this environment (beside the running interpreter), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def is_noise(line: str) -> bool:
    """A line of a stage's output that its task log leaves out by default: DVC's warning that an output
    folder is empty (repeated on every run of a stage with an empty rejects or cache folder)."""
    return not noisy_logs() and bool(_DVC_EMPTY.match(line.strip()))


def _env() -> dict[str, str]:
    """Environment for DVC and the stage commands it runs: this interpreter's bin folder first, so they find
    ``medflow``; TensorFlow's C++ INFO banners off unless ``$MEDFLOW_NOISY_LOGS`` (a user's own setting wins)."""
    quiet = {} if noisy_logs() else TF_QUIET
    return {**quiet, **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


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
    watchdog = None if timeout_s is None else threading.Timer(timeout_s, kill_group, (proc,))
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
            kill_group(proc)
    if code < 0 and timeout_s is not None:
        lines.append(f"ERROR: killed after the {timeout_s:g} s timeout\n")
    return code, "".join(lines)


def repro_stage(project: Path, stage: str, *, stale: bool = False, on_line: Callable[[str], None] | None = None,
                timeout_s: float | None = None) -> StageResult:
    """``dvc repro --single-item STAGE``: run it if anything it depends on changed, else skip it.

    Whether it ran comes from DVC, not its console text: ``dvc status`` found it stale before (``stale``,
    from the flow's plan), or its dvc.lock entry changed. Raises StageFailed with the step's error line(s)
    (e.g. ``medflow validate: error: ...``) on failure.
    """
    before = lock_entry(project, stage)
    start = time.perf_counter()
    code, output = dvc(project, "repro", "--single-item", stage, on_line=on_line, timeout_s=timeout_s)
    seconds = time.perf_counter() - start
    if code != 0:
        raise StageFailed(f"stage {stage!r} failed: {failure_reason(output)}")
    ran = stale or lock_entry(project, stage) != before
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

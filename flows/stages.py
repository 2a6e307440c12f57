"""DVC side of orchestration: the stages as DVC resolves them (per dataset) and running them through DVC.

No Prefect here. DVC owns caching: a flow runs its stages as one ``dvc repro --single-item S1 S2 ...`` (one
DVC start-up for the whole run, see :class:`Repro`), which runs the exact ``medflow <step>`` command written in
dvc.yaml for each stage in turn, skips a stage whose deps, params and outs are unchanged, and records what it
did in dvc.lock. So a Prefect run leaves ``dvc status`` clean, and a Prefect run after ``dvc repro``
recomputes nothing. Its output is read stage by stage (DVC's ``Running stage 'x'`` and ``Stage 'x' didn't
change`` lines), so each stage still has its own Prefect task, log, timing and failure message.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
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
    always_changed: bool = False  # dvc.yaml ``always_changed``: DVC runs it on every repro (download)


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
                 needs=frozenset(needs), always_changed=bool(resolved.always_changed))


def _step_words(cmd: Any) -> list[str]:
    """The words of a stage's ``medflow STEP`` command: its cmd, or for a list of commands (the download
    stage's ``medflow preflight`` first) the last one."""
    commands = [str(c) for c in cmd] if isinstance(cmd, list) else [str(cmd or "")]
    return shlex.split(commands[-1]) if commands else []


def step_flags(stages: Iterable[Stage]) -> dict[str, dict[str, Path]]:
    """Per ``medflow`` step, its ``--flag path`` arguments (one dataset's stages: one entry per step)."""
    return {s.step: s.flags for s in stages if s.step}


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


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for DVC and the stage commands it runs: this interpreter's bin folder first, so they find
    ``medflow``; TensorFlow's C++ INFO banners off unless ``$MEDFLOW_NOISY_LOGS`` (a user's own setting wins);
    then ``extra`` (the flow run's Dask scheduler, for one)."""
    quiet = {} if noisy_logs() else TF_QUIET
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**quiet, **os.environ, "PATH": path, **(extra or {})}


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


def repro_stage(project: Path, stage: str, *, always_changed: bool = False,
                on_line: Callable[[str], None] | None = None, timeout_s: float | None = None) -> StageResult:
    """``dvc repro --single-item STAGE``: run it if anything it depends on changed, else skip it (one stage's
    :class:`Repro`). Raises StageFailed with the step's error line(s) on failure."""
    with Repro(project, [stage], always_changed={stage} if always_changed else set()) as repro:
        return repro.stage(stage, on_line=on_line, timeout_s=timeout_s)


# DVC's first line for each stage of a repro: "Running stage 'x':", "Stage 'x' didn't change, skipping" or
# "Stage 'x' is cached - skipping run, checking out outputs" (dvc/stage/__init__.py).
_STAGE_HEADER = re.compile(r"^(Running stage|Stage) '([^']+)'")
_LOCK_WRITTEN = ("Updating lock file", "Generating lock file")  # DVC's line when a stage's record changed
_Line = tuple[float, str | None]  # (when it was read, the line; None at the end of DVC's output)


class Repro:
    """One ``dvc repro --single-item S1 ... Sn`` over a run of stages, read stage by stage.

    DVC starts once for all of them (its start-up, about 1.2 s a process, was paid per stage), runs them in
    the order given, each skipped when unchanged, and stops at the first failure. :meth:`stage` hands out
    each stage's share of the output (from its header line to the next stage's) and whether it ran, in
    order, so each stage stays its own Prefect task. A reader thread keeps DVC's output flowing while the
    caller is busy between stages. Asked for a stage it is not at (a retry after a failure), it starts a new
    DVC for that stage and those after it. DVC runs in its own process group: leaving the ``with`` block
    kills what is still running (the flow failed, was cancelled or timed out).
    """

    def __init__(self, project: Path, names: Iterable[str], always_changed: Iterable[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        self.project = Path(project)
        self.names = list(names)
        self.always = set(always_changed)
        self.env = dict(env or {})  # added to DVC's environment (and so its stages')
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.SimpleQueue[_Line] = queue.SimpleQueue()
        self._pending: list[str] = []  # the stages the running DVC has yet to reach, in its order
        self._next: _Line | None = None  # a header line read ahead: the start of the next stage's share

    def __enter__(self) -> Repro:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the DVC process group if it is still running."""
        if self._proc is not None and self._proc.poll() is None:
            kill_group(self._proc)
            self._proc.wait()
        self._proc = None

    def _start(self, names: list[str]) -> None:
        self.close()
        self._pending, self._next, self._lines = list(names), None, queue.SimpleQueue()
        self._proc = subprocess.Popen([dvc_executable(), "repro", "--single-item", *names], cwd=self.project,
                                      env=_env(self.env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      bufsize=1, start_new_session=True)
        threading.Thread(target=_pump, args=(self._proc, self._lines), daemon=True).start()

    def stage(self, name: str, *, on_line: Callable[[str], None] | None = None,
              timeout_s: float | None = None) -> StageResult:
        """Stage ``name``'s share of the run: its output streamed to ``on_line``, whether it ran, its seconds.

        Whether it ran comes from DVC's account of it: DVC ran it ("Running stage"), and for a stage DVC runs
        every time (``always_changed``: download) only when that changed its dvc.lock record ("Updating lock
        file"); "didn't change, skipping" and "is cached" (outputs restored from DVC's run cache) did not run.
        The lines are read, not dvc.lock itself, which DVC may be rewriting for the next stage meanwhile.
        Raises StageFailed with the step's error line(s) (e.g. ``medflow validate: error: ...``) when DVC
        failed in it, or ``timeout_s`` passed (DVC and the step are killed).
        """
        if self._proc is None or not self._pending or self._pending[0] != name:
            self._start(self.names[self.names.index(name):] if name in self.names else [name])
        proc = self._proc
        assert proc is not None
        self._pending.pop(0)
        watchdog = None if timeout_s is None else threading.Timer(timeout_s, kill_group, (proc,))
        if watchdog is not None:
            watchdog.start()
        try:
            start, lines, header = self._share(name, on_line)
        finally:
            if watchdog is not None:
                watchdog.cancel()
        end = time.perf_counter()
        if self._next is None:  # DVC's output ended in this stage: it finished or failed here
            code = proc.wait()
            self._pending = []
            if code < 0 and timeout_s is not None:
                lines.append(f"ERROR: killed after the {timeout_s:g} s timeout\n")
            if code != 0:
                raise StageFailed(f"stage {name!r} failed: {failure_reason(''.join(lines))}")
        recorded = any(line.startswith(_LOCK_WRITTEN) for line in lines)
        ran = header == "Running stage" and (name not in self.always or recorded)
        return StageResult(stage=name, ran=ran, seconds=end - start, output="".join(lines))

    def _share(self, name: str, on_line: Callable[[str], None] | None) -> tuple[float, list[str], str]:
        """Read up to the next pending stage's header (kept for it) or the end of DVC's output:
        (when the share began, its lines, DVC's header word for ``name``: "Running stage", "Stage" or "")."""
        item = self._next or self._lines.get()
        self._next = None
        start, header, lines = item[0], "", []
        while item[1] is not None:
            found = _STAGE_HEADER.match(item[1])
            if found and self._pending and found.group(2) == self._pending[0]:
                self._next = item
                break
            if found and found.group(2) == name and not header:
                header = found.group(1)
            lines.append(item[1])
            if on_line is not None:
                on_line(item[1].rstrip("\n"))
            item = self._lines.get()
        return start, lines, header


def _pump(proc: subprocess.Popen[str], lines: queue.SimpleQueue[_Line]) -> None:
    """Reader thread: every line DVC prints, with the time it came, then None at the end."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put((time.perf_counter(), line))
    lines.put((time.perf_counter(), None))


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

"""Prefect tasks shared by the train and retrain flows: DVC stages, champion/challenger, artifacts.

Thin wrappers: the logic lives in ``flows/stages.py`` (DVC), ``medflow.lifecycle.retrain`` and
``medflow.lifecycle.registry``. Each DVC stage (``train@malaria``) is one Prefect task named after it, with
its step's timeout, and (download only) retries with exponential backoff; every line the stage prints goes
to the task's log in the Prefect UI.
"""

from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from flows import stages
from medflow.catalog import preflight
from medflow.config import Config, ConfigError, load_config
from medflow.evaluation.metrics import LABELS, ci_level
from medflow.evaluation.pseudonym import pseudonymizer
from medflow.io import display_path, read_json
from medflow.lifecycle import registry
from medflow.lifecycle.challenge import challenge as challenge_champion
from medflow.lifecycle.retrain import inbox_files, last_fingerprint, source_fingerprint

DEFAULT_TIMEOUT_S = 4 * 3600
STAGE_TIMEOUT_S = {"download": 12 * 3600, "train": 48 * 3600}  # per step; the rest get DEFAULT_TIMEOUT_S
STAGE_RETRIES = {"download": 3}  # network: retried after 10, 20, 40 s (+-50% jitter); others are deterministic
DASK_STEPS = frozenset({"filter", "resize"})  # the steps that decode on a flow run's Dask cluster, when it has one
MAX_TABLE_ROWS = 500
LOG_TAIL_LINES = 40  # of a failed stage's log, in its failure artifact


@dataclass(frozen=True)
class Project:
    """A medflow checkout and one dataset of its catalog: its config and its stages as DVC resolves them."""

    root: Path
    dataset: str
    cfg: Config
    stages: tuple[stages.Stage, ...]  # this dataset's, in dependency order ("download@<dataset>", ...)

    def path(self, step: str, flag: str) -> Path:
        """The path ``flag`` of the dataset's ``medflow STEP`` stage, as written in dvc.yaml (``${item}`` filled)."""
        for stage in self.stages:
            if stage.step == step and flag in stage.flags:
                return stage.flags[flag]
        raise RuntimeError(f"{self.root / 'dvc.yaml'}: no 'medflow {step}' stage for {self.dataset} with {flag}")

    @property
    def model_root(self) -> Path:
        return self.path("train", "--model-dir")


SERVED_PROJECT_ENV = "MEDFLOW_SERVED_PROJECT"  # set by ``medflow serve``: the one checkout its runs may open


def project_root(project_dir: str | None) -> Path:
    """The checkout a flow run works in: the parameter, ``$MEDFLOW_PROJECT`` or the working directory; under
    ``medflow serve`` (``$MEDFLOW_SERVED_PROJECT``) always the served checkout.

    A served deployment is pinned to its checkout: a run whose ``project_dir`` resolves elsewhere (anyone who
    can reach the Prefect API can set parameters) is refused here, before anything of that folder is read and
    before any DVC call. The message names the pinned checkout by its folder name only.
    """
    pinned = os.environ.get(SERVED_PROJECT_ENV)
    if not pinned:
        return Path(project_dir or os.environ.get("MEDFLOW_PROJECT") or Path.cwd()).resolve()
    root = Path(pinned).resolve()
    if project_dir and Path(project_dir).resolve() != root:
        raise ConfigError(f"project_dir {project_dir!r} refused: this deployment is pinned to the checkout "
                          f"`medflow serve` serves ({root.name}/); run `medflow serve` in the other checkout "
                          "to run its pipeline")
    return root


def open_project(project_dir: str | None, dataset: str) -> Project:
    """Resolve the project (:func:`project_root`: parameter, ``$MEDFLOW_PROJECT`` or the working directory;
    the served checkout under ``medflow serve``, which refuses any other) and one of its datasets.

    Every dataset of the catalog (params.yaml's ``datasets:``) has its own stages in the one dvc.yaml
    (``train@malaria``) and its own paths, so one checkout serves them all. An unknown dataset is a
    ConfigError listing the catalog. Pre-flight: every name of params.yaml's ``datasets:`` and of the catalog
    is checked before DVC resolves dvc.yaml with them (a hostile name is a ConfigError naming the entry).
    """
    root = project_root(project_dir)
    preflight(root / "params.yaml")
    cfg = load_config(root / "params.yaml", dataset)
    found = tuple(stages.pipeline(root, dataset))
    if not found:
        raise stages.StageFailed(f"{root / 'dvc.yaml'}: no stage for dataset {dataset!r} (dvc.yaml's stages run "
                                 "foreach: ${datasets}, the list in params.yaml)")
    return Project(root=root, dataset=dataset, cfg=cfg, stages=found)


def dask_runner(address: str | None = None, n_workers: int | None = None) -> Any:
    """prefect-dask's DaskTaskRunner for the train and retrain flows (README, "Dask"): with ``address``, an existing
    cluster's scheduler; else a LocalCluster of ``n_workers`` single-threaded worker processes (default: one
    per core) that the flow run starts when its first filter or resize stage runs and closes when it ends.

    ``train_flow.with_options(task_runner=dask_runner(n_workers=4))(dataset="malaria")``. The stages stay
    ``dvc repro`` subprocesses of the flow run (DVC owns caching and dvc.lock): the cluster decodes their images,
    its address passed to them as ``$DASK_SCHEDULER_ADDRESS`` (:func:`run_dask_address`). A LocalCluster's worker
    processes are the flow run's children and exit with it (distributed's own parent watch); an existing cluster
    belongs to whoever started it.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def run_dask_address() -> str | None:
    """The scheduler address of this flow run's DaskTaskRunner (its cluster started on first use), else None."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner: Any = ctx.task_runner if ctx is not None else None
    if type(runner).__name__ != "DaskTaskRunner":  # prefect_dask is not imported unless a flow run uses it
        return None
    return str(runner.client.scheduler.address)


@task(name="dvc-stage", cache_policy=NO_CACHE)  # DVC owns caching
def run_stage(project: str, stage: str, repro: stages.Repro | None = None) -> dict[str, Any]:
    """Stage ``stage`` of the flow's ``dvc repro`` (``repro``: one DVC process for the run's stages, see
    :class:`flows.stages.Repro`; None: a ``dvc repro --single-item STAGE`` of its own); its output goes to this
    task's log, and a failure posts the stage, its message and the tail of its log as an artifact."""
    logger = get_run_logger()
    step = stage.split("@", 1)[0]
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)

    def on_line(line: str) -> None:
        tail.append(line)
        if not stages.is_noise(line):  # DVC's "is empty" warnings (README, "Logs": $MEDFLOW_NOISY_LOGS keeps them)
            logger.info(line)

    timeout_s = STAGE_TIMEOUT_S.get(step, DEFAULT_TIMEOUT_S)
    try:
        if repro is None:
            result = stages.repro_stage(Path(project), stage, on_line=on_line, timeout_s=timeout_s)
        else:
            result = repro.stage(stage, on_line=on_line, timeout_s=timeout_s)
    except stages.StageFailed as e:
        post_failure(stage, str(e), list(tail))
        raise
    logger.info("stage %s %s in %.1f s", stage, "ran" if result.ran else "was up to date (skipped)",
                result.seconds)
    return {"stage": stage, "ran": result.ran, "seconds": round(result.seconds, 2)}


def post_failure(stage: str, message: str, tail: list[str]) -> None:
    """Markdown artifact of a failed stage: which one, DVC's and medflow's message, and the tail of its log."""
    dataset = stage.split("@", 1)[-1]
    body = "\n".join([f"# Failed: {stage}", "", "## Message", "", "```text", message.strip(), "```", "",
                      f"## The last {len(tail)} lines of its log", "", "```text", *tail, "```"])
    create_markdown_artifact(body, key=f"{artifact_key(dataset)}-failure",
                             description=f"{stage} failed: {message.strip().splitlines()[0][:200] if message else ''}")


def artifact_key(dataset: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes: a dataset name with its ``_`` as ``-``."""
    return dataset.replace("_", "-")


def stage_task(stage: str) -> Any:
    """The Prefect task for one DVC stage (``train@malaria``): readable name, the step's timeout and
    (download) retries with backoff."""
    step = stage.split("@", 1)[0]
    retries = STAGE_RETRIES.get(step, 0)
    options: dict[str, Any] = {"retries": retries}
    if retries:
        options.update(retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5)
    return run_stage.with_options(name=stage, task_run_name=stage,
                                  timeout_seconds=STAGE_TIMEOUT_S.get(step, DEFAULT_TIMEOUT_S) + 60, **options)


@task(name="fingerprint-source", task_run_name="fingerprint-source", cache_policy=NO_CACHE)
def fingerprint(project: Project) -> dict[str, Any]:
    """The source fingerprint now and at the last ingestion, and the inbox files it covers (both flows record
    what they ingested, so the watcher counts new files against the last run of either)."""
    inbox = project.path("download", "--inbox")
    listing = inbox_files(inbox)  # one walk: the fingerprint and the recorded files agree
    return {"now": source_fingerprint(project.cfg, inbox, listing), "last": last_fingerprint(project.model_root),
            "files": [rel for rel, _, _ in listing]}


def has_data(project: Project, fp: dict[str, Any]) -> bool:
    """Whether the dataset has anything to ingest: a configured source or a file in its inbox."""
    return bool(project.cfg.dataset.sources or fp["files"])


def outcome(name: str, message: str, data: dict[str, Any]) -> State:
    """A Completed state named for what happened (the runs list tells "Promoted", "Kept champion", "No new data",
    "No data" and "Skipped: busy" apart), with the message and the run's summary dict as its result."""
    return Completed(name=name, message=message, data=data)


@task(name="champion-vs-challenger", task_run_name="champion-vs-challenger", cache_policy=NO_CACHE)
def challenge(project: Project, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register the trained model; score it and the champion on the same test split; promote if not worse.

    The procedure is :func:`medflow.lifecycle.challenge.challenge`, run on the train stage's model folder,
    images and split; the champion pointer is written last and only on promotion.
    """
    return challenge_champion(project.model_root, project.path("train", "--images"),
                              project.path("train", "--split"), project.cfg, info, log=get_run_logger())


# ------------------------------------------------------------------------------------------ artifacts
def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else "n/a" if v is None else str(v)


TEST_METRICS = ("roc_auc", "pr_auc", "sensitivity", "specificity", "balanced_accuracy", "brier")  # the summary's
DECISION_METRICS = {"threshold": "Threshold", **LABELS}
REPORT_ARTIFACT_MAX = 100_000  # characters of the evaluate stage's summary.md posted as the report artifact
_LINK = re.compile(r"(?<!\\)\[([^\]\\]+)\]\(([^)\s]+)\)")  # [text](target), not an escaped \[


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """The evaluate stage's test metrics (details.json, else metrics.json) as a 3-column Markdown table:
    metric, value, confidence interval; 3 decimals."""
    test: dict[str, Any] = metrics["test"] if isinstance(metrics.get("test"), dict) else {}
    level = ci_level(float((metrics.get("bootstrap") or {}).get("confidence", 0.95)))
    lines = [f"| metric (test) | value | {level} CI |", "|---|---:|---:|"]
    for key in TEST_METRICS:
        block = test.get(key)
        block = {"value": block} if isinstance(block, int | float) and not isinstance(block, bool) else block
        if isinstance(block, dict):
            ci = "" if block.get("low") is None else f"{_fmt(block['low'])} to {_fmt(block.get('high'))}"
            lines.append(f"| {LABELS[key]} | {_fmt(block.get('value'))} | {ci} |")
    return lines if len(lines) > 2 else []


def live_table(live: dict[str, Any]) -> list[str]:
    """The train stage's DVCLive metrics (the kept epoch) as a 2-column table, when there is no evaluation."""
    flat = {f"{k} {n}" if isinstance(v, dict) else k: x for k, v in live.items()
            for n, x in (v.items() if isinstance(v, dict) else [(k, v)])}  # {"val": {"loss": ..}} -> "val loss"
    rows = [(k, v) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    if not rows:
        return []
    return ["| metric (train stage) | value |", "|---|---:|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)]


def threshold_line(project: Project, metrics: dict[str, Any]) -> str:
    """The operating threshold, how it was chosen, and the test set's size."""
    path = project.model_root / "threshold.json"
    info = read_json(path) if path.exists() else {}
    value = info.get("threshold", metrics.get("threshold"))
    if not isinstance(value, int | float):
        return ""
    how = ", ".join(str(x) for x in (info.get("rule"), info.get("how")) if x)
    size = f"; {metrics['n']} test images ({metrics.get('n_positive', '?')} positive)" if "n" in metrics else ""
    return f"Operating threshold **{value:.3f}**{f' ({how}, chosen on val)' if how else ''}{size}."


def chance_line(project: Project) -> str:
    """The chance guard's verdict on val (threshold.json), one line."""
    path = project.model_root / "threshold.json"
    verdict = (read_json(path).get("chance") or {}) if path.exists() else {}
    if not verdict.get("summary"):
        return ""
    return f"Chance guard: {'**AT CHANCE**' if verdict.get('at_chance') else 'passed'}: {verdict['summary']}."


def crossval_line(project: Project) -> str:
    """The crossval stage's verdict on the recipe (its metrics.json), one line; '' where it is off or absent."""
    if not any(stage.step == "crossval" for stage in project.stages):
        return ""
    path = project.path("crossval", "--out") / "metrics.json"
    headline = read_json(path) if path.exists() else {}
    if not headline.get("run"):
        return ""
    from medflow.evaluation.crossval import verdict_line  # no training imports: the summary needs none

    return f"Cross-validation ({headline['folds']} folds of whole patients, the recipe): {verdict_line(headline)}."


def evaluation_outputs(project: Project) -> dict[str, Path]:
    """metrics.json / details.json / report.html / summary.md of the evaluate stage (its ``--out`` folder)."""
    out = project.path("evaluate", "--out")
    return {name: out / name for name in ("metrics.json", "details.json", "report.html", "summary.md")}


def chance_warning(project: Project) -> str:
    """'AT CHANCE: ...' when the evaluate stage found the trained model does not beat chance on val (its
    verdict is stored with the threshold, models/<ds>/threshold.json), else ''."""
    threshold = project.model_root / "threshold.json"
    verdict = (read_json(threshold).get("chance") or {}) if threshold.exists() else {}
    return f"AT CHANCE: {verdict.get('summary')}; it is never promoted" if verdict.get("at_chance") else ""


def report_key(dataset: str) -> str:
    return f"{artifact_key(dataset)}-report"


def summary_markdown(project: Project, results: list[dict[str, Any]], decision: dict[str, Any] | None,
                     title: str, report_id: Any = None) -> str:
    """The run's Markdown summary: a model at chance (first, loudly), the decision, the test metrics (value
    and CI, 3 decimals), threshold and chance guard, where the full report is (``report_id``: the report
    artifact's id, linked as its page in the web UI), champion, stages."""
    warning = chance_warning(project)
    lines = [f"# {title}", "", *([f"> **{warning}**", ""] if warning else []),
             f"Project `{project.root.name}`, dataset **{project.dataset}**."]
    if decision:
        lines += ["", f"**{decision.get('reason', '')}**"]
    champ = registry.champion(project.model_root)
    lines += ["", f"Champion: `{champ['version'] if champ else 'none'}`"]
    ev = evaluation_outputs(project)
    found = next((ev[name] for name in ("details.json", "metrics.json") if ev[name].exists()), None)
    metrics = read_json(found) if found else {}
    live = project.path("train", "--live-dir") / "metrics.json"
    table = metrics_table(metrics) or (live_table(read_json(live)) if live.exists() else [])
    if table:
        lines += ["", "## Test metrics", "", *table]
    for line in (threshold_line(project, metrics), chance_line(project), crossval_line(project)):
        lines += ["", line] if line else []
    if ev["report.html"].exists():
        html = display_path(ev["report.html"], project.root)  # project-relative: no home folder in the artifact
        shown = f"the [{report_key(project.dataset)}](/artifacts/artifact/{report_id}) artifact; " if report_id else ""
        lines += ["", f"Full report: {shown}with its figures, `{html}` in the checkout."]
    lines += ["", "## Stages", "", "| stage | result | seconds |", "|---|---|---:|"]
    lines += [f"| {r['stage']} | {'ran' if r['ran'] else 'up to date (DVC cache)'} | {r['seconds']} |"
              for r in results]
    return "\n".join(lines)


def report_markdown(project: Project) -> str | None:
    """The evaluate stage's summary.md (the report without its figures; inert Markdown) for the web UI: its
    links to files beside it become their project paths, which a browser on the UI's page could not open."""
    ev = evaluation_outputs(project)
    if not ev["summary.md"].exists():
        return None
    folder = display_path(ev["summary.md"].parent, project.root)
    text = _LINK.sub(lambda m: f"{m.group(1)} (`{folder}/{m.group(2)}`)" if "://" not in m.group(2) else m.group(0),
                     ev["summary.md"].read_text(encoding="utf-8"))
    if len(text) > REPORT_ARTIFACT_MAX:
        text = f"{text[:REPORT_ARTIFACT_MAX]}\n\n*(cut at {REPORT_ARTIFACT_MAX:,} characters: `{folder}/summary.md`)*"
    return text


def post_summary(project: Project, results: list[dict[str, Any]], decision: dict[str, Any] | None,
                 title: str, key: str) -> None:
    """The run's summary artifact, and the evaluation report (the evaluate stage's summary.md) as its own."""
    report, report_id = report_markdown(project), None
    if report is not None:  # its page (/artifacts/artifact/<id>) shows it; the key's page lists its versions
        report_id = create_markdown_artifact(report, key=report_key(project.dataset),
                                             description=f"evaluation report of {project.dataset} (summary.md of "
                                                         "the evaluate stage; figures in report.html)")
    create_markdown_artifact(summary_markdown(project, results, decision, title, report_id), key=key,
                             description=f"{title}: decision, test metrics, threshold, chance guard, stages")


def post_quarantine(project: Project) -> int:
    """Table artifact of the files the filter step and the split step quarantined (path, reason, detail);
    returns their count."""
    from medflow.data.split import read_quarantine  # pandas: only a run that reached the stages needs it

    rejects, split_rejects = project.path("filter", "--rejects"), project.path("split", "--rejects")
    df = read_quarantine(rejects, split_rejects)
    if df is None:
        return 0
    cols = [c for c in ("path", "reason", "detail") if c in df.columns]
    table = df[cols].head(MAX_TABLE_ROWS).fillna("").astype(str).to_dict(orient="records")
    pz = pseudonymizer(project.cfg.evaluate.pseudonymize, project.root)
    for row, links in zip(table, df["links"], strict=False):  # evaluate.pseudonymize: file names as salted hashes,
        named = [row.get("path", ""), *(links.split(";") if links else [])]  # in the path, the detail, linked ones
        row.update({k: pz.text(row[k], named) for k in ("path", "detail") if k in row})
    create_table_artifact(table or [{"path": "", "reason": "no file was quarantined", "detail": ""}],
                          key=f"{artifact_key(project.dataset)}-quarantine",
                          description=f"{len(df)} quarantined files (first {MAX_TABLE_ROWS} shown): "
                                      f"{display_path(rejects, project.root)}, "
                                      f"{display_path(split_rejects, project.root)}")
    return len(df)


def decision_markdown(project: Project, decision: dict[str, Any]) -> str:
    """The champion/challenger decision with both models' test metrics (3 decimals) and the AUC difference."""
    new, old = decision.get("challenger_metrics") or {}, decision.get("champion_metrics") or {}
    keys = list(dict.fromkeys([*new, *old]))
    lines = [f"# Retrain decision: {project.dataset}", "", f"**{decision.get('reason', '')}**", "",
             f"Challenger `{decision.get('challenger')}`, champion `{decision.get('champion')}`, "
             f"{decision.get('n_test', 0)} test images, tolerance {decision.get('tolerance')}", ""]
    if keys:
        lines += ["| metric (test) | challenger | champion |", "|---|---:|---:|"]
        lines += [f"| {DECISION_METRICS.get(k, k)} | {_fmt(new.get(k))} | {_fmt(old.get(k)) if old else ''} |"
                  for k in keys]
    diff = decision.get("difference") or {}
    if diff:
        lines += ["", "AUC difference (challenger - champion): " + ", ".join(f"{k} {_fmt(v)}"
                                                                            for k, v in diff.items())]
    return "\n".join(lines)


def post_decision(project: Project, decision: dict[str, Any]) -> None:
    """Markdown artifact of the champion/challenger decision with both sets of test metrics."""
    create_markdown_artifact(decision_markdown(project, decision),
                             key=f"{artifact_key(project.dataset)}-retrain-decision",
                             description="champion/challenger decision and both sets of test metrics")

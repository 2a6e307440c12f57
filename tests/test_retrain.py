"""Unit tests of the orchestration logic without Prefect: stage order, registry, decision, split, lock, watch."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import ROOT, copy_shipped

from flows import stages
from medflow.config import Config, RetrainConfig, load_config
from medflow.errors import StepError
from medflow.io import read_json
from medflow.lifecycle import registry
from medflow.lifecycle.retrain import (
    Busy,
    dataset_lock,
    decide,
    last_fingerprint,
    record_fingerprint,
    source_fingerprint,
)
from medflow.lifecycle.watch import InboxWatcher, watch


@pytest.fixture
def cfg(shipped_params: Path) -> Config:
    return load_config(shipped_params, "pneumonia")


# --------------------------------------------------------------------------------------- DVC stages
def test_stage_order_follows_dependencies_not_file_order(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("datasets: [pneumonia, malaria]\n")
    per_dataset = {
        "evaluate": {"cmd": "medflow evaluate --dataset ${item} --model-dir m/${item}",
                     "deps": ["m/${item}/model.keras"], "outs": ["r/${item}/eval"]},
        "train": {"cmd": "medflow train --split d/${item}/split.csv", "deps": ["d/${item}/split.csv"],
                  "outs": ["m/${item}/model.keras", {"m/${item}/metadata.json": {"cache": False}}]},
        "split": {"cmd": "medflow split --out d/${item}/split.csv", "deps": ["d/${item}/clean.csv"],
                  "outs": ["d/${item}/split.csv"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        name: {"foreach": "${datasets}", "do": spec} for name, spec in per_dataset.items()}}))
    malaria = stages.pipeline(tmp_path, "malaria")
    assert [s.name for s in malaria] == ["split@malaria", "train@malaria", "evaluate@malaria"]
    assert malaria[1].needs == {"split@malaria"} and malaria[0].dataset == "malaria"
    flags = stages.step_flags(stages.pipeline(tmp_path, "pneumonia"))
    assert flags["evaluate"] == {"--model-dir": tmp_path / "m/pneumonia"}  # --dataset is not a path
    assert len(stages.pipeline(tmp_path)) == 6


def test_stage_order_of_the_project_starts_at_download_and_ends_after_train(tmp_path: Path) -> None:
    copy_shipped(tmp_path)
    (tmp_path / "dvc.yaml").write_bytes((ROOT / "dvc.yaml").read_bytes())
    order = [s.name for s in stages.pipeline(tmp_path, "melanoma")]
    assert order[0] == "download@melanoma" and order[-2:] == ["evaluate@melanoma", "crossval@melanoma"]
    assert order.index("split@melanoma") < order.index("validate@melanoma") < order.index("train@melanoma")


def test_stage_cycle_and_missing_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(stages.StageFailed, match="not found"):
        stages.pipeline(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "x", "deps": ["b.txt"], "outs": ["a.txt"]},
        "b": {"cmd": "y", "deps": ["a.txt"], "outs": ["b.txt"]}}}))
    with pytest.raises(stages.StageFailed, match="cycle"):
        stages.pipeline(tmp_path)


def test_failure_reason_prefers_the_steps_own_error() -> None:
    out = ("Running stage 'validate':\n> medflow validate ...\n"
           "medflow validate: error: 2 expectations failed: split shares\n"
           "ERROR: failed to reproduce 'validate': failed to run: medflow validate, exited with 2\n")
    assert stages.failure_reason(out) == "medflow validate: error: 2 expectations failed: split shares"
    assert stages.failure_reason("ERROR: boom\n") == "ERROR: boom"


def test_failure_reason_keeps_each_failed_expectation() -> None:
    """validate's real message (expectations.error_message) ends its first line at a colon and lists the
    failed expectations on the lines below: the reason carries them."""
    from medflow.data.expectations import Outcome, error_message

    failed = [Outcome(table="splits", expectation="ExpectColumnValuesToBeBetween", args="column=share",
                      description="split shares within tolerance", passed=False, unexpected_count=1,
                      offending=["test"])]
    message = error_message(failed, 32, Path("reports/pneumonia/validation.md"))
    out = (f"Running stage 'validate@pneumonia':\n> medflow validate ...\nmedflow validate: error: {message}\n"
           "ERROR: failed to reproduce 'validate@pneumonia': failed to run: medflow validate, exited with 2\n")
    reason = stages.failure_reason(out)
    assert reason == f"medflow validate: error: {message}"
    assert reason.splitlines()[-1].startswith("  - splits: ExpectColumnValuesToBeBetween(column=share)")
    crash = "Traceback (most recent call last):\n  File x\nscmrepo.exceptions.SCMError: Empty git repo\nERROR: failed\n"
    assert stages.failure_reason(crash) == "scmrepo.exceptions.SCMError: Empty git repo; ERROR: failed"


# ----------------------------------------------------------------------------------------- registry
def _model_dir(path: Path, content: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.keras").write_bytes(content)
    (path / "metadata.json").write_text("{}")
    return path


def test_registry_registers_once_and_promotes_atomically(tmp_path: Path) -> None:
    root = _model_dir(tmp_path / "models/ds", b"model-1")
    assert registry.champion(root) is None
    v1 = registry.register(root, root, {"flow": "test"})
    assert registry.register(root, root) == v1  # same file: same version
    assert (root / "versions" / v1 / "model.keras").read_bytes() == b"model-1"
    registry.promote(root, v1)
    (root / "model.keras").write_bytes(b"model-2")
    v2 = registry.register(root, root)
    assert v2 != v1 and registry.list_versions(root) == sorted([v1, v2])
    assert registry.champion(root)["version"] == v1  # registering never promotes
    registry.promote(root, v2, {"reason": "better"})
    champ = registry.champion(root)
    assert champ["version"] == v2 and champ["previous"] == v1 and champ["reason"] == "better"
    assert not list(root.glob(".*tmp*"))


def test_registry_errors_name_the_files(tmp_path: Path) -> None:
    root = tmp_path / "models/ds"
    root.mkdir(parents=True)
    with pytest.raises(StepError, match="no trained model"):
        registry.register(root, root)
    with pytest.raises(StepError, match="holds no model.keras"):
        registry.promote(root, "nope")
    (root / "champion.json").write_text('{"version": "gone"}')
    with pytest.raises(StepError, match="champion.json: points at version 'gone'"):
        registry.champion(root)


# ----------------------------------------------------------------------------------------- decision
def _scores(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(y * 0.6 + rng.normal(0.2, 0.2, n), 0, 1)


def test_first_model_is_promoted_without_comparison() -> None:
    y, p = _scores()
    d = decide(y, p, None, RetrainConfig(), challenger="v1", champion=None)
    assert d.promote and "no champion" in d.reason and d.challenger_metrics["roc_auc"] > 0.9


def test_equal_challenger_is_promoted_and_random_one_is_not() -> None:
    y, p = _scores()
    cfg = RetrainConfig(tolerance=0.02, bootstrap=1000)
    same = decide(y, p, p, cfg, challenger="v2", champion="v1")
    assert same.promote and same.difference["point"] == 0
    noise = np.random.default_rng(1).random(len(y))
    worse = decide(y, noise, p, cfg, challenger="v3", champion="v1")
    assert not worse.promote and "kept champion" in worse.reason
    assert worse.difference["high"] < 0 and worse.champion_metrics["roc_auc"] > worse.challenger_metrics["roc_auc"]


def test_small_loss_within_tolerance_is_promoted_only_with_enough_evidence() -> None:
    y, p = _scores(2000)
    slightly = np.clip(p + np.random.default_rng(2).normal(0, 0.05, len(p)), 0, 1)
    assert decide(y, slightly, p, RetrainConfig(tolerance=0.05, bootstrap=1000), challenger="b",
                  champion="a").promote
    assert not decide(y, slightly, p, RetrainConfig(tolerance=0.0, bootstrap=1000), challenger="b",
                      champion="a").promote


# ------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_changes_with_inbox_files_and_sources(tmp_path: Path, cfg: Config) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "a/NORMAL").mkdir(parents=True)
    (inbox / ".gitkeep").write_text("")
    empty = source_fingerprint(cfg, inbox)
    (inbox / "a/NORMAL/x.jpeg").write_bytes(b"1")
    landed = source_fingerprint(cfg, inbox)
    assert landed != empty and source_fingerprint(cfg, inbox) == landed
    (inbox / ".hidden").write_text("ignored")
    assert source_fingerprint(cfg, inbox) == landed
    other = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"sources": []})})
    assert source_fingerprint(other, inbox) != landed
    assert last_fingerprint(tmp_path) is None
    record_fingerprint(tmp_path, landed, decision="x")
    assert last_fingerprint(tmp_path) == landed


# -------------------------------------------------------------------------------------------- lock
def _hold(project: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    with dataset_lock(Path(project), "ds", wait=False):
        ready.set()
        release.wait(10)


def test_second_run_is_skipped_or_waits_while_the_lock_is_held(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(Busy, match="pid"), dataset_lock(tmp_path, "ds", wait=False):
            pass
        with pytest.raises(Busy), dataset_lock(tmp_path, "ds", wait=True, timeout_s=0.3, poll_s=0.1):
            pass
        with dataset_lock(tmp_path, "other", wait=False):  # other datasets are independent
            pass
        release.set()
        start = time.monotonic()
        with dataset_lock(tmp_path, "ds", wait=True, timeout_s=10, poll_s=0.05):
            assert time.monotonic() - start < 10
    finally:
        release.set()
        holder.join(10)


HOLDER = """
import sys, time
from pathlib import Path
from medflow.lifecycle.retrain import dataset_lock
with dataset_lock(Path(sys.argv[1]), "ds", wait=False):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(Busy, match=f"pid {holder.pid}"), dataset_lock(tmp_path, "ds", wait=False):
            pass
        holder.send_signal(signal.SIGKILL)  # no finally, no atexit: only the kernel can release it
        assert holder.wait(10) == -signal.SIGKILL
        with dataset_lock(tmp_path, "ds", wait=False) as path:
            assert path == tmp_path / ".dvc/tmp/medflow/ds.lock" and json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait(10)


# ------------------------------------------------------------------------------------------- watch
def test_watcher_reports_settled_new_files_once(tmp_path: Path, cfg: Config) -> None:
    inbox, models = tmp_path / "inbox", tmp_path / "models"
    (inbox / "old/NORMAL").mkdir(parents=True)
    (inbox / "old/NORMAL/a.jpeg").write_bytes(b"a")
    record_fingerprint(models, source_fingerprint(cfg, inbox))
    w = InboxWatcher(cfg, inbox, models)
    assert w.check() is None and w.check() is None  # nothing new since the last ingestion
    (inbox / "new/PNEUMONIA").mkdir(parents=True)
    (inbox / "new/PNEUMONIA/b.jpeg").write_bytes(b"b")
    assert w.check() is None  # not settled yet
    payload = w.check()
    assert payload is not None and payload["new_files"] == ["new/PNEUMONIA/b.jpeg"] and payload["n_new_files"] == 1
    assert w.check() is None  # reported once
    events: list[dict] = []
    assert watch(cfg, inbox, models, events.append, interval_s=0, once=True) == 1
    record_fingerprint(models, payload["fingerprint"])
    assert watch(cfg, inbox, models, events.append, interval_s=0, once=True) == 0
    assert read_json(models / "retrain.json")["fingerprint"] == payload["fingerprint"]


def test_watch_once_counts_the_files_new_since_the_last_ingestion(tmp_path: Path, cfg: Config) -> None:
    inbox, models = tmp_path / "inbox", tmp_path / "models"
    (inbox / "a/NORMAL").mkdir(parents=True)
    (inbox / "a/NORMAL/1.jpeg").write_bytes(b"1")
    record_fingerprint(models, source_fingerprint(cfg, inbox), files=["a/NORMAL/1.jpeg"])
    (inbox / "a/NORMAL/2.jpeg").write_bytes(b"2")
    (inbox / "a/NORMAL/3.jpeg").write_bytes(b"3")
    events: list[dict] = []
    assert watch(cfg, inbox, models, events.append, interval_s=0, once=True) == 1
    assert events[0]["new_files"] == ["a/NORMAL/2.jpeg", "a/NORMAL/3.jpeg"] and events[0]["n_new_files"] == 2


def test_stage_tasks_have_readable_names_timeouts_and_download_retries() -> None:
    from flows.common import stage_task

    download, train = stage_task("download"), stage_task("train")
    assert download.name == "download" and download.retries == 3 and download.retry_jitter_factor == 0.5
    # Prefect calls exponential_backoff(10)'s callable with the task's retries when the task is built.
    assert download.retry_delay_seconds == [10, 20, 40]
    assert train.name == "train" and train.retries == 0 and train.timeout_seconds > 24 * 3600


def _chance_verdict(at_chance: bool) -> dict[str, Any]:
    """The chance guard's real verdict on val scores that learnt something, or on the prevalence alone."""
    from test_report import _val

    from medflow.config import EvaluateConfig
    from medflow.evaluation import chance

    y, p = _val()
    return chance.verdict(y, np.full(len(y), 0.25) if at_chance else p, (90, 30), weighted=False,
                          ev=EvaluateConfig(bootstrap=1000)).as_dict()


def _evaluated_project(tmp_path: Path, cfg: Config) -> Any:
    """A project whose evaluate stage wrote its real outputs (report.write_all on synthetic scores) and whose
    model folder holds the threshold with the chance guard's verdict, as the evaluate stage stores them."""
    from test_report import _evaluation

    from flows.common import Project
    from medflow.evaluation import report

    models, out = tmp_path / "models/pneumonia", tmp_path / "reports/pneumonia/evaluation"
    ev = _evaluation(tmp_path, chance=_chance_verdict(at_chance=False))
    report.write_all(ev, out)
    models.mkdir(parents=True)
    (models / "threshold.json").write_text(json.dumps(ev.threshold))
    step = [("train", {"--model-dir": models, "--live-dir": models / "live"}), ("evaluate", {"--out": out})]
    return Project(tmp_path, "pneumonia", cfg, tuple(stages.Stage(f"{s}@pneumonia", s, "pneumonia", flags,
                                                                  frozenset()) for s, flags in step))


def test_the_summary_holds_the_report_for_the_web_ui(tmp_path: Path, cfg: Config) -> None:
    """Issue 13: the run summary shows the test metrics (3 columns, 3 decimals), threshold and chance guard, and
    points at the report artifact, not at a file a browser on the UI's page cannot open; the report artifact is
    the evaluate stage's summary.md with its file links made project paths."""
    from flows.common import decision_markdown, report_markdown, summary_markdown

    project = _evaluated_project(tmp_path, cfg)
    details = read_json(tmp_path / "reports/pneumonia/evaluation/details.json")
    results = [{"stage": "train@pneumonia", "ran": True, "seconds": 12.3}]
    text = summary_markdown(project, results, {"reason": "promoted: no champion yet"}, "medflow train: pneumonia",
                            report_id="0c2d")
    table = text.split("## Test metrics\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0] == "| metric (test) | value | 95% CI |" and all(row.count("|") == 4 for row in table), table
    auc = details["test"]["roc_auc"]
    assert f"| ROC AUC | {auc['value']:.3f} | {auc['low']:.3f} to {auc['high']:.3f} |" in table, table
    assert len(table) == 2 + 6  # header, rule, six metrics
    assert "Operating threshold **0.450** (fixed, fixed in params, chosen on val); 200 test images (67 positive)." \
        in text, text
    assert "Chance guard: passed: the model beats chance on val: val loss" in text, text
    assert "[pneumonia-report](/artifacts/artifact/0c2d)" in text and "`reports/pneumonia/evaluation/" \
        "report.html`" in text and "](reports" not in text and "file:" not in text and "AT CHANCE" not in text
    assert "| train@pneumonia | ran | 12.3 |" in text and "**promoted: no champion yet**" in text

    shown = report_markdown(project)
    written = (tmp_path / "reports/pneumonia/evaluation/summary.md").read_text()
    assert shown is not None and "](report.html)" in written  # summary.md links the files beside it ...
    assert "](" not in shown and "report.html (`reports/pneumonia/evaluation/report.html`)" in shown  # ... as paths
    assert "| ROC AUC |" in shown and str(tmp_path) not in shown + text

    decided = decision_markdown(project, {"reason": "kept champion", "challenger_metrics": {
        "threshold": 0.4, "roc_auc": 0.912345}, "champion_metrics": {"threshold": 0.5, "roc_auc": 0.93}})
    assert "| ROC AUC | 0.912 | 0.930 |" in decided and "| Threshold | 0.400 | 0.500 |" in decided, decided

    threshold = tmp_path / "models/pneumonia/threshold.json"
    threshold.write_text(json.dumps({**read_json(threshold), "chance": _chance_verdict(at_chance=True)}))
    at_chance = summary_markdown(project, results, None, "t")
    assert at_chance.index("AT CHANCE") < at_chance.index("## Test metrics")
    assert "Chance guard: **AT CHANCE**: the model does not beat chance on val" in at_chance


def test_the_summary_gives_the_crossval_verdict_where_it_ran(tmp_path: Path, cfg: Config) -> None:
    """The crossval stage's verdict on the recipe (its metrics.json, written by its own writer) is a line of the
    run summary; off (crossval.folds 0) or without the stage, there is none."""
    from flows.common import Project, summary_markdown
    from medflow.evaluation import crossval

    base = _evaluated_project(tmp_path, cfg)
    out = tmp_path / "reports/pneumonia/crossval"
    project = Project(base.root, base.dataset, base.cfg, (*base.stages, stages.Stage(
        "crossval@pneumonia", "crossval", "pneumonia", {"--out": out}, frozenset())))
    results = [{"stage": "crossval@pneumonia", "ran": True, "seconds": 1.0}]
    assert "Cross-validation" not in summary_markdown(project, results, None, "t")  # not run yet
    crossval.write_off(out, tmp_path / "cache")
    assert "Cross-validation" not in summary_markdown(project, results, None, "t")
    n = 30
    labels = np.arange(n) % 2
    table = crossval.Table(np.array([f"img{i}.png" for i in range(n)]), labels.astype(np.int8),
                           np.arange(n, dtype=np.int64), np.array([f"p{i // 2}" for i in range(n)]))
    records = [{"fold": i + 1, "val_fold": (i + 1) % 3 + 1, "n": {"train": 10, "val": 10, "test": 10},
                "best_epoch": 1, "epochs_run": 2, "train_seconds": 1.0, "threshold": 0.5, "val_auc": 1.0,
                "test_auc": 1.0, "test_index": list(range(i, n, 3)),
                "test_probability": [0.2 + 0.6 * labels[j] for j in range(i, n, 3)]} for i in range(3)]
    folded = cfg.model_copy(update={"crossval": cfg.crossval.model_copy(update={"folds": 3})})
    crossval.write_results(folded, table, records, out)
    text = summary_markdown(project, results, None, "t")
    assert "Cross-validation (3 folds of whole patients, the recipe): the recipe beats chance out of fold: pooled " \
           "out-of-fold ROC AUC 1.000" in text, text
    assert "Cross-validation" not in summary_markdown(base, results, None, "t")  # a project without the stage


def test_a_stage_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    (tmp_path / "fake").mkdir()
    fake = tmp_path / "fake/dvc"
    fake.write_text("#!/bin/sh\necho started\nsleep 30 &\necho $! > child.pid\nwait\n")
    fake.chmod(0o755)
    orig = stages.dvc_executable
    stages.dvc_executable = lambda: str(fake)  # type: ignore[assignment]
    try:
        start = time.monotonic()
        code, out = stages.dvc(tmp_path, "repro", timeout_s=0.5)
        assert code != 0 and "timeout" in out and time.monotonic() - start < 10
        _assert_gone(int((tmp_path / "child.pid").read_text()))
        with stages.Repro(tmp_path, ["q"]) as repro, \
                pytest.raises(stages.StageFailed, match=r"stage 'q' failed: ERROR: killed after the 0.5 s timeout"):
            repro.stage("q", timeout_s=0.5)  # the flows' route: one DVC for the run's stages
    finally:
        stages.dvc_executable = orig  # type: ignore[assignment]
    _assert_gone(int((tmp_path / "child.pid").read_text()))


def _assert_gone(pid: int) -> None:
    time.sleep(0.2)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1][0] in "ZX"  # gone (or a zombie awaiting its reaper)


def test_stage_logs_leave_out_dvc_empty_warnings_and_tf_banners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """Issue 13: a stage's task log drops DVC's "is empty" warning (real DVC output) and the stage command runs
    with TensorFlow's C++ INFO lines off; $MEDFLOW_NOISY_LOGS keeps both, and a user's own TF setting wins."""
    monkeypatch.delenv("MEDFLOW_NOISY_LOGS", raising=False)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"q": {
        "cmd": "mkdir -p empty && (printenv TF_CPP_MIN_LOG_LEVEL || echo unset) > tf.txt",
        "outs": ["empty", "tf.txt"]}}}))
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("[core]\n    no_scm = true\n")  # what `dvc init --no-scm` writes
    result = stages.repro_stage(tmp_path, "q")
    lines = result.output.splitlines()
    assert result.ran and "WARNING: 'empty' is empty." in lines, lines  # what DVC prints on every such run
    assert [line for line in lines if stages.is_noise(line)] == ["WARNING: 'empty' is empty."], lines
    assert (tmp_path / "tf.txt").read_text().strip() == "1"  # the stage command's environment
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert stages._env()["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    monkeypatch.setenv("MEDFLOW_NOISY_LOGS", "1")
    assert not any(stages.is_noise(line) for line in lines) and "TF_CPP_MIN_LOG_LEVEL" not in stages._env()
    # server, serve and watch: no httpx line per API request, unless asked for (the switch, or -v)
    import logging

    from medflow.cli import quiet_http

    httpx_log = logging.getLogger("httpx")
    before = httpx_log.level
    try:
        httpx_log.setLevel(logging.NOTSET)
        quiet_http(verbose=False)
        assert httpx_log.level == logging.NOTSET
        monkeypatch.delenv("MEDFLOW_NOISY_LOGS")
        quiet_http(verbose=True)
        assert httpx_log.level == logging.NOTSET
        quiet_http(verbose=False)
        assert httpx_log.level == logging.WARNING and not httpx_log.isEnabledFor(logging.INFO)
    finally:
        httpx_log.setLevel(before)

"""Shared fixtures: the real-data folder, a loopback HTTP file server, a split.csv writer."""

from __future__ import annotations

import functools
import http.server
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from medflow.schema import SPLIT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Step commands load tasks/ from the project root; tests run them from scratch folders, so they name this one.
os.environ.setdefault("MEDFLOW_PROJECT", str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


SHIPPED = ("params.yaml", "datasets")  # the checkout's shared params and dataset catalog
# What a scratch checkout of the pipeline needs besides SHIPPED: the pipeline, the step code it hashes, DVC's
# config, and the inbox and external-set folders (with their .gitkeep files).
PROJECT_FILES = ["dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "tasks", "medflow", ".dvc/config",
                 ".dvc/.gitignore", "data/inbox", "data/external"]


def copy_project(dest: Path) -> Path:
    """A scratch checkout in ``dest`` (created): :data:`PROJECT_FILES` from the working tree (the code under
    test) and the shipped params and catalog (:func:`copy_shipped`); returns ``dest``. Not a git repo yet."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    copy_shipped(dest)
    return dest


def git_commit_all(dest: Path) -> None:
    """``git init`` ``dest`` (if needed) and commit everything in it."""
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=dest,
                   check=True)


def copy_shipped(dest: Path, paths: Sequence[str] = SHIPPED) -> Path:
    """Copy ``paths`` as committed (``git show HEAD:<path>``) into ``dest``; returns ``dest/params.yaml``.

    Tests read the shipped params and catalog, not the working tree, so a user's edits (``dvc exp run -S``,
    a changed dataset file) cannot fail them. Outside a git checkout (an sdist) the working tree is used.
    """
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD", "--", *paths], cwd=ROOT,
                            capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 and listed.stdout.strip() else None
    for name in names or [str(f.relative_to(ROOT)) for p in paths for f in _files(ROOT / p)]:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if names is None:
            target.write_bytes((ROOT / name).read_bytes())
        else:
            target.write_bytes(subprocess.run(["git", "show", f"HEAD:{name}"], cwd=ROOT, capture_output=True,
                                              check=True).stdout)
    return dest / "params.yaml"


def small_run_catalog(datasets_dir: Path, small_run: Mapping[str, Mapping[str, Any]]) -> None:
    """Make a scratch checkout's small-run params hold against the catalog: a catalog entry's override of a
    key that ``small_run`` sets (e.g. pneumonia's ``resize.size``) takes the small-run value. Keys the entries
    leave to params.yaml stay there, so a test that edits params.yaml still changes them."""
    for path in sorted(Path(datasets_dir).glob("*.yaml")):
        entry = yaml.safe_load(path.read_text())
        for section, values in small_run.items():
            own = entry.get(section) or {}
            entry[section] = {**own, **{k: v for k, v in values.items() if k in own}}
        path.write_text(yaml.safe_dump(entry, sort_keys=False))


def _files(path: Path) -> list[Path]:
    return sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]


@pytest.fixture
def shipped_params(tmp_path: Path) -> Path:
    """params.yaml (beside datasets/) as committed, in a fresh folder."""
    return copy_shipped(tmp_path / "shipped")


# End-to-end tests train real models and start real servers: on a loaded 2-core machine one took 18 min.
SLOW_TEST_TIMEOUT_S = 2400


def _slow(item: pytest.Item) -> bool:
    return bool(item.get_closest_marker("integration") or item.get_closest_marker("slow"))


# The longest tests and about how long each takes on the 2-core VM (seconds, from `--durations`), longest first:
# each worker starts its share of them at once. Run one after the other on one worker they were most of the
# suite's wall time.
LONGEST = {"test_every_catalog_dataset_through_evaluation_in_one_checkout": 550,
           "test_deployments_end_to_end_on_a_real_server": 420,
           "test_train_then_retrain_skips_promotes_and_rejects": 390,
           "test_resume_after_a_crash_is_exact": 110,
           "test_repro_then_new_data_lands": 105,
           "test_multi_worker_two_local_processes_end_identical": 90,
           "test_jax_data_parallel_two_host_devices": 80,
           "test_peak_memory_stays_bounded_on_hostile_inputs": 70,
           "test_out_of_fold_scores_pooled_kept_and_switched_off": 110,
           "test_mirrored_over_two_logical_cpus": 55}


def _name(item: pytest.Item) -> str:
    """The test function's name (without a parametrization's brackets)."""
    return getattr(item, "originalname", item.name)


def _rank(item: pytest.Item) -> tuple[int, int]:
    if _name(item) in LONGEST:
        return (0, -LONGEST[_name(item)])
    return (1, 0) if _slow(item) else (2, 0)


def _first_shares(n: int, workers: int) -> list[int]:
    """How many of ``n`` tests pytest-xdist's work-stealing scheduler first gives each worker, in order: the
    pending tests evenly over the idle workers, a contiguous run each (xdist/scheduler/worksteal.py)."""
    shares = []
    for i in range(workers):
        shares.append((n - sum(shares)) // (workers - i))
    return shares


def _dealt(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` (ranked) laid out as the runs the scheduler gives each worker: each of the longest tests to the
    run with the fewest seconds of them so far (:data:`LONGEST`), then the others in order, filling each run in
    turn. Every worker starts with its share of the longest tests; a module's other tests stay together on one
    worker (its module-scoped fixtures, a trained model or a Prefect server, are made once; dealt one by one
    they were made on every worker), and an idle worker steals from the end of a busy one's run."""
    shares = _first_shares(len(items), workers)
    runs: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0] * workers
    rest = []
    for item in items:
        free = [i for i in range(workers) if len(runs[i]) < shares[i]] if _name(item) in LONGEST else []
        if not free:
            rest.append(item)
            continue
        target = min(free, key=lambda i: (load[i], i))
        load[target] += LONGEST[_name(item)]
        runs[target].append(item)
    others = iter(rest)
    for run, share in zip(runs, shares, strict=True):
        run.extend(itertools.islice(others, share - len(run)))
    return [item for run in runs for item in run]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject): one worker more than this process may use cores, at most 4 (``--maxprocesses``;
    every worker imports TensorFlow). The end-to-end tests spend much of their time waiting on the processes,
    servers and polls they start: with one worker per core the 2-core VM's CPUs were 78% busy over a run."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests first, spread over the workers, then the other integration and slow tests, then the unit
    tier. pytest-xdist's work-stealing scheduler (pyproject: ``--dist worksteal``) gives each worker a contiguous
    run of the list and an idle worker takes tests from the end of a busy one's run, so the list is laid out as
    those runs (:func:`_dealt`): each worker starts one of the longest tests, and the quick unit tier fills the
    gaps instead of one worker running the long ones one after another. Slow tests also get a larger timeout than
    the unit tier's (pyproject: timeout), unless they set their own with ``@pytest.mark.timeout``. The order is
    deterministic (every xdist worker must collect the same list: each knows the worker count)."""
    items.sort(key=_rank)  # stable: file order within each rank
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers > 1:
        items[:] = _dealt(items, workers)
    for item in items:
        if _slow(item) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


def shared_dataset(name: str) -> Path:
    """Path of a real dataset under ../shared/data, or skip the test cleanly when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve a fresh folder over HTTP on 127.0.0.1; yields (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


def output_bytes(path: Path) -> dict[str, bytes]:
    """What a step wrote at ``path``: the file's bytes, or a folder's (a table's parts, a store's index and shards)
    by relative path."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_split_csv(dest: Path, *, paths: Sequence[str], labels: Sequence[object], splits: Sequence[str],
                    groups: Sequence[str] | None = None, rows: Sequence[int] | None = None) -> Path:
    """A split.csv in the pipeline's schema (``SPLIT_COLUMNS``): one line per path, in the given order.

    ``rows`` (the image's row in the image store) default to 0..n-1 and ``groups`` (patients) to the file
    stems; class names are POS for label 1, else NEG; digests are distinct; other columns are empty.
    """
    n = len(paths)
    df = pd.DataFrame({c: [""] * n for c in SPLIT_COLUMNS})
    df["path"] = list(paths)
    df["relpath"] = [Path(p).name for p in paths]
    df["label"] = list(labels)
    df["class_name"] = ["POS" if v == 1 else "NEG" for v in df["label"]]
    df["group"] = list(groups) if groups is not None else [Path(p).stem for p in paths]
    df["sha256"] = [f"{i:064x}" for i in range(n)]
    df["dup_group"] = df["sha256"]
    df["split_group"] = df["group"]
    df["row"] = list(rows) if rows is not None else list(range(n))
    df["split"] = list(splits)
    df.to_csv(dest, index=False)
    return dest


def run_caller_script(tmp_path: Path, body: str) -> None:
    """Run ``body`` as a user's script without a ``__main__`` guard (the project root on sys.path), and assert
    that it succeeds and that its top level ran exactly once: worker processes must not re-run it."""
    marker = tmp_path / "imported.txt"
    script = tmp_path / "caller.py"
    header = f"import sys\nsys.path[:0] = {[str(ROOT)]!r}\nwith open({str(marker)!r}, 'a') as f:\n    f.write('x')\n"
    script.write_text(header + textwrap.dedent(body))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "x"

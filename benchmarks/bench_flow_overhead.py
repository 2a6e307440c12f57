"""A train run as users run it: `medflow server` + `medflow serve` + `prefect deployment run --watch`,
against `dvc repro` of the same pipeline, from scratch and with nothing to do.

Builds two identical throw-away checkouts with real Kermany images (bench_orchestration's: 120 by default,
64 px, tutorial CNN 3 epochs). The twin runs the pipeline from scratch with `dvc repro`. Then a local Prefect
server on a free port (its own PREFECT_HOME, SQLite) and the runner serve the other, whose first served train
run is the full run from scratch (it also registers the model). Then, with nothing to do, best of N of:

- `dvc repro` (DVC's own check of every stage);
- `prefect deployment run medflow/train-pneumonia --watch`, end to end (the CLI's start-up, the runner picking
  the run up, the flow-run process, the stages' DVC checks, the decision, artifacts), and the flow run alone
  (its start to its end on the API).

The runner polls every 2 s (`medflow serve`; Prefect's default is 10; `--poll` sets
`PREFECT_RUNNER_POLL_FREQUENCY`), so the pick-up wait is printed on its own.

    uv run python benchmarks/bench_flow_overhead.py [--data ../shared/data/chest_xray] [--images 120] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_orchestration import _project, only_download_ran
from dvc_project import BIN, DVC, ROOT, best_time

from medflow import procs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"timed out waiting for {what}")


def _iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _served_run(project: Path, env: dict[str, str], api: str) -> tuple[float, float, float, str]:
    """One `prefect deployment run --watch`: (end to end, pick-up wait, flow run, state name)."""
    t0 = time.perf_counter()
    run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "medflow/train-pneumonia", "--watch"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"served run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    found = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout)
    if found is None:
        sys.exit(f"no flow run id in the output of `prefect deployment run`:\n{run.stdout[-3000:]}")
    flow_run = httpx.get(f"{api}/flow_runs/{found.group(1)}", timeout=10).json()
    created, start, end = (_iso(flow_run[k]) for k in ("created", "start_time", "end_time"))
    return wall, (start - created).total_seconds(), (end - start).total_seconds(), str(flow_run["state_name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--poll", type=float, default=None,
                        help="PREFECT_RUNNER_POLL_FREQUENCY (default: medflow serve's 2 s)")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data with a folder of class subfolders")
    with tempfile.TemporaryDirectory() as tmp:
        project, twin = Path(tmp) / "project", Path(tmp) / "twin"
        for folder in (project, twin):
            _project(folder, args.data, args.images)
        shutil.copytree(ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["git", "add", "-A"], cwd=project, check=True)
        subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "flows"], cwd=project,
                       check=True)
        t0 = time.perf_counter()
        repro = subprocess.run([DVC, "repro"], cwd=twin, capture_output=True, text=True,
                               env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
        full = time.perf_counter() - t0
        if repro.returncode != 0:
            sys.exit(f"`dvc repro` of the twin failed:\n{repro.stdout[-3000:]}\n{repro.stderr[-3000:]}")
        shutil.rmtree(twin)
        port = _free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(Path(tmp) / "prefect_home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        if args.poll is not None:
            env["PREFECT_RUNNER_POLL_FREQUENCY"] = f"{args.poll:g}"
        servers = [procs.start([str(BIN / "medflow"), "server", "--port", str(port)], Path(tmp), env,
                        Path(tmp) / "server.log")]
        env["PREFECT_API_URL"] = api
        try:
            _wait(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, 300, "the server")
            servers.append(procs.start([str(BIN / "medflow"), "serve", "--project", str(project)], project, env,
                                Path(tmp) / "serve.log"))
            _wait(lambda: httpx.get(f"{api}/deployments/name/medflow/train-pneumonia", timeout=5).status_code
                  == 200, 300, "the deployments")
            first = _served_run(project, env, api)  # the full run from scratch; registers the model
            print("served full run (end to end, pick-up, flow run): {:.2f} / {:.2f} / {:.2f} s ({}); `dvc repro` "
                  "{:.2f} s".format(*first, full), flush=True)
            served = []
            for _ in range(args.repeat):
                served.append(_served_run(project, env, api))
                print("served no-op (end to end, pick-up, flow run): {:.2f} / {:.2f} / {:.2f} s ({})".format(
                    *served[-1]), flush=True)
            dvc_noop = best_time([DVC, "repro"], project, args.repeat, check=only_download_ran)
        finally:
            for proc in reversed(servers):
                procs.stop(proc, timeout_s=30)
    best = min(served)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.images} "
          f"images, 64 px, tutorial_cnn 3 epochs")
    print(f"full run: `dvc repro` {full:.1f} s | served deployment {first[0]:.1f} s end to end (pick-up wait "
          f"{first[1]:.2f} s, flow run {first[2]:.1f} s, '{first[3]}') | overhead {first[0] / full - 1:+.1%} end to "
          f"end, {first[2] / full - 1:+.1%} flow run")
    print(f"nothing to do: `dvc repro` {dvc_noop:.2f} s | served deployment {best[0]:.2f} s end to end "
          f"(pick-up wait {best[1]:.2f} s, flow run {best[2]:.2f} s, '{best[3]}') | ratio {best[0] / dvc_noop:.2f}x "
          f"end to end, {best[2] / dvc_noop:.2f}x flow run")
    print("all served no-op runs (end to end, pick-up, flow run): "
          + "; ".join(f"{w:.2f}/{p:.2f}/{f:.2f} s" for w, p, f, _ in served))


if __name__ == "__main__":
    main()

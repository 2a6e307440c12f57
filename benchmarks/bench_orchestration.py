"""Orchestration overhead: the Prefect train flow vs `dvc repro`, with nothing to do and on a full run.

Builds a throw-away checkout with real Kermany images (120 by default, 64 px, tutorial CNN, 3 epochs), then,
against a temporary local Prefect API (Prefect's test harness: a real server on SQLite, 127.0.0.1):

1. full run: the train flow from scratch. Wall time split into *stage work* (each stage's share of the flow's
   one `dvc repro --single-item` process: the `medflow` step plus DVC's own check, hashing and dvc.lock record
   of that stage, as `dvc repro` does them; and champion-vs-challenger) and *orchestration* (the rest: DVC's
   one start-up, Prefect task and flow bookkeeping, artifacts).
2. nothing to do: the train flow again vs `dvc repro` (best of N). Download runs on every repro (dvc.yaml
   `always_changed`: it lists the inbox); nothing else may.

    uv run python benchmarks/bench_orchestration.py [--data ../shared/data/chest_xray] [--images 120] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dvc_project import DVC, ROOT, best_time, copy_pipeline

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _small(params: dict[str, Any]) -> None:
    """Params for a short full run: 64 px, the tutorial CNN for 3 epochs, loose split tolerances."""
    params["resize"]["size"] = 64
    params["validate"] = {"split_tolerance": 0.2, "class_ratio_tolerance": 0.25}
    params["train"].update(model="tutorial_cnn", epochs=3, batch_size=16)
    params["evaluate"].update(bootstrap=1000, gradcam_examples=0)


def _project(dest: Path, data: Path, n_images: int) -> None:
    copy_pipeline(dest, _small)
    inbox = dest / "data/inbox/pneumonia/bench"
    n_neg = n_images // 3
    for cls, n in (("NORMAL", n_neg), ("PNEUMONIA", n_images - n_neg)):
        (inbox / cls).mkdir(parents=True)
        for path in sorted((data / cls).iterdir())[:n]:
            shutil.copy(path, inbox / cls / path.name)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)  # DVCLive needs a commit
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"], cwd=dest,
                   check=True)


def only_download_ran(stdout: str) -> None:
    """Nothing to do: download runs on every repro (always_changed, it checks the inbox); nothing else may."""
    ran = re.findall(r"Running stage '([^']+)'", stdout)
    assert all(name.startswith("download@") for name in ran), stdout


def _flow(project: Path) -> tuple[float, dict[str, float]]:
    from flows.train import train_flow

    t0 = time.perf_counter()
    result = train_flow(dataset="pneumonia", project_dir=str(project))
    seconds = {r["stage"]: r["seconds"] for r in result["stages"]}
    seconds["champion-vs-challenger"] = result["decision"].get("seconds", 0.0)
    return time.perf_counter() - t0, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data with a folder of class subfolders")
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        project = Path(tmp) / "project"
        _project(project, args.data, args.images)
        full, full_parts = _flow(project)
        noop = min(_flow(project)[0] for _ in range(args.repeat))
        dvc_noop = best_time([DVC, "repro"], project, args.repeat, check=only_download_ran)

    # A stage's work: its share of the flow's one DVC process (its step, DVC's check and record of it).
    # champion-vs-challenger (registering; loading and scoring two models once there is a champion) counts as work.
    work = full_parts
    stage_work = sum(work.values())
    n_stages = len(full_parts) - 1
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.images} images, 64 px, tutorial_cnn 3 "
          f"epochs; {n_stages} DVC stages")
    print(f"nothing to do: `dvc repro` {dvc_noop:.2f} s | Prefect train flow {noop:.2f} s | "
          f"ratio {noop / dvc_noop:.2f}x, +{noop - dvc_noop:.2f} s")
    print(f"full run: {full:.1f} s = stage work {stage_work:.1f} s + orchestration {full - stage_work:.1f} s "
          f"({(full - stage_work) / full:.0%}: one DVC start-up, Prefect bookkeeping, artifacts)")
    print("stage work: " + ", ".join(f"{name} {t:.1f} s" for name, t in work.items()))

if __name__ == "__main__":
    main()

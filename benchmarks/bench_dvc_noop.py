"""No-op `dvc repro` overhead: the pipeline with nothing to do vs DVC's own start-up, side by side.

Builds a throw-away checkout of the pipeline in a temporary folder with ../shared/data/chest_xray (1,566
images) in its inbox, runs `dvc repro` once for real, then times `dvc repro` with nothing to do against
`dvc version` (DVC's start-up alone). Goal: the difference is at most about one second.

    uv run python benchmarks/bench_dvc_noop.py [--data ../shared/data/chest_xray] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "tasks", ".dvc/config", ".dvc/.gitignore",
         "data/inbox"]
BIN = Path(sys.executable).parent


def _project(dest: Path, data: Path) -> None:
    for name in FILES:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["dataset"]["sources"] = []
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "data/inbox/pneumonia" / data.name).symlink_to(data.resolve())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def _best(cmd: list[str], cwd: Path, repeat: int) -> float:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data with a folder of class subfolders")
    dvc = str(BIN / "dvc")
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        _project(project, args.data)
        full = _best([dvc, "repro"], project, 1)
        noop = _best([dvc, "repro"], project, args.repeat)
        startup = _best([dvc, "version"], project, args.repeat)
    print("| measure | seconds |\n|---|---|")
    print(f"| full `dvc repro` (first run) | {full:.2f} |")
    print(f"| no-op `dvc repro` (best of {args.repeat}) | {noop:.2f} |")
    print(f"| `dvc version`, DVC start-up (best of {args.repeat}) | {startup:.2f} |")
    print(f"| no-op overhead over start-up | {noop - startup:.2f} (goal <= ~1) |")
    print(f"ratio no-op / start-up: {noop / startup:.2f}x")


if __name__ == "__main__":
    main()

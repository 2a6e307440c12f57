"""No-op `dvc repro` overhead: the pipeline with nothing to do vs DVC's own start-up, side by side.

Builds a throw-away checkout of the pipeline in a temporary folder with ../shared/data/chest_xray (1,566
images) in its inbox, runs `dvc repro` once for real, then times `dvc repro` with nothing to do against
`dvc version` (DVC's start-up alone). Goal: the difference is at most about one second.

    uv run python benchmarks/bench_dvc_noop.py [--data ../shared/data/chest_xray] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dvc_project import DVC, ROOT, best_time, copy_pipeline


def _project(dest: Path, data: Path) -> None:
    copy_pipeline(dest)
    (dest / "data/inbox/pneumonia" / data.name).symlink_to(data.resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data with a folder of class subfolders")
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        _project(project, args.data)
        full = best_time([DVC, "repro"], project, 1)
        noop = best_time([DVC, "repro"], project, args.repeat)
        startup = best_time([DVC, "version"], project, args.repeat)
    print("| measure | seconds |\n|---|---|")
    print(f"| full `dvc repro` (first run) | {full:.2f} |")
    print(f"| no-op `dvc repro` (best of {args.repeat}) | {noop:.2f} |")
    print(f"| `dvc version`, DVC start-up (best of {args.repeat}) | {startup:.2f} |")
    print(f"| no-op overhead over start-up | {noop - startup:.2f} (goal <= ~1) |")
    print(f"ratio no-op / start-up: {noop / startup:.2f}x")


if __name__ == "__main__":
    main()

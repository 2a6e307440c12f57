"""Peak RSS of the filter step, a baseline revision's against the working tree's, on the same generated set.

    uv run python benchmarks/bench_filter_memory.py --set DIR [--baseline-rev 9b83cd2] [--work DIR]

``--set``: a folder of generated cells (``<set>/cells/<Class>/*.png``, as ``bench_increment.generate`` makes and
``bench_increment --sets`` reuses). The baseline is checked out with ``git worktree add`` into a temporary
folder (same dependencies: this environment runs it). For each of the two, a throw-away pipeline copy of its
own code (:func:`dvc_project.copy_pipeline`) gets the cells in its inbox and runs the stages up to the
manifest; then the filter command (dvc.yaml's) runs twice, each time its ``ru_maxrss`` of ``RUSAGE_CHILDREN``
(the command and its decode workers) recorded: cold (no verdict cache) and warm (a +1% increment of new cells
added and the manifest rebuilt; the N verdicts come from the cache). The two versions' clean table, rejects.csv
and filter.json must be byte-identical (else it exits non-zero). Printed: peak RSS in MB per version and run,
and the ratio working tree / baseline. Goal (issue 20): <= 300 MB at 27,558 and <= 1 KB an image of growth.

Measured (2 shared cores, filter command run by hand in pipeline copies like these; "warm" there was a rerun
with every verdict cached, no increment), peak RSS MB baseline 9b83cd2 -> filtermem, outputs byte-identical:
N = 6,000 cold 160 -> 141, warm 161 -> 140; N = 27,558 cold 300 -> 220, warm 305 -> 215; growth
6.7 -> 3.5 KB an image. Where the rest goes (tracemalloc at 27,558): the manifest frames (about 0.8 KB an
image), and the hex pHash / base64 thumbnail texts label_conflicts and clean_table make per clean row for
near_duplicate_groups (about 1.2 KB an image at their peak).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_increment import DATASET, SHARED, generate
from dvc_project import BIN, DVC, ROOT, copy_pipeline, output_bytes

_OUTPUTS = ("clean", "rejects.csv", "filter.json")
# Runs `medflow` from the project's own copy of the package (first on sys.path), then prints its peak RSS (KB).
_RUN = ("import resource, subprocess, sys; code = subprocess.call([sys.executable, '-c', "
        "'import sys; sys.path.insert(0, \"\"); from medflow.cli import main; sys.exit(main())', *sys.argv[1:]]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def _stage_cmd(project: Path, stage: str) -> list[str]:
    """dvc.yaml's command of ``stage`` for :data:`DATASET`, split into arguments."""
    cmd = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["do"]["cmd"]
    return cmd.replace("${item}", DATASET).split()


def _peak_kb(project: Path, stage: str) -> tuple[int, float]:
    """(peak RSS in KB, seconds) of one run of ``stage``'s command with the project's own code."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, *_stage_cmd(project, stage)[1:]], cwd=project,
                          capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{stage} failed in {project}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return int(done.stdout.split("PEAK")[-1].split()[0]), seconds


def _project(code: Path, dest: Path, cells: Path) -> Path:
    """A pipeline copy of ``code``'s files with ``cells`` hardlinked into its inbox, built up to the manifest."""
    copy_pipeline(dest, dataset=DATASET, root=code)
    inbox = dest / "data" / "inbox" / DATASET
    inbox.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(cells), str(inbox / "cells")], check=True)
    names = list(yaml.safe_load((dest / "dvc.yaml").read_text())["stages"])
    env_path = f"{BIN}:{Path(sys.executable).parent}"
    for stage in names[: names.index("manifest") + 1]:
        subprocess.run([DVC, "repro", "--single-item", f"{stage}@{DATASET}"], cwd=dest, check=True,
                       capture_output=True, env={"PATH": f"{env_path}:/usr/bin:/bin"})
    return dest


def measure(code: Path, dest: Path, cells: Path, increment: Path) -> dict[str, tuple[int, float]]:
    """Cold and warm (+1%) filter runs of ``code`` on ``cells``: (peak RSS KB, seconds) each."""
    project = _project(code, dest, cells)
    out = {"cold": _peak_kb(project, "filter")}
    shutil.copytree(project / "data" / "interim" / DATASET, dest.parent / f"{dest.name}-cold")
    subprocess.run(["cp", "-al", str(increment), str(project / "data" / "inbox" / DATASET / "increment")],
                   check=True)
    _peak_kb(project, "manifest")
    out["warm"] = _peak_kb(project, "filter")
    return out


def _same_outputs(a: Path, b: Path) -> list[str]:
    """The filter outputs that differ between the two interim folders."""
    return [name for name in _OUTPUTS if output_bytes(a / name) != output_bytes(b / name)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, required=True, help="a folder holding cells/<Class>/*.png")
    parser.add_argument("--baseline-rev", default="9b83cd2")
    parser.add_argument("--shared", type=Path, default=SHARED / "malaria_cells", help="for the +1% increment")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args()
    cells = args.set / "cells"
    n = sum(1 for _ in cells.rglob("*.png"))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        base = work / "baseline-code"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), args.baseline_rev], cwd=ROOT,
                       check=True)
        try:
            generate(work / "increment", max(1, round(n / 100)), 900_000, args.seed, args.shared)
            runs = {name: measure(code, work / name, cells, work / "increment")
                    for name, code in (("baseline", base), ("working tree", ROOT))}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
        interim = {name: work / name / "data" / "interim" / DATASET for name in runs}
        differ = {"cold": _same_outputs(work / "baseline-cold", work / "working tree-cold"),
                  "warm": _same_outputs(interim["baseline"], interim["working tree"])}
    print(f"filter peak RSS at N = {n:,} (baseline {args.baseline_rev} vs working tree; "
          f"self {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB)\n")
    print("| run | baseline MB | working tree MB | ratio | baseline s | working tree s | outputs |")
    print("|---|---|---|---|---|---|---|")
    for run in ("cold", "warm"):
        (b_kb, b_s), (w_kb, w_s) = runs["baseline"][run], runs["working tree"][run]
        same = "identical" if not differ[run] else "DIFFER: " + ", ".join(differ[run])
        print(f"| {run} | {b_kb / 1024:.0f} | {w_kb / 1024:.0f} | {w_kb / b_kb:.2f} | {b_s:.1f} | {w_s:.1f} "
              f"| {same} |")
    if any(differ.values()):
        sys.exit("the working tree's filter outputs differ from the baseline's")


if __name__ == "__main__":
    main()

"""Many small files in DVC: malaria-sized data as 27,558 image files vs the same bytes in a few ~64 MB shards.

DVC's cost grows with the number of files (hashing, state lookups, one transfer per file; DVC issues 7607,
10251). Two measurements, each side by side with its sharded twin in one run, ratio printed:

1. Processed data: 27,558 unique PNGs (replicas of ../shared/data/malaria_cells, each copy re-encoded with one
   pixel changed, since DVC stores identical content once) in medflow's layout,
   ``data/processed/malaria/images/<Class>/<file>.png``, vs the same files packed into uncompressed tar
   shards of about ``--shard-mb`` (``data/processed/malaria/shards/shard-00000.tar``). Timed: ``dvc add``,
   ``dvc status`` (nothing changed, best of 3), ``dvc push`` to the shipped default remote (a local directory,
   ``../medflow-dvc-remote``) and ``dvc pull`` after dropping the cache and the workspace copy.
2. The inbox as users fill it: the same images land in ``--landings`` batches in a copy of the pipeline
   (malaria only, ``sources: []``), each batch as a folder ``data/inbox/malaria/landing-NN/<Class>/`` or as one
   tar archive ``landing-NN.tar``. After each landing: ``dvc status download@malaria`` and
   ``dvc repro download@malaria`` (the download stage: DVC hashes the inbox, medflow lists and digests it).

Takes minutes and about 1.5 GB of disk in ``--work`` (a temporary folder by default, removed at the end):

    nice -n 10 uv run python benchmarks/bench_many_files.py [--data ../shared/data/malaria_cells]
        [--images 27558] [--landings 10] [--shard-mb 64] [--work DIR] [--out benchmarks/results/many_files.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from dvc_project import BIN, DVC, ROOT, copy_pipeline

IMAGES = "data/processed/malaria/images"
SHARDS = "data/processed/malaria/shards"


def make_images(src: Path, dest: Path, n: int) -> list[Path]:
    """``n`` unique PNGs in ``dest/<Class>/``: the originals of ``src`` once, then copies with pixel 0 changed."""
    originals = sorted(p for p in src.glob("*/*.png"))
    if not originals:
        sys.exit(f"{src}: no <Class>/*.png images (pass --data with the malaria_cells folder)")
    made = []
    for i in range(n):
        orig, copy = originals[i % len(originals)], i // len(originals)
        out = dest / orig.parent.name / (orig.name if copy == 0 else f"{orig.stem}_copy{copy}.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        if copy == 0:
            shutil.copyfile(orig, out)
        else:
            pixels = cv2.imread(str(orig), cv2.IMREAD_UNCHANGED)
            pixels.flat[0] = (int(pixels.flat[0]) + copy) % 256  # unique content: copy < 256
            ok, data = cv2.imencode(".png", pixels)
            assert ok, orig
            out.write_bytes(data.tobytes())
        made.append(out)
    return made


def pack(files: Sequence[Path], root: Path, dest: Path, shard_bytes: int) -> list[Path]:
    """Pack ``files`` (in order, named relative to ``root``) into uncompressed tars of about ``shard_bytes``."""
    groups: list[list[Path]] = [[]]
    size = 0
    for f in files:
        if size >= shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.stat().st_size + 512  # a tar member's header
    dest.mkdir(parents=True, exist_ok=True)
    shards = [dest / f"shard-{i:05d}.tar" for i in range(len(groups))]
    for shard, group in zip(shards, groups, strict=True):
        with tarfile.open(shard, "w") as tar:
            for f in group:
                tar.add(f, arcname=str(f.relative_to(root)))
    return shards


def dvc_project(dest: Path) -> Path:
    """A git + DVC project with the shipped DVC settings (default remote ``../medflow-dvc-remote``)."""
    for name in (".dvc/config", ".dvc/.gitignore", ".dvcignore"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


Timing = tuple[float, float]  # wall seconds, CPU seconds (user + system of the command and its children)


def timed(cmd: list[str], cwd: Path, repeat: int = 1) -> Timing:
    """The best wall time of ``repeat`` runs of ``cmd`` and that run's CPU time: on a shared, loaded machine
    CPU time is the steadier figure."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    runs = []
    for _ in range(repeat):
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        runs.append((wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime))
    return min(runs)


def count_files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def storage_round_trip(project: Path, target: str) -> dict[str, Timing]:
    """Time add, status, push and pull (cache and workspace dropped) of ``target`` in ``project``."""
    n = count_files(project / target)
    times = {"dvc add": timed([DVC, "add", target], project),
             "dvc status (nothing changed, best of 3)": timed([DVC, "status"], project, 3),
             "dvc push (local remote)": timed([DVC, "push"], project)}
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / target)
    times["dvc pull (cache and workspace dropped)"] = timed([DVC, "pull"], project)
    assert count_files(project / target) == n, f"{target}: pull brought back a different number of files"
    return times


def land(files: Sequence[Path], root: Path, inbox: Path, k: int, as_archive: bool) -> None:
    """Landing ``k``: ``files`` copied into the inbox as folder ``landing-k/`` or as archive ``landing-k.tar``."""
    name = f"landing-{k:02d}"
    if as_archive:
        with tarfile.open(inbox / f"{name}.tar", "w") as tar:
            for f in files:
                tar.add(f, arcname=str(f.relative_to(root)))
        return
    for f in files:
        out = inbox / name / f.relative_to(root)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)


def inbox_fill(project: Path, files: Sequence[Path], root: Path, landings: int, as_archive: bool
               ) -> list[tuple[Timing, Timing]]:
    """(``dvc status``, ``dvc repro``) of the download stage after each landing."""
    inbox = project / "data" / "inbox" / "malaria"
    out = []
    for k, chunk in enumerate(np.array_split(np.arange(len(files)), landings)):
        land([files[i] for i in chunk], root, inbox, k, as_archive)
        out.append((timed([DVC, "status", "download@malaria"], project),
                    timed([DVC, "repro", "download@malaria"], project)))
    return out


def _t(t: Timing) -> str:
    return f"{t[0]:.1f} ({t[1]:.1f})"


def _row(name: str, a: Timing, b: Timing) -> str:
    return f"| {name} | {_t(a)} | {_t(b)} | {a[0] / b[0]:.1f}x ({a[1] / b[1]:.1f}x) |"


def _sum(ts: Sequence[Timing]) -> Timing:
    return sum(t[0] for t in ts), sum(t[1] for t in ts)


def report(n: int, mb: float, shards: int, storage: dict[str, dict[str, Timing]],
           fill: dict[str, list[tuple[Timing, Timing]]], landings: int) -> str:
    files, sharded = storage["files"], storage["shards"]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, 1-min load {os.getloadavg()[0]:.1f} at the "
             f"end; {n:,} images, {mb:,.0f} MB; {shards} shards. Cells: wall s (CPU s).", "",
             f"| processed data | {n:,} files | {shards} shards | ratio wall (CPU) |", "|---|---|---|---|"]
    lines += [_row(k, files[k], sharded[k]) for k in files]
    lines.append(_row("all four", _sum(list(files.values())), _sum(list(sharded.values()))))
    lines += ["", f"| inbox landing (of {landings}) | images in inbox | folders: `dvc status download@malaria` | "
              "folders: `dvc repro download@malaria` | archives: status | archives: repro |",
              "|---|---|---|---|---|---|"]
    per = n / landings
    for k, ((fs, fr), (a_s, a_r)) in enumerate(zip(fill["folders"], fill["archives"], strict=True)):
        lines.append(f"| {k + 1} | {round(per * (k + 1)):,} | {_t(fs)} | {_t(fr)} | {_t(a_s)} | {_t(a_r)} |")
    tf, ta = (_sum([t for pair in fill[key] for t in pair]) for key in ("folders", "archives"))
    lines += ["", "| inbox, all landings | folders | archives | ratio wall (CPU) |", "|---|---|---|---|",
              _row("`dvc status` + `dvc repro`", tf, ta)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "malaria_cells")
    parser.add_argument("--images", type=int, default=27_558)
    parser.add_argument("--landings", type=int, default=10)
    parser.add_argument("--shard-mb", type=float, default=64)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "many_files.md")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data with the malaria_cells folder (<Class>/*.png)")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        files_project = dvc_project(work / "files" / "project")
        made = make_images(args.data, files_project / IMAGES, args.images)
        mb = sum(f.stat().st_size for f in made) / 1e6
        shards_project = dvc_project(work / "shards" / "project")
        shards = pack(made, files_project / IMAGES, shards_project / SHARDS, int(args.shard_mb * 1e6))
        print(f"{len(made):,} images ({mb:,.0f} MB), {len(shards)} shards", flush=True)
        fill: dict[str, list[tuple[Timing, Timing]]] = {}
        for key, as_archive in (("folders", False), ("archives", True)):
            project = work / f"inbox-{key}"
            copy_pipeline(project, dataset="malaria")
            fill[key] = inbox_fill(project, made, files_project / IMAGES, args.landings, as_archive)
            print(key, fill[key], flush=True)
        storage = {"files": storage_round_trip(files_project, IMAGES),
                   "shards": storage_round_trip(shards_project, SHARDS)}
        print(storage, flush=True)
    text = report(len(made), mb, len(shards), storage, fill, args.landings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

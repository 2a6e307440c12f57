"""The N ladder: every data stage's time and peak RSS at growing dataset sizes, and what a +1% increment costs.

    uv run python benchmarks/bench_increment.py [--sizes 1200 6000 27558] [--tiny 24] [--repeat 1] [--work DIR]
        [--out FILE]

Makes malaria-like sets from ``../shared/data/malaria_cells`` (1,200 NIH cells): each image is a shared cell
rotated or flipped, cropped to 80-95%, resized back, slightly brightened and renamed with new slide and patient
numbers, so no two files are identical (checked by sha256). For each N (and a tiny start-up run) it builds a
throw-away copy of the pipeline (:func:`dvc_project.copy_pipeline`: the malaria preset with ``sources: []``,
images in ``data/inbox/malaria/cells/``), runs the stages of dvc.yaml from the first to ``validate`` with one
``dvc repro validate@malaria``, as a user does (``--per-stage``: ``dvc repro --single-item <stage>@malaria`` for
each stage, as issue 20 measured; the names come from dvc.yaml, so a changed stage layout is measured as it is),
then adds a +1% increment as a new inbox folder and runs the same again. With one ``dvc repro``, a stage's
seconds are those of its ``medflow`` commands and DVC's own time (start-up, checks and hashing between them) is
a row of its own.

Printed (Markdown): seconds per stage and N; the growth exponent from the middle to the largest N with the fixed
start-up (the tiny run's time) removed, ``log((t_big - t0) / (t_mid - t0)) / log(N_big / N_mid)``; the +1% run
as a share of the full run, as measured and with the start-up run's full and +1% times taken off both (what the
increment's data costs, against what the data of a full run costs); ``.dvc/cache`` bytes the increment added
against the new images' processed bytes (N_new x size^2 x channels); and each stage's peak RSS: the largest
``ru_maxrss`` of a ``medflow`` command the stage ran (a wrapper first on PATH records ``RUSAGE_CHILDREN`` of
each, so worker processes count, DVC itself does not, and times it). Goals (issue 20): +1% <= 10% of the full
run, cache added <= 2x the new bytes, growth <= 1.05, peak RSS <= 300 MB at 27,558 and growing <= 1 KB an image.
``--repeat K`` runs each N K times on fresh projects and takes each stage's median (a second of the machine's
noise in one stage moves a growth exponent by about 0.05); the header shows the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from dvc_project import BIN, DVC, ROOT, copy_pipeline
from PIL import Image, ImageEnhance

SHARED = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATASET = "malaria"
LAST_STAGE = "validate"  # no training
DVC_ROW = "(dvc itself)"  # DVC's own time in a run, beside its stages' commands
MAX_CELLS_PER_PATIENT = 100  # NIH: 27,558 cells of about 200 patients; fewer a patient at small N, so every split
# gets both classes
_FLIPS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
          Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM)
_WRAPPER = '''#!{python}
import resource, subprocess, sys, time
start = time.time()
code = subprocess.call([{real!r}, *sys.argv[1:]])
end = time.time()
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open({log!r}, "a") as f:
    f.write(f"{{sys.argv[1] if len(sys.argv) > 1 else '-'}} {{peak}} {{start}} {{end}}\\n")
sys.exit(code)
'''


# ---------------------------------------------------------------------------------------------------------
# the generated sets


def _variant(args: tuple[str, str, int]) -> tuple[str, str]:
    """Write one altered copy of the cell ``src`` to ``dest`` (seeded by ``seed``); (dest, its sha256)."""
    src, dest, seed = args
    rng = random.Random(seed)
    with Image.open(src) as im:
        im = im.convert("RGB")
        flip = rng.choice(_FLIPS)
        if flip is not None:
            im = im.transpose(flip)
        w, h = im.size
        f = rng.uniform(0.80, 0.95)
        cw, ch = max(1, round(w * f)), max(1, round(h * f))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(1.02, 1.08))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        im.save(dest, compress_level=3)
    return dest, hashlib.sha256(Path(dest).read_bytes()).hexdigest()


def _cells(shared: Path) -> dict[str, list[str]]:
    classes = {c.name: sorted(str(p) for p in c.glob("*.png")) for c in sorted(shared.iterdir()) if c.is_dir()}
    if not all(classes.values()) or len(classes) != 2:
        sys.exit(f"{shared}: expected two class folders of PNG cells")
    return classes


def generate(dest: Path, n: int, first_patient: int, seed: int, shared: Path) -> int:
    """``n`` altered cells under ``dest/<Class>/``, classes alternating, ``n / 250`` per patient (1 to
    :data:`MAX_CELLS_PER_PATIENT`; numbered from ``first_patient``, one slide each); returns their total bytes.
    No two files are identical."""
    classes = _cells(shared)
    per_patient = max(1, min(MAX_CELLS_PER_PATIENT, n // 250))
    names = sorted(classes)
    jobs = []
    for i in range(n):
        cls = names[i % 2]
        j = i // 2
        patient = first_patient + 2 * (j // per_patient) + i % 2
        src = classes[cls][(j * 7919 + seed) % len(classes[cls])]
        name = f"C{patient + 5000}P{patient}ThinF_IMG_20260101_{j:06d}_cell_{j % per_patient}.png"
        jobs.append((src, str(dest / cls / name), seed * 10_000_019 + i))
    seen: dict[str, str] = {}
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for path, sha in pool.map(_variant, jobs, chunksize=64):
            if sha in seen:  # astronomically unlikely; say so rather than bench a set with a duplicate
                sys.exit(f"{path} is identical to {seen[sha]}: change --seed")
            seen[sha] = path
    return sum(Path(p).stat().st_size for p in seen.values())


# ---------------------------------------------------------------------------------------------------------
# the throw-away project


def data_stages(project: Path) -> list[str]:
    """dvc.yaml's stage names from the first to :data:`LAST_STAGE`, in file order."""
    names = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    return names[: names.index(LAST_STAGE) + 1]


def _wrapped_bin(tmp: Path, log: Path) -> Path:
    """A folder holding a ``medflow`` that runs the real one and appends its peak RSS (KB) to ``log``."""
    folder = tmp / "bin"
    folder.mkdir(exist_ok=True)
    script = folder / "medflow"
    script.write_text(_WRAPPER.format(python=sys.executable, real=str(BIN / "medflow"), log=str(log)))
    script.chmod(0o755)
    return folder


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _commands(project: Path, stages: list[str]) -> dict[str, str]:
    """Each ``medflow`` subcommand of dvc.yaml -> the stage that runs it (download runs preflight too)."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    out = {}
    for stage in stages:
        cmd = spec[stage]["do"]["cmd"]
        for line in [cmd] if isinstance(cmd, str) else cmd:
            out.update({m: stage for m in re.findall(r"\bmedflow (\w+)", line)})
    return out


def _logged(log: Path) -> list[tuple[str, int, float]]:
    """(subcommand, peak RSS in KB, seconds) of each ``medflow`` run the wrapper logged."""
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return [(r[0], int(r[1]), float(r[3]) - float(r[2])) for r in rows]


def run_stages(project: Path, stages: list[str], wrapped: Path, log: Path, may_fail: bool = False,
               per_stage: bool = False) -> dict[str, tuple[float, int]]:
    """(seconds, peak RSS in KB) per stage, and DVC's own time as :data:`DVC_ROW`.

    By default one ``dvc repro <last stage>@malaria``, as a user runs the pipeline: a stage's seconds are its
    ``medflow`` commands' (timed by the wrapper), and DVC's row is the rest of the wall time (its start-up, its
    checks and hashing between the commands). With ``per_stage``, ``dvc repro --single-item <stage>@malaria``
    for each stage, as issue 20 measured: a stage's seconds are its whole process, DVC's included (DVC's row is
    0). ``may_fail``: the last stage may fail (the start-up run's few images fail validation, after the same
    fixed work)."""
    env = {**os.environ, "PATH": f"{wrapped}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}
    targets = [[s] for s in stages] if per_stage else [stages]
    owner = _commands(project, stages)
    out = {s: (0.0, 0) for s in stages}
    dvc_seconds = 0.0
    for group in targets:
        log.write_text("")
        args = ["--single-item"] if per_stage else []
        start = time.perf_counter()
        done = subprocess.run([DVC, "repro", *args, f"{group[-1]}@{DATASET}"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=3600)
        seconds = time.perf_counter() - start
        if done.returncode and not (may_fail and _failed_last(done.stdout + done.stderr, stages[-1])):
            sys.exit(f"{group[-1]}@{DATASET} failed in {project}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        commands = _logged(log)
        if per_stage:
            out[group[0]] = (seconds, max((peak for _, peak, _ in commands), default=0))
            continue
        for name, peak, secs in commands:
            stage = owner[name]
            out[stage] = (out[stage][0] + secs, max(out[stage][1], peak))
        dvc_seconds = seconds - sum(secs for _, _, secs in commands)
    return {**out, DVC_ROW: (dvc_seconds, 0)}


def _failed_last(output: str, last: str) -> bool:
    """Whether DVC's output says the last stage's command failed (what the start-up run's few images do)."""
    return f"'{last}@{DATASET}'" in output and "failed to reproduce" in output


def _cells_of(n: int, inbox: Path, shared: Path, seed: int, sets: Path | None) -> int:
    """``inbox/cells``: a set generated earlier (``sets/n<N>/cells``, hardlinked, read once to warm the page cache) or
    a new one; its bytes."""
    made = sets / f"n{n}" / "cells" if sets else None
    if made is None or not made.is_dir():
        return generate(inbox / "cells", n, 1000, seed, shared)
    subprocess.run(["cp", "-al", str(made), str(inbox / "cells")], check=True)
    _warm(inbox / "cells")
    return _tree_bytes(inbox / "cells")


def _warm(folder: Path) -> None:
    """Read every file under ``folder`` once, so that a set made earlier runs from the page cache as one made
    in the run does: without it the 27,558 set's cold reads gave the manifest a growth of 1.3-1.5 where the
    step itself grows 1.03 (6.1 s against 1.65 s hot, 10.3 s with the page cache dropped)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def measure(n: int, work: Path, shared: Path, seed: int, tiny: bool = False,
            sets: Path | None = None, per_stage: bool = False) -> dict[str, Any]:
    """Full run and +1% run of a fresh project with ``n`` generated cells (the project is deleted after)."""
    project = work / f"project-{n}"
    shutil.rmtree(project, ignore_errors=True)
    copy_pipeline(project, dataset=DATASET)
    inbox = project / "data" / "inbox" / DATASET
    raw = _cells_of(n, inbox, shared, seed, sets)
    log = work / "rss.log"
    wrapped = _wrapped_bin(work, log)
    stages = data_stages(project)
    full = run_stages(project, stages, wrapped, log, tiny, per_stage)
    n_new = max(1, round(n / 100))
    cache_before = _tree_bytes(project / ".dvc" / "cache")
    new_raw = generate(inbox / "increment", n_new, 900_000, seed + 1, shared)
    inc = run_stages(project, stages, wrapped, log, tiny, per_stage)
    added = _tree_bytes(project / ".dvc" / "cache") - cache_before
    params = yaml.safe_load((project / "datasets" / f"{DATASET}.yaml").read_text())
    shared_params = yaml.safe_load((project / "params.yaml").read_text())
    size = (params.get("resize") or {}).get("size") or shared_params["resize"]["size"]
    channels = params["dataset"]["channels"]
    shutil.rmtree(project)
    print(f"N = {n}: full {full}, +1% {inc}, cache added {added} bytes", file=sys.stderr, flush=True)  # if killed
    return {"n": n, "raw_bytes": raw, "full": full, "inc": inc, "n_new": n_new, "new_raw_bytes": new_raw,
            "cache_added": added, "new_processed_bytes": n_new * size * size * channels}


def median_run(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One N's repeats as one: each stage's median seconds and largest peak RSS, full and +1% runs alike (the
    rest, the same in every repeat, from the first; the cache bytes their median)."""
    def merged(key: str) -> dict[str, tuple[float, int]]:
        return {s: (statistics.median(r[key][s][0] for r in repeats), max(r[key][s][1] for r in repeats))
                for s in repeats[0][key]}
    return {**repeats[0], "full": merged("full"), "inc": merged("inc"),
            "cache_added": statistics.median(r["cache_added"] for r in repeats)}


# ---------------------------------------------------------------------------------------------------------
# the table


def _growth(t0: float, t_mid: float, t_big: float, n_mid: int, n_big: int) -> str:
    if n_mid == n_big:
        return "n/a (one N)"
    a, b = t_mid - t0, t_big - t0
    if a <= 0 or b <= 0:
        return "n/a (within start-up)"
    return f"{math.log(b / a) / math.log(n_big / n_mid):.2f}"


def _share(part: float, whole: float) -> str:
    """``part / whole`` as a percentage, each with the start-up run's time taken off (n/a when within it)."""
    if whole <= 0:
        return "n/a (within start-up)"
    return f"{max(part, 0.0) / whole:.0%}"


def table(tiny: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    stages = list(tiny["full"])
    sizes = [r["n"] for r in runs]
    mid, big = runs[-2] if len(runs) > 1 else runs[-1], runs[-1]
    lines = [f"| stage | start-up (N = {tiny['n']}) | " + " | ".join(f"N = {n:,}" for n in sizes)
             + f" | growth {mid['n']:,} -> {big['n']:,} | +1% at {big['n']:,} | peak RSS MB "
             + " / ".join(f"{n:,}" for n in sizes) + " |",
             "|---|" + "---|" * (len(sizes) + 4)]
    for s in stages:
        t0 = tiny["full"][s][0]
        cells = " | ".join(f"{r['full'][s][0]:.1f} s" for r in runs)
        rss = " / ".join(f"{max(r['full'][s][1], r['inc'][s][1]) / 1024:.0f}" for r in runs)
        growth = _growth(t0, mid["full"][s][0], big["full"][s][0], mid["n"], big["n"])
        lines.append(f"| {s} | {t0:.1f} s | {cells} | {growth} | {big['inc'][s][0]:.1f} s | {rss} |")
    tot = {id(r): sum(v[0] for v in r["full"].values()) for r in [tiny, *runs]}
    inc = {id(r): sum(v[0] for v in r["inc"].values()) for r in runs}
    lines.append(f"| whole run | {tot[id(tiny)]:.1f} s | " + " | ".join(f"{tot[id(r)]:.1f} s" for r in runs)
                 + f" | {_growth(tot[id(tiny)], tot[id(mid)], tot[id(big)], mid['n'], big['n'])} | "
                 f"{inc[id(big)]:.1f} s | |")
    lines.append("")
    lines.append("| N | +1% images | +1% run | share of full run (goal <= 10%) | share, start-up removed | "
                 ".dvc/cache added | new processed bytes | ratio (goal <= 2x) | peak RSS growth from the N before, "
                 "KB/image (goal <= 1) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    t0_full, t0_inc = tot[id(tiny)], sum(v[0] for v in tiny["inc"].values())
    for r in runs:
        share = inc[id(r)] / tot[id(r)]
        marginal = _share(inc[id(r)] - t0_inc, tot[id(r)] - t0_full)
        ratio = r["cache_added"] / r["new_processed_bytes"]
        growth = ""
        if r is big and len(runs) > 1:
            per = [(max(big["full"][s][1], big["inc"][s][1]) - max(mid["full"][s][1], mid["inc"][s][1]))
                   / (big["n"] - mid["n"]) for s in stages]
            growth = f"{max(per):.2f} (worst stage)"
        lines.append(f"| {r['n']:,} | {r['n_new']} | {inc[id(r)]:.1f} s | {share:.0%} | {marginal} "
                     f"| {r['cache_added'] / 1e6:.1f} MB"
                     f" | {r['new_processed_bytes'] / 1e6:.1f} MB | {ratio:.2f}x | {growth} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1200, 6000, 27558])
    parser.add_argument("--tiny", type=int, default=24, help="the start-up run's size")
    parser.add_argument("--shared", type=Path, default=SHARED / "malaria_cells")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--sets", type=Path, default=None,
                        help="reuse sets generated before (as <sets>/n<N>/cells, by generate()) instead of making them")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per N (each on a fresh project): every stage's median seconds, its largest peak RSS")
    parser.add_argument("--per-stage", action="store_true",
                        help="a `dvc repro --single-item` per stage, as issue 20 measured (default: one `dvc repro`)")
    args = parser.parse_args()
    if not args.shared.is_dir():
        sys.exit(f"{args.shared} not found: pass --shared with the malaria_cells folder")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        load = os.getloadavg()
        tiny = median_run([measure(args.tiny, work, args.shared, args.seed, tiny=True, per_stage=args.per_stage)
                           for _ in range(args.repeat)])
        runs = [median_run([measure(n, work, args.shared, args.seed, sets=args.sets, per_stage=args.per_stage)
                            for _ in range(args.repeat)]) for n in sorted(args.sizes)]
        how = "a `dvc repro --single-item` per stage" if args.per_stage else "one `dvc repro` a run"
        repeats = "one repeat per N" if args.repeat == 1 else f"the median of {args.repeat} repeats per N"
        text = (f"{how}; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {repeats}\n\n"
                + table(tiny, runs))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Benchmark: medflow's resize step against the tutorial baseline, side by side in one run.

    python benchmarks/bench_resize.py [--data DIR] [--size 224] [--repeat 5] [--out FILE]

On ``../shared/data/chest_xray_fullres`` (120 full-resolution X-rays) it measures, after warming the page
cache and taking the best of ``--repeat`` interleaved runs:

- the tutorial baseline: a ThreadPoolExecutor (one thread per core) over ``cv2.imread(path)`` in colour +
  ``cv2.resize(..., (size, size), interpolation=cv2.INTER_CUBIC)``, results kept in memory;
- medflow's resize step (``tasks.resize.run``, the code path of ``medflow resize``) with an empty store and
  all cores, as configured for X-rays (1 channel) and with 3 channels; it also writes its image store
  (shards + index) and publishes it (hard links), which the baseline does not;
- the single-core rate of the same preprocessing (``load_resized`` in a loop, OpenCV on one thread: the
  reduced JPEG decodes) and the parallel efficiency = step rate / (single-core rate * cores), the whole
  step (manifest read, worker start, cache and output writes) against perfect scaling of the decoding alone;
  beside it the step run with ``resize.workers: 1`` and the scaling of the step against itself on one core
  (the textbook T1 / (p * Tp), which does not charge the step's own serial costs to the parallelism);
- the entropy-decoding floor: each JPEG decoded at 1/8 scale on one core (Huffman decoding, which no
  decoder can skip at any scale, is most of the work on both sides);
- an incremental run: the same folder (symlinked) plus about 1% new files, against a warm cache, as a
  share of a full run;
- the ``medflow resize`` command in a fresh process (what ``dvc repro`` runs), empty cache and all cached,
  next to Python's start-up with its imports;
- peak RSS of the step on ``chest_xray`` (1 channel) and ``malaria_cells`` (3 channels), each in a fresh
  subprocess: the peak (VmHWM) of the process itself and of its largest child process (the fork server
  or a worker, sampled every 5 ms while they run), next to the baseline's.

Goals: >= 1.5x the baseline; parallel efficiency >= 0.9; incremental run <= 5% of a full run; peak RSS
flat in the dataset size. Prints a Markdown table; ``--out FILE`` also writes it. Each timing shows the best
run (what counts) and the median; the two ratios with a goal are also given as the median of their
per-repeat values (contenders of one repeat run back to back, so slow drifts of the machine cancel). The
header shows the load average before and after, since other jobs on a small shared machine move every
number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import simplejpeg
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from medflow.config import Config, parse_config  # noqa: E402
from medflow.imaging import decode  # noqa: E402
from medflow.io import n_workers, read_csv, sha256_file, write_csv  # noqa: E402
from medflow.schema import CLEAN_COLUMNS, IMAGE_EXTENSIONS  # noqa: E402
from tasks import resize  # noqa: E402

SHARED = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_DATA = SHARED / "chest_xray_fullres"
RSS_DATA = (("chest_xray", 1), ("malaria_cells", 3))


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def write_clean_csv(files: list[Path], dest: Path) -> Path:
    """A clean.csv for ``files`` (what the filter step hands the resize step): digest and header facts."""
    rows = []
    for f in files:
        with Image.open(f) as im:
            w, h, fmt, mode = im.width, im.height, im.format, im.mode
        rows.append({"path": str(f), "relpath": f.name, "root": str(f.parent), "class_name": f.parent.name,
                     "label": 0, "group": f.stem, "source_split": "", "sha256": sha256_file(f),
                     "bytes": f.stat().st_size, "width": w, "height": h, "mode": mode, "format": fmt,
                     "phash": "0" * 16, "dup_group": ""})
    write_csv(dest, pd.DataFrame(rows, columns=CLEAN_COLUMNS))
    return dest


def params(size: int, channels: int, workers: int = 0) -> dict[str, Any]:
    return {"dataset": {"name": "bench", "sources": ["bench"], "labels": {"a": 0, "b": 1}, "channels": channels},
            "resize": {"size": size, "workers": workers}}


def config(size: int, channels: int, workers: int = 0) -> Config:
    return parse_config(params(size, channels, workers))


def warm_page_cache(files: list[Path]) -> None:
    for f in files:
        f.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# the contenders
# ---------------------------------------------------------------------------------------------------------


def baseline(files: list[Path], size: int, workers: int) -> np.ndarray:
    """The tutorial way: threads over cv2.imread (colour) + INTER_CUBIC resize, all images in memory."""
    def load(path: Path) -> np.ndarray:
        img = cv2.imread(str(path))
        assert img is not None, path
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.array(list(pool.map(load, files)))


def step(cfg: Config, clean: Path, work: Path, cache: Path | None = None) -> dict[str, Any]:
    """One run of the resize step; a fresh empty cache unless ``cache`` is given."""
    cache = cache or Path(tempfile.mkdtemp(prefix="cache.", dir=work))
    return resize.run(cfg, clean=clean, out=work / "images", stats=work / "resize.json", cache=cache)


def remove_outputs(work: Path) -> None:
    """What ``dvc repro`` does before it runs the stage's command: delete its (non-persistent) outputs.

    Not timed, as in DVC (the published store is hard links: removing it costs no write-back).
    """
    shutil.rmtree(work / "images", ignore_errors=True)
    (work / "resize.json").unlink(missing_ok=True)


def timed_step(cfg: Config, clean: Path, work: Path, cache: Path | None = None) -> float:
    remove_outputs(work)
    return timed(lambda: step(cfg, clean, work, cache))


def single_core_rate(clean: Path, size: int, channels: int) -> float:
    """Images/s of the step's preprocessing in one process with OpenCV on one thread (no cache, no output)."""
    rows = read_csv(clean)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        start = time.perf_counter()
        for r in rows.itertuples():
            decode.load_resized(r.path, size=size, channels=channels, width=r.width, height=r.height,
                                fmt=r.format, mode=r.mode)
        return len(rows) / (time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)


def entropy_floor_rate(files: list[Path]) -> float:
    """Images/s of reading and decoding each JPEG at 1/8 scale on one core, without resizing.

    At 1/8 the inverse DCT keeps only each block's DC term, so this is libjpeg-turbo's entropy (Huffman)
    decoding: work that every decoder does in full at any scale, the baseline's included.
    """
    start = time.perf_counter()
    for f in files:
        simplejpeg.decode_jpeg(f.read_bytes(), "GRAY", min_height=1, min_width=1, strict=False)
    return len(files) / (time.perf_counter() - start)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def command_seconds(clean: Path, work: Path, size: int, repeat: int) -> dict[str, float]:
    """Wall time of ``medflow resize`` in a fresh process, what ``dvc repro`` runs: best of ``repeat``.

    ``full``: empty cache; ``cached``: every image cached; ``imports``: Python start-up and the imports
    alone (``medflow.cli`` and ``tasks.resize``), the floor of any run of the command.
    """
    param_file = work / "params.yaml"
    param_file.write_text(yaml.safe_dump(params(size, 1)))
    roots = work / "roots.json"
    roots.write_text("[]\n")  # clean.csv names every image by a plain path

    def command(cache: Path) -> list[str]:
        return [sys.executable, "-m", "medflow.cli", "resize", "--params", str(param_file), "--clean", str(clean),
                "--out", str(work / "images"), "--stats", str(work / "resize.json"), "--cache", str(cache),
                "--roots-json", str(roots)]

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeat):
            remove_outputs(work)
            times.append(timed(fn))
        return min(times)

    def run(cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)

    full = best(lambda: run(command(Path(tempfile.mkdtemp(prefix="cache.", dir=work)))))
    cached = work / "cmd_cache"
    run(command(cached))  # fill it
    return {"full": full, "cached": best(lambda: run(command(cached))),
            "imports": best(lambda: run([sys.executable, "-c", "import medflow.cli, tasks.resize"]))}


# ---------------------------------------------------------------------------------------------------------
# incremental run
# ---------------------------------------------------------------------------------------------------------


def grown_copy(files: list[Path], root: Path, dest: Path) -> tuple[list[Path], list[Path]]:
    """Symlink ``files`` under ``dest`` and add about 1% new images (flipped re-encodes: new contents)."""
    linked = []
    for f in files:
        link = dest / f.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())  # absolute: --data may be a relative path
        linked.append(link)
    k = -(-len(files) // 100)  # ceil(1%)
    new = []
    for i, f in enumerate(files[:: len(files) // k][:k]):
        path = dest / f.relative_to(root).parent / f"new{i}_{f.stem}.jpeg"
        with Image.open(f) as im:
            im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(path, quality=92)
        new.append(path)
    return linked, new


def incremental(files: list[Path], root: Path, cfg: Config, work: Path, repeat: int) -> dict[str, Any]:
    """Best time of a run over the folder + ~1% new files, with every old image already cached."""
    linked, new = grown_copy(files, root, work / "grown")
    old_clean = write_clean_csv(linked, work / "clean_old.csv")
    all_clean = write_clean_csv(linked + new, work / "clean_new.csv")
    before, cache = work / "inc_before", work / "inc_cache"
    step(cfg, old_clean, work, before)  # the state before the new data landed
    best = float("inf")
    for _ in range(repeat):
        shutil.rmtree(cache, ignore_errors=True)  # the store as it was: hard links (its files are immutable)
        shutil.copytree(before, cache, copy_function=os.link)
        remove_outputs(work)
        start = time.perf_counter()
        summary = step(cfg, all_clean, work, cache)
        best = min(best, time.perf_counter() - start)
        assert summary["decoded"] == len(new), summary
    return {"new": len(new), "old": len(linked), "seconds": best}


# ---------------------------------------------------------------------------------------------------------
# peak memory, each measurement in a fresh process
# ---------------------------------------------------------------------------------------------------------


def peak_mb(pid: int | str = "self") -> float:
    """Peak resident set of a live process in MB: its ``VmHWM`` (Linux), 0 once it has exited.

    Not ``ru_maxrss``: a child's starts at its parent's resident set when it was forked (Linux keeps the
    larger of the two across ``exec``), so a subprocess of this benchmark would report the benchmark's own.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return 0.0


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid`` and theirs (the fork server, and the worker processes it forked)."""
    found, todo = [], [pid]
    while todo:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{todo.pop()}/task").iterdir():
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


class DescendantPeaks:
    """Samples the peak RSS of this process's descendants every few ms while a step runs (workers exit
    at its end, taking their VmHWM with them); ``largest`` is the largest of them, in MB: the fork server
    or a worker process (the resource tracker is smaller)."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.largest, self._every_s, self._stop = 0.0, every_s, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> DescendantPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        own = _cmdline(os.getpid())
        while not self._stop.wait(self._every_s):
            for pid in _descendants(os.getpid()):
                if _cmdline(pid) != own:  # one forked but not yet exec'd still has this process's pages
                    self.largest = max(self.largest, peak_mb(pid))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_child(data: Path, size: int, channels: int, what: str) -> None:
    """Subprocess body: run the step (or the baseline) once, print peak RSS figures as JSON."""
    files = image_files(data)
    with tempfile.TemporaryDirectory() as tmp, DescendantPeaks() as workers:
        work = Path(tmp)
        if what == "baseline":
            before_mb = peak_mb()
            out_mb = baseline(files, size, n_workers(0)).nbytes / 2**20
        else:
            clean = write_clean_csv(files, work / "clean.csv")
            before_mb = peak_mb()
            summary = step(config(size, channels), clean, work)
            out_mb = sum(p.stat().st_size for p in (work / "images" / "shards").iterdir()) / 2**20
            assert summary["images"] == len(files)
    print(json.dumps({"images": len(files), "out_mb": out_mb, "before_mb": before_mb, "self_mb": peak_mb(),
                      "children_mb": workers.largest}))


def peak_rss(data: Path, size: int, channels: int, what: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--rss-child", str(data), "--size", str(size),
           "--channels", str(channels), "--rss-what", what]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return (f"{cpu}, {n_workers(0)} cores, Python {platform.python_version()}, OpenCV {cv2.__version__}, "
            f"Pillow {Image.__version__}")


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measure | result | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def run_benchmark(data: Path, size: int, repeat: int) -> str:
    load_before = os.getloadavg()[0]
    files = image_files(data)
    cores = n_workers(0)
    jpeg_only = all(f.suffix.lower() in (".jpg", ".jpeg") for f in files)
    warm_page_cache(files)
    with tempfile.TemporaryDirectory(prefix="bench_resize.") as tmp:
        work = Path(tmp)
        clean = write_clean_csv(files, work / "clean.csv")
        cfg1, cfg3, cfg1_one = config(size, 1), config(size, 3), config(size, 1, workers=1)
        first = timed_step(cfg1, clean, work)  # includes the one-time fork server start
        times: dict[str, list[float]] = {"baseline": [], "baseline_1": [], "medflow1": [], "medflow3": [],
                                         "medflow1_one": [], "single": [], "floor": []}
        for _ in range(repeat):  # interleaved, so that load on the machine hits all of them alike
            times["baseline"].append(timed(lambda: baseline(files, size, cores)))
            times["baseline_1"].append(timed(lambda: baseline(files, size, 1)))
            times["medflow1"].append(timed_step(cfg1, clean, work))
            times["medflow3"].append(timed_step(cfg3, clean, work))
            times["medflow1_one"].append(timed_step(cfg1_one, clean, work))
            times["single"].append(len(files) / single_core_rate(clean, size, 1))
            if jpeg_only:
                times["floor"].append(len(files) / entropy_floor_rate(files))
        best = {k: min(v) for k, v in times.items() if v}
        median = {k: statistics.median(v) for k, v in times.items() if v}
        rate = {k: len(files) / v for k, v in best.items()}
        single = rate["single"]
        inc = incremental(files, data, cfg1, work, repeat)
        cmd = command_seconds(clean, work, size, min(repeat, 5))
    rss = {(name, what): peak_rss(SHARED / name, size, ch, what)
           for name, ch in RSS_DATA if (SHARED / name).is_dir() for what in ("medflow", "baseline")}

    efficiency = rate["medflow1"] / (single * cores)
    scaling = rate["medflow1"] / (rate["medflow1_one"] * cores)
    speedup, speedup3 = rate["medflow1"] / rate["baseline"], rate["medflow3"] / rate["baseline"]
    # the same two ratios within each repeat (its contenders ran back to back), then their median
    paired_speedup = statistics.median(b / m for b, m in zip(times["baseline"], times["medflow1"], strict=True))
    paired_efficiency = statistics.median(s / (cores * m) for s, m in zip(times["single"], times["medflow1"],
                                                                           strict=True))
    inc_share = inc["seconds"] / best["medflow1"]
    def timing(k: str) -> str:
        return f"{rate[k]:.0f} images/s ({best[k]:.3f} s; median {median[k]:.3f} s)"

    rows = [
        (f"baseline: {cores} threads, cv2.imread colour + INTER_CUBIC (in memory)", timing("baseline"), ""),
        ("medflow resize, 1 channel (X-ray config), empty cache, all cores", timing("medflow1"), ""),
        ("speed-up vs baseline, 1 channel: best vs best; median of the per-repeat ratios",
         f"**{speedup:.2f}x**; {paired_speedup:.2f}x", ">= 1.5x"),
        ("medflow resize, 3 channels", timing("medflow3"), ""),
        ("speed-up vs baseline, 3 channels", f"{speedup3:.2f}x", ""),
        ("first step run in a fresh process (fork server start included)", f"{first:.3f} s", ""),
        ("single-core preprocessing rate (load_resized, 1 channel, reduced decodes)",
         f"{single:.0f} images/s (baseline on 1 thread: {rate['baseline_1']:.0f})", ""),
        *([("entropy decoding alone (1/8-scale decodes, no resize), single core: work every JPEG decoder "
            "does in full, the baseline's too", f"{rate['floor']:.0f} images/s", "")] if "floor" in rate else []),
        (f"perfect scaling: single-core rate x {cores} cores", f"{single * cores:.0f} images/s "
         f"(= {single * cores / rate['baseline']:.2f}x the baseline)", ""),
        ("ceiling of the speed-up if both scaled perfectly: single-core rate / the baseline's on 1 thread",
         f"{single / rate['baseline_1']:.2f}x", ""),
        (f"parallel efficiency = step rate / (single-core rate x {cores}): best vs best; median of the "
         "per-repeat ratios", f"**{efficiency:.2f}**; {paired_efficiency:.2f}", ">= 0.9"),
        ("medflow resize with resize.workers: 1 (the whole step on one core)", timing("medflow1_one"), ""),
        (f"scaling of the step itself = step rate / (its one-core rate x {cores})", f"{scaling:.2f}", ""),
        (f"the same for the baseline: {cores} threads / (1 thread x {cores}), what this machine allows",
         f"{rate['baseline'] / (rate['baseline_1'] * cores):.2f}", ""),
        (f"incremental run: {inc['new']} new + {inc['old']} cached images",
         f"{inc['seconds']:.3f} s = **{100 * inc_share:.1f}%** of a full run", "<= 5%"),
    ]
    rows += [
        ("`medflow resize` in a fresh process (what `dvc repro` runs), empty cache",
         f"{cmd['full']:.2f} s wall", ""),
        ("the same, every image cached", f"{cmd['cached']:.2f} s wall", ""),
        ("of which start-up and imports (`medflow.cli`, `tasks.resize`)", f"{cmd['imports']:.2f} s", ""),
    ]
    for (name, what), r in rss.items():
        if what == "medflow":
            rows.append((f"peak RSS, resize step on {name} ({r['images']} images, output {r['out_mb']:.0f} MB)",
                         f"process {r['self_mb']:.0f} MB ({r['before_mb']:.0f} MB before the step), largest "
                         f"child process {r['children_mb']:.0f} MB",
                         "flat in N"))
        else:
            rows.append((f"peak RSS, baseline on {name} (all images in memory, {r['out_mb']:.0f} MB)",
                         f"process {r['self_mb']:.0f} MB ({r['before_mb']:.0f} MB before)", ""))
    header = (f"Resize benchmark on {data.name} ({len(files)} images) at {size}x{size}, best of {repeat}; "
              f"{machine()}; 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.")
    return header + "\n\n" + table(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each contender; the best counts")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rss-what", default="medflow", help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.size, args.channels, args.rss_what)
        return 0
    if not args.data.is_dir() or not image_files(args.data):
        print(f"bench_resize: no images under {args.data}: point --data at a folder of images "
              f"(e.g. ../shared/data/chest_xray_fullres)", file=sys.stderr)
        return 2
    report = run_benchmark(args.data, args.size, args.repeat)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

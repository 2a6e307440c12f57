"""Benchmark: what a +1% increment costs the resize stage under DVC: bytes added to .dvc/cache, wall time.

    python benchmarks/bench_store_increment.py [--n 2000] [--size 128] [--old-src DIR] [--out FILE]

Generates ``--n`` distinct JPEGs (256 x 256, textured), then in a throw-away DVC project per layout runs the
resize stage the way dvc.yaml declares it (``dvc repro``), adds 1% new images to clean.csv and runs it again.
Per layout it prints the increment's ``dvc repro`` wall time, the step's own seconds (resize.json), and the
bytes the increment added to ``.dvc/cache`` (``du``: real disk blocks), next to the new images' own bytes.

Layouts: ``store`` (this code: the image store in the --cache folder, published to ``images/`` as hard links,
a non-persistent DVC output), ``store-persist`` (the same with ``images/`` ``persist: true``: DVC copies
each hardlinked file of a persistent output before the run) and, with ``--old-src`` (a checkout of medflow
before the store, e.g. ``git worktree add /tmp/old <commit>``), ``npy`` (images.npy + the SQLite cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
from bench_resize import write_clean_csv  # noqa: E402

BIN = Path(sys.executable).parent


def make_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
        img = cv2.resize(small, (256, 256), interpolation=cv2.INTER_CUBIC)
        path = folder / f"img_{i:05d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        files.append(path)
    return files


def du(path: Path) -> int:
    """Disk bytes under ``path`` (each hard-linked inode once)."""
    out = subprocess.run(["du", "-sb", "--", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def project(root: Path, layout: str, size: int) -> None:
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True)
    shutil.copy2(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # the project's cache link types
    (root / "params.yaml").write_text(yaml.safe_dump({
        "dataset": {"name": "t", "sources": ["x"], "labels": {"a": 0, "b": 1}, "channels": 3},
        "resize": {"size": size, "workers": 0}}))
    (root / "roots.json").write_text("[]\n")
    out = "images.npy" if layout == "npy" else "images"
    cmd = (f"{sys.executable} -m medflow.cli resize --params params.yaml --clean clean.csv --out {out} "
           "--stats resize.json --cache cache --roots-json roots.json")
    outs: list = [{out: {"persist": True}} if layout == "store-persist" else out,
                  {"cache": {"persist": True, "cache": False}}, {"resize.json": {"cache": False}}]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"resize": {
        "cmd": cmd, "deps": ["clean.csv"], "params": [{"params.yaml": ["resize"]}], "outs": outs}}}))


def repro(root: Path, src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "MEDFLOW_PROJECT": str(src),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"dvc repro failed in {root}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def measure(work: Path, layout: str, src: Path, old: list[Path], new: list[Path], size: int) -> dict:
    root = work / layout
    project(root, layout, size)
    write_clean_csv(old, root / "clean.csv")
    full = repro(root, src)
    full_step = json.loads((root / "resize.json").read_text())["seconds"]
    before = du(root / ".dvc" / "cache")
    write_clean_csv(old + new, root / "clean.csv")
    inc = repro(root, src)
    summary = json.loads((root / "resize.json").read_text())
    assert summary["decoded"] == len(new), summary
    return {"layout": layout, "full_repro_s": round(full, 2), "full_step_s": full_step,
            "inc_repro_s": round(inc, 2), "inc_step_s": summary["seconds"],
            "cache_added_bytes": du(root / ".dvc" / "cache") - before,
            "new_images_bytes": len(new) * size * size * 3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--old-src", type=Path, help="a checkout of medflow with the images.npy layout")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_store.", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        old = make_images(work / "img", args.n)
        new = make_images(work / "img", -(-args.n // 100), start=args.n)
        layouts = [("store", ROOT), ("store-persist", ROOT)] + ([("npy", args.old_src)] if args.old_src else [])
        rows = [measure(work, name, src, old, new, args.size) for name, src in layouts]
    lines = [f"{args.n} images + {len(new)} new at {args.size} px x 3 channels, {os.cpu_count()} cores",
             "| layout | full repro s (step s) | +1% repro s (step s) | .dvc/cache added MB | new images MB |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['full_repro_s']} ({r['full_step_s']}) | {r['inc_repro_s']} ({r['inc_step_s']}) "
              f"| {r['cache_added_bytes'] / 2**20:.2f} | {r['new_images_bytes'] / 2**20:.2f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Benchmark: near-duplicate linking (issue 20): the pixel check on the labelled set, and the near-pair search.

    python benchmarks/bench_near_pairs.py [--per-task N] [--sizes 10000,110000,1000000] [--out FILE]

1. Labelled set (tests/phash_helpers.py): ``--per-task`` originals of each of the four task folders in
   ../shared/data (default: every image), each with a JPEG q50 re-encode, a 0.8x resize, a centred 5% crop, an
   off-centre 5% crop (off the left side) and a centred 10% crop. Precision (over the variant-original pairs and
   all pairs of originals) and recall per variant kind, per task, at each dataset's configured values: by
   full-frame pHash distance alone, with the thumbnail correlation check (the rule before crop frames), and the
   filter's rule (frame hashes, ``phash.frame_pairs``).
2. Near-pair search at distance 2 on pHash-like hashes (31 set bits, like every pHash): multi-index hashing
   (``phash.near_pairs``) against the all-pairs baseline (``phash.near_pairs_all``) side by side, same input;
   and the frame search (``phash.frame_pairs``, the filter's: FRAMES hashes per image) on the same images;
   the baseline only up to ``--baseline-max`` hashes and extrapolated beyond with the exponent measured between
   its last two sizes (said in the table).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import phash_helpers as H  # noqa: E402

from medflow.config import load_config  # noqa: E402
from medflow.imaging import phash  # noqa: E402

DATASET_OF = {"chest_xray": "pneumonia", "malaria_cells": "malaria", "skin_lesions": "melanoma",
              "covid_ct": "covid_ct"}


def labelled_rows(per_task: int | None) -> list[str]:
    rows = ["| task | originals | rule | precision | " + " | ".join(f"recall {k}" for k in H.VARIANTS) + " |",
            "|---" * (4 + len(H.VARIANTS)) + "|"]
    for task in H.TASKS:
        if not (H.SHARED / task).is_dir():
            continue
        fcfg = load_config(ROOT / "params.yaml", DATASET_OF[task]).filter
        s = H.labelled_task(task, per_task)
        d, c = fcfg.near_duplicate_distance, fcfg.near_duplicate_min_correlation
        rules = ((f"full frame, d<={d}", None, 1), (f"full frame, d<={d}, r>={c}", c, 1),
                 (f"{phash.FRAMES} frames, d<={d}, r>={c} (filter)", c, phash.FRAMES))
        for rule, corr, frames in rules:
            roots = H.groups(s, d, corr, frames)
            tp, fp, fn = H.counts(s, roots)
            precision, _ = H.precision_recall(tp, fp, fn)
            recalls = [H.precision_recall(*H.counts(s, roots, (k,)))[1] for k in H.VARIANTS]
            rows.append(f"| {task} | {s.n_originals} | {rule} | {precision:.4f} ({fp} false) | "
                        + " | ".join(f"{r:.3f}" for r in recalls) + " |")
    return rows


def phash_like(n: int, seed: int = 0) -> np.ndarray:
    """n random 64-bit hashes with 31 set bits outside the top (DC) bit, as every pHash has."""
    rng = np.random.default_rng(seed)
    keys = rng.random((n, 63)).argsort(axis=1)[:, :31]
    bits = (np.uint64(1) << keys.astype(np.uint64))
    return np.bitwise_or.reduce(bits, axis=1)


def best_of(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def with_frames(h: np.ndarray, seed: int = 1) -> np.ndarray:
    """(n, FRAMES) frame hashes for full-frame hashes ``h``: crop frame f differs from the full frame in 2f random
    bits (real ones differ in 2-10), so the 0.95 frame is always a near pair of its own full frame that the
    search finds and drops: the worst case for the search."""
    rng = np.random.default_rng(seed)
    cols = [h]
    for f in range(1, phash.FRAMES):
        flips = rng.random((len(h), 63)).argsort(axis=1)[:, :2 * f].astype(np.uint64)
        cols.append(h ^ np.bitwise_or.reduce(np.uint64(1) << flips, axis=1))
    return np.stack(cols, axis=1)


def search_rows(sizes: list[int], baseline_max: int) -> list[str]:
    rows = [f"| hashes | all-pairs (s) | multi-index (s) | ratio | pairs | frame search, {phash.FRAMES} frames (s) "
            "| image pairs |", "|---|---|---|---|---|---|---|"]
    measured: list[tuple[int, float]] = []
    for n in sizes:
        h = phash_like(n)
        h = np.concatenate([h, h[: n // 100] ^ np.uint64(0b11)])  # 1% planted near pairs
        ours = best_of(lambda h=h: phash.near_pairs(h, 2), 3 if n <= 200_000 else 1)
        pairs = len(phash.near_pairs(h, 2))
        framed = with_frames(h)
        frame_s = best_of(lambda f=framed: phash.frame_pairs(f, 2), 3 if n <= 200_000 else 1)
        frame_pairs = len(phash.frame_pairs(framed, 2))
        if len(h) <= baseline_max:
            base = best_of(lambda h=h: phash.near_pairs_all(h, 2), 1)
            measured.append((len(h), base))
            note = f"{base:.3f}"
        elif len(measured) >= 2:
            (n0, t0), (n1, t1) = measured[-2:]
            k = math.log(t1 / t0) / math.log(n1 / n0)
            base = t1 * (len(h) / n1) ** k
            note = f"~{base:.1f} (extrapolated, n^{k:.2f})"
        else:
            base, note = float("nan"), "-"
        rows.append(f"| {len(h):,} | {note} | {ours:.3f} | {base / ours:.0f}x | {pairs} | {frame_s:.3f} "
                    f"| {frame_pairs} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-task", type=int, default=None, help="originals per task (default: all)")
    ap.add_argument("--sizes", default="10000,27558,110000,1000000")
    ap.add_argument("--baseline-max", type=int, default=30_000)
    ap.add_argument("--skip-labelled", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = ["## Near-pair search, distance <= 2", "", *search_rows(
        [int(x) for x in args.sizes.split(",")], args.baseline_max), ""]
    print("\n".join(lines), flush=True)
    if not args.skip_labelled:
        more = ["## Labelled near-duplicate set", "", *labelled_rows(args.per_task), ""]
        print("\n".join(more), flush=True)
        lines += more
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

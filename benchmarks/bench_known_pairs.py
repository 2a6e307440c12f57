"""Near-duplicate links of a +1% increment: every candidate pair confirmed again (before) against the kept links
plus the candidates with a new content (medflow.imaging.known_pairs, the filter's now), side by side.

    uv run python benchmarks/bench_known_pairs.py [--sizes 6000 27558] [--sets DIR] [--repeat 3]

The images are the N ladder's malaria-like cells (benchmarks/bench_increment.py: ``--sets`` as it writes them,
else generated into a temporary folder) and a +1% increment made as that benchmark makes it; each gets the
filter's own verdict (medflow.imaging.verdict: frame hashes and thumbnails) in a process pool, kept in a verdict
store read from its file as the filter's index is (the candidates' thumbnails gathered from it), at malaria's
grouping params. The links of the N images are searched and kept; then those of the N + 1% images are found
both ways (best of ``--repeat``, the kept file loaded each time) and must be equal. Printed: candidates, links,
seconds both ways and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from bench_increment import SHARED, generate
from dvc_project import ROOT

from medflow.config import load_config
from medflow.imaging import phash, verdict
from medflow.imaging.known_pairs import KnownPairs, linked
from medflow.imaging.verdict_store import VerdictStore, save_stores

_LIMITS = verdict.Limits(89_478_485, 1)


def _verdict(path: str) -> tuple[str, verdict.Verdict]:
    data = Path(path).read_bytes()
    return hashlib.sha256(data).hexdigest(), verdict.verdict(data, _LIMITS)


def _store(folders: list[Path], path: Path) -> tuple[np.ndarray, VerdictStore]:
    """sha256s of every PNG under ``folders`` (in order) and a verdict store of them read from its file at
    ``path``, as the filter reads its index (thumbnails gathered from the file for the candidate pairs)."""
    paths = [str(p) for folder in folders for p in sorted(folder.rglob("*.png"))]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = list(pool.map(_verdict, paths, chunksize=256))
    store = save_stores(path, {"bench": True}, [VerdictStore.build(found)], fsync=False, reopen=True)
    assert store is not None
    return np.array([sha for sha, _ in found]), store


def _best(fn, repeat: int) -> tuple[float, np.ndarray]:  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(n: int, sets: Path | None, work: Path, repeat: int) -> str:
    made = sets / f"n{n}" / "cells" if sets else None
    base = made if made is not None and made.is_dir() else work / f"n{n}"
    if base != made:
        generate(base, n, 1000, 7, SHARED / "malaria_cells")
    increment = work / f"inc{n}"
    generate(increment, max(1, round(n / 100)), 900_000, 8, SHARED / "malaria_cells")
    shas, store = _store([base, increment], work / f"verdicts{n}.npz")
    n_old = len(shas) - max(1, round(n / 100))
    fcfg = load_config(ROOT / "params.yaml", "malaria").filter
    d, c = fcfg.near_duplicate_distance, fcfg.near_duplicate_min_correlation
    cache = work / f"cache{n}"
    known = KnownPairs.load(cache, {"bench": n})
    linked(shas[:n_old], *store.frames(shas[:n_old]), d, c, known)
    known.save()
    before, scratch = _best(lambda: linked(shas, *store.frames(shas), d, c), repeat)
    ours, kept = _best(lambda: linked(shas, *store.frames(shas), d, c, KnownPairs.load(cache, {"bench": n})), repeat)
    if not np.array_equal(scratch, kept):
        sys.exit(f"N = {n}: the kept links differ from a search from scratch")
    candidates = len(phash.near_pairs(store.frames(shas)[0].reshape(-1), d))
    return (f"| {n_old:,} + {len(shas) - n_old:,} | {candidates:,} | {len(kept):,} | {before:.3f} | {ours:.3f} "
            f"| {before / ours:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000, 27558])
    parser.add_argument("--sets", type=Path, default=None, help="the N ladder's sets (<sets>/n<N>/cells)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not (SHARED / "malaria_cells").is_dir():
        sys.exit(f"{SHARED / 'malaria_cells'} not found")
    rows = ["| images (N + increment) | candidate frame pairs | links | every candidate confirmed (s) "
            "| kept links + new candidates (s) | ratio |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rows.append(measure(n, args.sets, Path(tmp), args.repeat))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"malaria's grouping params; best of {args.repeat}\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()

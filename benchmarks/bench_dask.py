"""Benchmark: the filter and resize steps on their local process pool against a Dask LocalCluster, in one run.

    python benchmarks/bench_dask.py [--data DIR] [--workers 2] [--size 224] [--out FILE]

(with the dask extra: ``uv sync --extra dask``). On ``../shared/data/chest_xray`` (1566 X-rays, 512 px) by
default, page cache warmed first, it runs each step once per side with an empty cache, ``--workers``
decoders on both: the local pool (``filter.workers`` / ``resize.workers``: this process and ``workers - 1``
forked processes) and a ``LocalCluster`` of ``--workers`` single-threaded worker processes
(``compute.dask_address``). The cluster is started before and kept (a cluster is long-lived): its start-up
is shown apart, and its workers have imported medflow before the first timing. The outputs of both sides
are compared byte for byte. Also measured: what sending the pixels back to the client would cost instead
of the workers writing them (the design not taken, README "Dask"): fetching one resized image's bytes per
image from the workers, against fetching nothing. Prints a Markdown table with the ratio Dask / local; the
header gives the load average, since other jobs on a small shared machine move every number.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvc_project import output_bytes  # noqa: E402

from medflow.config import Config, parse_config  # noqa: E402
from medflow.io import sha256_file, write_csv  # noqa: E402
from medflow.schema import MANIFEST_COLUMNS  # noqa: E402
from tasks import filter as filter_step  # noqa: E402
from tasks import resize  # noqa: E402

OUTPUTS = ("clean", "rejects.csv", "images", "resize_rejects.csv")


def manifest(data: Path, dest: Path) -> Path:
    """manifest.csv of every image under ``data/<class>/`` (as the manifest step writes it); page cache warmed."""
    rows = []
    for label, folder in enumerate(sorted(p for p in data.iterdir() if p.is_dir())[:2]):
        for f in sorted(folder.iterdir()):
            with Image.open(f) as im:
                w, h, mode, fmt = im.width, im.height, im.mode, im.format
            rows.append({"path": str(f), "relpath": f.name, "root": str(data), "class_name": folder.name,
                         "label": label, "group": f.stem, "source_split": None, "sha256": sha256_file(f),
                         "bytes": f.stat().st_size, "width": w, "height": h, "mode": mode, "format": fmt})
    path = dest / "manifest.csv"
    write_csv(path, pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    return path


def config(names: list[str], workers: int, size: int, address: str | None) -> Config:
    return parse_config({"dataset": {"name": "bench", "sources": ["x"], "labels": {names[0]: 0, names[1]: 1},
                                     "channels": 1},
                         "filter": {"workers": workers}, "resize": {"size": size, "workers": workers},
                         "compute": {"dask_address": address}})


def run_steps(out: Path, cfg: Config, source: Path) -> dict[str, float]:
    """Filter then resize into ``out`` (empty caches); seconds of each."""
    start = time.perf_counter()
    filter_step.run(cfg, manifest=source, clean=out / "clean", rejects=out / "rejects.csv",
                    summary=out / "filter.json", cache=out / "cache/filter")
    middle = time.perf_counter()
    resize.run(cfg, clean=out / "clean", out=out / "images", stats=out / "resize.json",
               cache=out / "cache/resize", rejects=out / "resize_rejects.csv")
    return {"filter": middle - start, "resize": time.perf_counter() - middle}


def _pixels(_: int, nbytes: int) -> bytes:
    return bytes(nbytes)


def _nothing(_: int, nbytes: int) -> None:
    return None


def _import_decoders() -> None:
    import medflow.imaging.parallel  # noqa: F401
    import medflow.imaging.verdict  # noqa: F401


def transfer_cost(client: Any, n: int, nbytes: int) -> float:
    """Seconds to fetch ``n`` results of ``nbytes`` each from the workers, beyond fetching ``n`` empty ones."""
    from functools import partial

    def fetch(fn: Any) -> float:
        start = time.perf_counter()
        chunks = [list(range(i, min(n, i + 32))) for i in range(0, n, 32)]  # chunks of 32, as the steps send
        futures = client.map(lambda c, f=fn: [f(i) for i in c], chunks, pure=False)
        client.gather(futures)
        return time.perf_counter() - start

    fetch(partial(_nothing, nbytes=nbytes))  # warm
    return fetch(partial(_pixels, nbytes=nbytes)) - fetch(partial(_nothing, nbytes=nbytes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/chest_xray")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    try:
        source = manifest(args.data, work)
        names = sorted(pd.read_csv(source)["class_name"].unique())
        n = len(pd.read_csv(source))
        start = time.perf_counter()
        with LocalCluster(n_workers=args.workers, processes=True, threads_per_worker=1, dashboard_address=None,
                          silence_logs=40) as cluster, Client(cluster) as client:
            cluster_start = time.perf_counter() - start
            client.run(_import_decoders)
            local = run_steps(work / "local", config(names, args.workers, args.size, None), source)
            dask = run_steps(work / "dask", config(names, args.workers, args.size, cluster.scheduler_address),
                             source)
            transfer = transfer_cost(client, n, args.size * args.size)
        same = all(output_bytes(work / "local" / f) == output_bytes(work / "dask" / f) for f in OUTPUTS)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"# Filter and resize: local process pool vs Dask LocalCluster ({args.workers} decoders each)", "",
             f"{n} images of {args.data.name}, {args.size} px, 1 channel; {platform.node()}, {os.cpu_count()} cores, "
             f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; one run each. "
             f"Outputs identical byte for byte: {'yes' if same else 'NO'}.", "",
             "| step | local pool (s) | Dask LocalCluster (s) | Dask / local |", "| --- | --- | --- | --- |"]
    for step in ("filter", "resize"):
        lines.append(f"| {step} | {local[step]:.2f} | {dask[step]:.2f} | {dask[step] / local[step]:.2f} |")
    total_local, total_dask = sum(local.values()), sum(dask.values())
    lines += [f"| both | {total_local:.2f} | {total_dask:.2f} | {total_dask / total_local:.2f} |", "",
              f"LocalCluster start-up (not in the step times): {cluster_start:.2f} s. Sending each resized image "
              f"back to the client instead ({args.size * args.size} bytes per image): +{transfer:.3f} s for the "
              f"{n} images ({1000 * transfer / n:.2f} ms per image) on loopback."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not same:
        sys.exit(1)


if __name__ == "__main__":  # the LocalCluster's worker processes re-import this module
    main()

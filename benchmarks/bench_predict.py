"""Benchmark: `medflow predict` end to end from full-resolution JPEGs, against the tutorial way, in one run.

    python benchmarks/bench_predict.py [--data DIR] [--model DIR] [--repeat 3] [--batch-size 64]

On ``../shared/data/chest_xray_fullres`` (120 full-resolution X-rays) it scores every image with

- the tutorial way: a loop of ``cv2.imread(path)`` (full decode, colour) -> grey -> ``cv2.resize`` (cubic),
  then ``model.predict`` on the stacked batch: decoding and the model one after the other;
- medflow: ``medflow.inference.run`` (what ``medflow predict FOLDER --out preds.csv`` runs): reduced-DCT JPEG
  decoding in a thread pool, one batch ahead of the model, CSV written atomically.

Both use the same model: ``--model`` (a trained model folder, e.g. models/pneumonia), or by default an
untrained medflow_cnn for 224x224x1 (speed does not depend on the weights). It prints images/s for each, the
ratio, and medflow's split of its time into decoding and the model (decode time is summed per batch and
overlaps the model, so the shares can add up to more than the wall time). Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from medflow import inference as predict  # noqa: E402
from medflow.config import TrainConfig  # noqa: E402
from medflow.data.manifest import iter_images  # noqa: E402
from medflow.evaluation.assess import load_trained  # noqa: E402
from medflow.io import write_json  # noqa: E402
from medflow.training.models import build_model  # noqa: E402

SHARED = Path(os.environ.get("MEDFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))


def untrained_model(folder: Path, size: int = 224) -> Path:
    """A model folder as the train step lays it out, with an untrained medflow_cnn (for timing only)."""
    model = build_model(TrainConfig(), input_shape=(size, size, 1), allow_flips=False, pos=1, neg=1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    write_json(folder / "metadata.json", {
        "input_shape": [size, size, 1], "class_names": {"0": "NORMAL", "1": "PNEUMONIA"},
        "preprocessing": {"size": size, "channels": 1}, "params": {"train": {"model": "medflow_cnn"}}})
    write_json(folder / "threshold.json", {"threshold": 0.5, "rule": "fixed"})
    return folder


def tutorial(paths: list[Path], model: object, size: int, batch_size: int) -> float:
    start = time.perf_counter()
    imgs = []
    for p in paths:
        img = cv2.imread(str(p))
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        imgs.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)[..., None])
    x = np.stack(imgs).astype(np.float32)
    model.predict(x, batch_size=batch_size, verbose=0)  # type: ignore[attr-defined]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "chest_xray_fullres")
    parser.add_argument("--model", type=Path, help="trained model folder (default: an untrained medflow_cnn)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: not found (see ../shared/data/README)")
    paths = list(iter_images(args.data))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or untrained_model(Path(tmp) / "model")
        trained = load_trained(folder)
        for p in paths:  # warm the page cache
            p.read_bytes()
        predict.run([str(paths[0])], model=folder, out=Path(tmp) / "warm.csv", progress=False)  # compile
        tutorial(paths[:2], trained.model, trained.size, args.batch_size)
        base, ours, shares = [], [], []
        for _ in range(args.repeat):
            base.append(tutorial(paths, trained.model, trained.size, args.batch_size))
            s = predict.run([str(args.data)], model=folder, out=Path(tmp) / "preds.csv",
                            batch_size=args.batch_size, progress=False)
            ours.append(s["seconds"])
            shares.append((s["decode_seconds"], s["model_seconds"]))
    n = len(paths)
    b, o = min(base), min(ours)
    decode_s, model_s = shares[ours.index(o)]
    print(f"# medflow predict, {n} images from {args.data} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}), best of {args.repeat}")
    print("| way | seconds | images/s |\n|---|---|---|")
    print(f"| tutorial: imread + cubic resize, then predict | {b:.2f} | {n / b:.1f} |")
    print(f"| medflow predict (threads, reduced decode, overlapped) | {o:.2f} | {n / o:.1f} |")
    print(f"\nratio medflow / tutorial: {b / o:.2f}x")
    print(f"medflow time: decoding {decode_s:.2f} s ({decode_s / o:.0%} of wall), model {model_s:.2f} s "
          f"({model_s / o:.0%} of wall)")


if __name__ == "__main__":
    main()

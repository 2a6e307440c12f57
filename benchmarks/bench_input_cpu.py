"""Input pipeline on CPU: medflow's batches from the image store vs model.fit on the same arrays in memory.

The CPU twin of ``bench_train_gpu.py`` (same code, same method), with the TensorFlow backend and sizes that
fit a small machine: tutorial_cnn (``medflow.training.models.build_model``) on 1,024 synthetic grey 128x128 images,
batch 32, float32, 4 epochs per arm (the first, which traces the graph, excluded). Both arms run in one
process, from the same initial weights:

1. baseline: ``model.fit(x, y, shuffle=True)`` on uint8 images already in memory (Keras's own tf.data
   slicing of in-memory arrays);
2. medflow: ``load_split_data`` (the image store, shards memory-mapped) + ``batches`` (tf.data gathering shuffled,
   sorted index batches from the memory map) + ``model.fit``.

Prints images/s for each, and the ratio medflow / baseline (goal >= 0.90)::

    uv run python benchmarks/bench_input_cpu.py [--images 1024] [--size 128] [--channels 1] [--batch 32] \\
        [--epochs 4] [--rounds 1] [--out results.json]

Takes about 2.5 minutes on 2 cores with the defaults (``--rounds 2`` repeats both arms in the other
order: twice as long, less sensitive to which arm runs first).
"""

from __future__ import annotations

import os
import sys
from typing import Any

if os.environ.setdefault("KERAS_BACKEND", "tensorflow") != "tensorflow":
    sys.exit(f"{__file__}: runs with KERAS_BACKEND=tensorflow (got {os.environ['KERAS_BACKEND']}); "
             "for JAX on a GPU use benchmarks/bench_train_gpu.py")

import bench_train_gpu  # noqa: E402  (beside this file; shares the whole method)

CPU_DEFAULTS: dict[str, Any] = {"images": 1024, "size": 128, "channels": 1, "batch": 32, "epochs": 4,
                                "precision": "float32", "jit_compile": False}

if __name__ == "__main__":
    bench_train_gpu.main(None, **CPU_DEFAULTS)

"""Training throughput: medflow's input pipeline vs model.fit on the same images in memory, side by side.

Writes synthetic uint8 images (random noise; the content does not matter for speed) into a temporary
an image store + split.csv in the pipeline's formats, builds tutorial_cnn (``medflow.training.models.build_model``) and
trains it twice for the same epochs, batch size and precision, each time from the same initial weights:

1. baseline: ``model.fit(x, y, shuffle=True)`` on the training images held in memory as a NumPy uint8
   array (float32 labels): Keras's own array pipeline, no disk, no memory map;
2. medflow: ``load_split_data`` (the .npy memory-mapped) + ``batches(shuffle=True)`` + ``model.fit``,
   end to end.

It prints images/s for each over the steady-state epochs (the first, which compiles, is excluded), their
ratio (goal: medflow / baseline >= 0.90) and each first epoch's time (compilation included). The one
command, from the repository root, on a machine with a GPU and JAX::

    KERAS_BACKEND=jax python benchmarks/bench_train_gpu.py [--images 20000] [--epochs 6] [--batch 200] \\
        [--precision mixed_bfloat16|float32] [--out results.json]

Needs keras, numpy, pandas (any version) and JAX only: no TensorFlow, DVC or Prefect. medflow.training.models needs
medflow.config, hence pydantic and PyYAML; where pydantic is missing the script says so and trains its own
copy of the tutorial network instead (``model_source`` in the output says which ran).
``benchmarks/bench_input_cpu.py`` runs the same comparison on CPU with TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medflow.imaging.store import save_array  # noqa: E402
from medflow.schema import SPLIT_COLUMNS  # noqa: E402
from medflow.training.inputs import batches, load_split_data  # noqa: E402

SEED = 42
POSITIVE_SHARE = 0.74  # Kermany's training split is about 2.9 positives per negative


# ----------------------------------------------------------------------------------------------- data
def write_dataset(folder: Path, n_train: int, size: int, channels: int, n_holdout: int,
                  seed: int = SEED) -> tuple[np.ndarray, np.ndarray, Path, Path]:
    """Random uint8 images + labels; rows ``[0, n_train)`` are train, then ``n_holdout`` each for val and test.

    Returns the training images and labels in memory (the baseline's input) and the paths of the
    image store and split.csv written for medflow (the same bytes).
    """
    rng = np.random.default_rng(seed)
    n = n_train + 2 * n_holdout
    x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    y = (rng.random(n) < POSITIVE_SHARE).astype(np.int64)
    images = save_array(folder / "images", x, shard_rows=max(1, n // 8))  # a few shards, like resize
    df = pd.DataFrame({c: [""] * n for c in SPLIT_COLUMNS})
    df["path"] = [f"data/raw/synthetic/img{i}.png" for i in range(n)]
    df["relpath"] = [f"img{i}.png" for i in range(n)]
    df["class_name"] = np.where(y == 1, "POSITIVE", "NEGATIVE")
    df["label"] = y
    df["group"] = [f"p{i}" for i in range(n)]
    df["row"] = np.arange(n)
    df["split"] = ["train"] * n_train + ["val"] * n_holdout + ["test"] * n_holdout
    split = folder / "split.csv"
    df.to_csv(split, index=False)
    return x[:n_train], y[:n_train].astype(np.float32), images, split


# ----------------------------------------------------------------------------------------------- model
def build(input_shape: tuple[int, int, int], *, pos: int, neg: int, augment: bool, jit_compile: bool,
          precision: str, learning_rate: float = 1e-3) -> tuple[keras.Model, str]:
    """tutorial_cnn from medflow.training.models (seeded: same initial weights each call), compiled; its source."""
    keras.backend.clear_session()  # the previous arm's model and compiled functions go...
    keras.mixed_precision.set_dtype_policy(precision)  # ...and so does the global dtype policy: set it again
    try:
        from medflow.config import AugmentConfig, TrainConfig
        from medflow.training.models import build_model
    except ModuleNotFoundError as e:
        print(f"!! medflow.training.models cannot be imported here ({e}): training the benchmark's own copy of the "
              "tutorial network instead. Carry the missing package to benchmark the project's build_model.")
        model, source = _stand_in_tutorial_cnn(input_shape, pos=pos, neg=neg), f"stand-in copy ({e})"
    else:
        aug = AugmentConfig() if augment else AugmentConfig(rotation_deg=0, zoom=0, translate=0, brightness=0,
                                                            contrast=0)
        train = TrainConfig(model="tutorial_cnn", seed=SEED, augment=aug)
        model = build_model(train, input_shape=input_shape, allow_flips=False, pos=pos, neg=neg)
        source = f"models.build_model(TrainConfig(model='tutorial_cnn'{'' if augment else ', no augment'}))"
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy",
                  metrics=["accuracy"], jit_compile=jit_compile)
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    return model, f"{source}, convolutions compute in {conv.compute_dtype}"


def _stand_in_tutorial_cnn(input_shape: tuple[int, int, int], *, pos: int, neg: int) -> keras.Model:
    """The Keras TPU pneumonia tutorial's network, as medflow.training.models builds it (no augmentation)."""
    from keras import layers

    keras.utils.set_random_seed(SEED)
    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = layers.Rescaling(1.0 / 255, dtype="float32")(inputs)
    x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = layers.MaxPool2D()(x)
    for filters in (32, 64, 128, 256):
        x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same")(x)
        x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPool2D()(x)
        if filters >= 128:
            x = layers.Dropout(0.2)(x)
    x = layers.Flatten()(x)
    for units, rate in ((512, 0.7), (128, 0.5), (64, 0.3)):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Dropout(rate)(x)
    bias = keras.initializers.Constant(float(np.log(pos / neg)))
    logit = layers.Dense(1, bias_initializer=bias, dtype="float32")(x)
    return keras.Model(inputs, layers.Activation("sigmoid", dtype="float32")(logit))


# ----------------------------------------------------------------------------------------------- timing
class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, measured once the device has finished it (JAX dispatches asynchronously)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs and "loss" in logs:
            float(logs["loss"])  # blocks until the epoch's last step has run
        self.seconds.append(time.perf_counter() - self._start)


def _summary(seconds: list[float], n_train: int) -> dict[str, Any]:
    steady = seconds[1:]
    return {"images_per_s": n_train * len(steady) / sum(steady), "best_epoch_images_per_s": n_train / min(steady),
            "first_epoch_s": seconds[0], "epoch_s": [round(s, 3) for s in seconds]}


def fit_baseline(x: np.ndarray, y: np.ndarray, args: argparse.Namespace, model_kw: dict[str, Any]) -> dict[str, Any]:
    model, source = build(x.shape[1:], **model_kw)
    timer = EpochTimer()
    model.fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=True, verbose=0, callbacks=[timer])
    return {**_summary(timer.seconds, len(x)), "model_source": source}


def fit_medflow(images: Path, split: Path, args: argparse.Namespace, model_kw: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = load_split_data(images, split)
    load_s = time.perf_counter() - t0
    model, source = build(data.input_shape, **model_kw)  # first, as the trainer does: it seeds Keras
    ds = batches(data, "train", batch_size=args.batch, shuffle=True, seed=SEED)
    timer = EpochTimer()
    # shuffle=False: the batches are already shuffled, seeded (fit's own shuffle would reorder a PyDataset)
    model.fit(ds, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[timer])
    return {**_summary(timer.seconds, len(data.rows["train"])), "load_split_data_s": round(load_s, 3),
            "model_source": source}


# ----------------------------------------------------------------------------------------------- run
def environment(args: argparse.Namespace) -> dict[str, Any]:
    backend = keras.backend.backend()
    env: dict[str, Any] = {"backend": backend, "keras": keras.__version__, "numpy": np.__version__,
                           "pandas": pd.__version__, "python": platform.python_version(),
                           "cpu_cores": len(os.sched_getaffinity(0)), "processor": platform.processor()}
    if backend == "jax":
        import jax

        env.update(jax=jax.__version__, device=str(jax.devices()[0].device_kind))
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        env.update(tensorflow=tf.__version__, device=str(gpus[0]) if gpus else "CPU")
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both arms, ``args.rounds`` times (alternating which goes first); the best rate of each arm counts."""
    result: dict[str, Any] = {**environment(args), "images": args.images, "batch": args.batch,
                              "epochs": args.epochs, "size": args.size, "channels": args.channels,
                              "precision": args.precision, "jit_compile": args.jit_compile,
                              "augment": args.augment}
    print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="medflow-bench-") as tmp:
        t0 = time.perf_counter()
        x, y, images, split = write_dataset(Path(tmp), args.images, args.size, args.channels, args.batch)
        print(f"synthetic data: {len(x)} training images {x.shape[1:]} written in {time.perf_counter() - t0:.1f} s",
              flush=True)
        pos = int(y.sum())
        model_kw = {"pos": pos, "neg": len(y) - pos, "augment": args.augment, "jit_compile": args.jit_compile,
                    "precision": args.precision}
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "medflow": []}
        for r in range(args.rounds):
            order = ("baseline", "medflow") if r % 2 == 0 else ("medflow", "baseline")
            for arm in order:
                out = fit_baseline(x, y, args, model_kw) if arm == "baseline" else fit_medflow(
                    images, split, args, model_kw)
                runs[arm].append(out)
                print(f"round {r + 1} {arm:8s}: {out['images_per_s']:9.1f} images/s, first epoch "
                      f"{out['first_epoch_s']:.1f} s, epochs {out['epoch_s']}", flush=True)
    for arm, outs in runs.items():
        result[arm] = max(outs, key=lambda o: o["images_per_s"]) | {"rounds": outs}
    result["ratio"] = result["medflow"]["images_per_s"] / result["baseline"]["images_per_s"]
    result["model_source"] = result["medflow"]["model_source"]
    return result


def report(result: dict[str, Any]) -> None:
    print(f"\nmodel: {result['model_source']}; {result['images']} images "
          f"{result['size']}x{result['size']}x{result['channels']}, batch {result['batch']}, "
          f"{result['epochs']} epochs (first excluded), {result['precision']}, jit_compile={result['jit_compile']}, "
          f"backend {result['backend']} on {result.get('device', '?')}")
    print("| arm | images/s (steady epochs) | best epoch | first epoch (compile) |\n|---|---|---|---|")
    for arm, label in (("baseline", "model.fit on in-memory uint8 NumPy"),
                       ("medflow", "load_split_data + batches + model.fit")):
        r = result[arm]
        print(f"| {label} | {r['images_per_s']:.1f} | {r['best_epoch_images_per_s']:.1f} | "
              f"{r['first_epoch_s']:.1f} s |")
    best = result["medflow"]["best_epoch_images_per_s"] / result["baseline"]["best_epoch_images_per_s"]
    print(f"| ratio medflow / baseline | **{result['ratio']:.2f}** | {best:.2f} | goal >= 0.90 |")


def parse_args(argv: list[str] | None = None, **defaults: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per arm, the first one excluded from rates")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3)
    parser.add_argument("--precision", choices=("mixed_bfloat16", "float32", "mixed_float16"),
                        default="mixed_bfloat16")
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--augment", action="store_true", help="add medflow's default train-time augmentation")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both arms, alternating which runs first")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch compiles and is not timed)")
    return args


def main(argv: list[str] | None = None, **defaults: Any) -> dict[str, Any]:
    args = parse_args(argv, **defaults)
    result = run(args)
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "jax":
        print(f"note: KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '(unset: tensorflow)')}; "
              "the documented GPU command uses KERAS_BACKEND=jax", file=sys.stderr)
    main()

"""Train a few steps under a given train.strategy and dump the final weights (run by tests/test_distributed.py).

    python tests/scripts/train_distributed.py STRATEGY WORKDIR OUT.npz

For ``mirrored`` it first splits the CPU into two logical devices; ``multi_worker`` reads TF_CONFIG;
``data_parallel`` expects KERAS_BACKEND=jax and XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    strategy, work, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if strategy == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np

    from medflow.config import parse_config
    from tasks import train

    cfg = parse_config({"dataset": {"name": "t", "labels": {"NEG": 0, "POS": 1}}, "resize": {"size": 32},
                        "train": {"model": "medflow_cnn", "epochs": int(os.environ.get("EPOCHS", "2")),
                                  "batch_size": 4, "strategy": strategy,
                                  "early_stopping_patience": 0, "reduce_lr_patience": 0}})
    result = train.run(cfg, images=work / "images", split=work / "split.csv",
                       model_dir=out.parent / f"model-{out.stem}", live_dir=out.parent / f"live-{out.stem}")
    model, summary = result.model, result.summary()
    if strategy == "data_parallel":  # the saved model, loaded as evaluate and predict load it, runs compiled
        from medflow.evaluation.assess import load_trained

        summary["loaded_jit_compile"] = load_trained(out.parent / f"model-{out.stem}").model.jit_compile
    # Trainable weights: they are all-reduced and must agree. BatchNorm moving statistics are each worker's own
    # (computed on its shard; the chief's are saved with the model).
    np.savez(out, *[np.asarray(v.numpy()) for v in model.trainable_weights])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

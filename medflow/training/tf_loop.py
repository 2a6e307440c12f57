"""A custom tf.distribute training loop, for the placements where Keras 3 ``model.fit`` cannot run.

Keras 3 ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras issue 20585), so the
``multi_worker`` strategy trains here: Keras layers and optimizer, a ``strategy.run`` step with the loss
averaged over the *global* batch, class weights applied per example, metrics computed on all replicas'
predictions. As in ``fit`` (whose val batches carry the class weights as sample weights), ``val_loss`` is
the class-weighted cross-entropy, the training objective.
BatchNorm moving statistics stay each worker's own (from its shard of the data); the chief's
are saved with the model. It drives the same callbacks as ``fit`` (checkpointing, early stopping, DVCLive), so the rest
of the trainer does not care which loop ran.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from medflow.training.selection import cross_entropy

log = logging.getLogger(__name__)


def _metrics(prefix: str, loss: float, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    pred = p >= 0.5
    tp = float(np.sum(pred & (y == 1)))
    both = len(np.unique(y)) == 2
    out = {"loss": loss, "accuracy": float(np.mean(pred == (y == 1))),
           "precision": tp / max(1.0, float(np.sum(pred))), "recall": tp / max(1.0, float(np.sum(y == 1))),
           "auc": float(roc_auc_score(y, p)) if both else float("nan"),
           "pr_auc": float(average_precision_score(y, p)) if both else float("nan")}
    return {prefix + k: v for k, v in out.items()}


class DistributedLoop:
    """Train ``model`` (built and compiled inside ``strategy.scope()``) with a custom distributed step."""

    def __init__(self, model: keras.Model, strategy: Any, global_batch: int,
                 class_weight: dict[int, float] | None) -> None:
        import tensorflow as tf

        self.tf, self.model, self.strategy, self.global_batch = tf, model, strategy, global_batch
        self.class_weight_map = class_weight
        weights = [class_weight[0], class_weight[1]] if class_weight else [1.0, 1.0]
        with strategy.scope():
            self.class_weight = tf.constant(weights, tf.float32)
        self._train_step = self._make_train_step()
        self._predict_step = self._make_predict_step()

    def _make_train_step(self) -> Any:
        tf, model, strategy = self.tf, self.model, self.strategy

        def step_fn(x: Any, y: Any) -> tuple[Any, Any, Any]:
            y = tf.cast(tf.reshape(y, (-1, 1)), tf.float32)
            with tf.GradientTape() as tape:
                p = tf.cast(model(x, training=True), tf.float32)
                per_example = keras.losses.binary_crossentropy(y, p)
                weights = tf.gather(self.class_weight, tf.cast(tf.reshape(y, (-1,)), tf.int32))
                loss = tf.nn.compute_average_loss(per_example * weights, global_batch_size=self.global_batch)
                if model.losses:
                    loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss, tf.reshape(p, (-1,)), tf.reshape(y, (-1,))

        @tf.function
        def train_step(x: Any, y: Any) -> tuple[Any, Any, Any]:
            loss, p, yy = strategy.run(step_fn, args=(x, y))
            return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                    strategy.gather(p, axis=0), strategy.gather(yy, axis=0))

        return train_step

    def _make_predict_step(self) -> Any:
        tf, model, strategy = self.tf, self.model, self.strategy

        def step_fn(x: Any, y: Any) -> tuple[Any, Any]:
            p = tf.reshape(tf.cast(model(x, training=False), tf.float32), (-1,))
            return p, tf.reshape(tf.cast(y, tf.float32), (-1,))

        @tf.function
        def predict_step(x: Any, y: Any) -> tuple[Any, Any]:
            p, yy = strategy.run(step_fn, args=(x, y))
            return strategy.gather(p, axis=0), strategy.gather(yy, axis=0)

        return predict_step

    def _distribute(self, dataset: Any) -> Any:
        options = self.tf.data.Options()
        options.experimental_distribute.auto_shard_policy = self.tf.data.experimental.AutoShardPolicy.DATA
        return self.strategy.experimental_distribute_dataset(dataset.with_options(options))

    def _evaluate(self, dataset: Any) -> dict[str, float]:
        ps, ys = [], []
        for x, y in self._distribute(dataset):
            p, yy = self._predict_step(x, y)
            ps.append(p.numpy())
            ys.append(yy.numpy())
        p, y = np.concatenate(ps), np.concatenate(ys).astype(int)
        return _metrics("val_", cross_entropy(y, p, self.class_weight_map), y, p)

    def fit(self, train_ds: Any, val_ds: Any, *, epochs: int, initial_epoch: int,
            callbacks: list[keras.callbacks.Callback]) -> None:
        """Run epochs ``initial_epoch .. epochs-1``, calling the callbacks' epoch hooks like ``fit`` does."""
        for cb in callbacks:
            cb.set_model(self.model)
        self.model.stop_training = False
        for epoch in range(initial_epoch, epochs):
            losses, ps, ys = [], [], []
            for x, y in self._distribute(train_ds):
                loss, p, yy = self._train_step(x, y)
                losses.append(float(loss))
                ps.append(p.numpy())
                ys.append(yy.numpy())
            logs = _metrics("", float(np.mean(losses)), np.concatenate(ys).astype(int), np.concatenate(ps))
            logs.update(self._evaluate(val_ds))
            log.info("epoch %d/%d: %s", epoch + 1, epochs, " ".join(f"{k}={v:.4f}" for k, v in logs.items()))
            for cb in callbacks:
                cb.on_epoch_end(epoch, logs)
            if self.model.stop_training:
                break

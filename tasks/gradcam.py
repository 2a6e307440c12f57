"""Grad-CAM (Selvaraju et al. 2017) for medflow's binary classifiers: where the model looks.

The model is cut at its last convolutional feature map (own CNNs: the last 4-D layer of the model; pretrained
backbones: the last 4-D layer inside the "backbone" sub-model). Everything after the cut is a chain of
single-input layers (pooling, dropout, dense) up to the ``logit`` layer, so the gradient of the positive-class
logit with respect to the feature map is taken through that chain alone. Works on the TensorFlow, JAX and
PyTorch backends; augmentation layers are inactive (inference mode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import keras
import numpy as np

from tasks.errors import StepError
from tasks.models import BACKBONE_NAME

LOGIT_LAYER = "logit"


def _is_4d(layer: keras.layers.Layer) -> bool:
    try:
        return len(layer.output.shape) == 4
    except (AttributeError, ValueError):  # layers never called in a graph
        return False


def _last_4d(model: keras.Model) -> keras.layers.Layer:
    for layer in reversed(model.layers):
        if _is_4d(layer) and not isinstance(layer, keras.layers.InputLayer):
            return layer
    raise StepError(f"Grad-CAM: model {model.name!r} has no convolutional feature map")


def _cut(model: keras.Model) -> tuple[Callable[[Any], Any], list[keras.layers.Layer]]:
    """(image -> feature map, the layers from the feature map to the logit)."""
    names = [layer.name for layer in model.layers]
    if LOGIT_LAYER not in names:
        raise StepError(f"Grad-CAM: model {model.name!r} has no {LOGIT_LAYER!r} layer (not a medflow model)")
    logit_at = names.index(LOGIT_LAYER)
    if BACKBONE_NAME in names:
        at = names.index(BACKBONE_NAME)
        backbone = model.layers[at]
        feature = _last_4d(backbone)
        before = keras.Model(model.input, model.layers[at - 1].output)
        inner = keras.Model(backbone.input, feature.output)
        inner_names = [layer.name for layer in backbone.layers]
        head = backbone.layers[inner_names.index(feature.name) + 1:] + model.layers[at + 1:logit_at + 1]
        return (lambda x: inner(before(x, training=False), training=False)), head
    feature = _last_4d(model)
    features = keras.Model(model.input, feature.output)
    return (lambda x: features(x, training=False)), model.layers[names.index(feature.name) + 1:logit_at + 1]


def _apply(head: list[keras.layers.Layer], x: Any) -> Any:
    for layer in head:
        x = layer(x, training=False)
    return x


def _logit_gradients(head: list[keras.layers.Layer], feats: np.ndarray) -> np.ndarray:
    """d(sum of logits)/d(feature map) at ``feats`` (each image's logit depends on its own map only)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(feats)
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(_apply(head, x))
        return np.asarray(tape.gradient(total, x))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return np.asarray(jax.grad(lambda f: jnp.sum(_apply(head, f)))(jnp.asarray(feats)))
    if backend == "torch":
        import torch

        x = torch.tensor(feats, requires_grad=True, device=keras.backend.get_device() or "cpu")
        _apply(head, x).sum().backward()
        return x.grad.detach().cpu().numpy()
    raise StepError(f"Grad-CAM: unsupported Keras backend {backend!r}")


def gradcam(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Grad-CAM maps for the positive class: float32 ``(N, H, W)`` in [0, 1] at the input resolution.

    ``images`` is a uint8 (or float) batch ``(N, H, W, C)`` as the model takes it. A map is the ReLU of the
    feature channels weighted by their spatially averaged gradients, upsampled and scaled to its maximum.
    """
    features, head = _cut(model)
    feats = np.asarray(keras.ops.convert_to_numpy(features(images.astype(np.float32))), dtype=np.float32)
    grads = _logit_gradients(head, feats)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cams = np.maximum((weights * feats).sum(axis=-1), 0.0)
    h, w = images.shape[1:3]
    out = np.zeros((len(images), h, w), dtype=np.float32)
    for i, cam in enumerate(cams):
        up = cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        peak = float(up.max())
        out[i] = up / peak if peak > 0 else up
    return out


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 picture of ``image`` (H, W, 1 or 3) with the map ``cam`` drawn over it in the jet colormap."""
    base = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(base.astype(np.uint8), 1 - alpha, heat, alpha, 0)

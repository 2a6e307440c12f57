"""Grad-CAM (Selvaraju et al. 2017) for medflow's binary classifiers: where the model looks.

The model is cut at a convolutional feature map (:func:`feature_layer`; for pretrained backbones, inside the
"backbone" sub-model) into two Keras sub-models: image -> feature map, and feature map -> positive-class
``logit``. The gradient of the logit with respect to the map is taken through the second alone. Works on the
TensorFlow, JAX and PyTorch backends; augmentation layers are inactive (inference mode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import keras
import numpy as np

from medflow.errors import StepError
from medflow.training.models import BACKBONE_NAME

LOGIT_LAYER = "logit"


MIN_SIDE = 7  # Grad-CAM's usual map: 7x7 on a 224-px input; coarser maps cannot localise anything


def _side(layer: keras.layers.Layer) -> int | None:
    """Smaller spatial side of a layer's 4-D output, None for other layers."""
    if isinstance(layer, keras.layers.InputLayer):
        return None
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # layers never called in a graph
        return None
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        return None
    return int(min(shape[1], shape[2]))


def feature_layer(model: keras.Model) -> keras.layers.Layer:
    """The deepest 4-D layer at least :data:`MIN_SIDE` px on a side (or the largest map, if none is).

    On 224-px inputs that is the last convolutional block (7x7); on small inputs an earlier block, since the
    last one may be 1x1.
    """
    maps = [(layer, side) for layer in model.layers if (side := _side(layer)) is not None]
    if not maps:
        raise StepError(f"Grad-CAM: model {model.name!r} has no convolutional feature map")
    wide = [layer for layer, side in maps if side >= MIN_SIDE]
    return wide[-1] if wide else max(maps, key=lambda m: m[1])[0]


def _cut(model: keras.Model) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(image -> feature map, feature map -> positive-class logit), as Keras sub-models of ``model``."""
    names = [layer.name for layer in model.layers]
    if LOGIT_LAYER not in names:
        raise StepError(f"Grad-CAM: model {model.name!r} has no {LOGIT_LAYER!r} layer (not a medflow model)")
    logit = model.get_layer(LOGIT_LAYER).output
    if BACKBONE_NAME not in names:
        feature = feature_layer(model)
        features = keras.Model(model.input, feature.output)
        head = keras.Model(feature.output, logit)
        return (lambda x: features(x, training=False)), (lambda f: head(f, training=False))
    at = names.index(BACKBONE_NAME)
    backbone = model.layers[at]
    feature = feature_layer(backbone)
    before = keras.Model(model.input, model.layers[at - 1].output)
    inner = keras.Model(backbone.input, feature.output)
    inner_head = keras.Model(feature.output, backbone.output)
    outer_head = keras.Model(model.layers[at + 1].input, logit)  # the layer after the backbone takes its output
    return ((lambda x: inner(before(x, training=False), training=False)),
            (lambda f: outer_head(inner_head(f, training=False), training=False)))


def _logit_gradients(head: Callable[[Any], Any], feats: np.ndarray) -> np.ndarray:
    """d(sum of logits)/d(feature map) at ``feats`` (each image's logit depends on its own map only)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(feats)
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(head(x))
        return np.asarray(tape.gradient(total, x))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return np.asarray(jax.grad(lambda f: jnp.sum(head(f)))(jnp.asarray(feats)))
    if backend == "torch":
        import torch

        x = torch.tensor(feats, requires_grad=True, device=keras.backend.get_device() or "cpu")
        head(x).sum().backward()
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

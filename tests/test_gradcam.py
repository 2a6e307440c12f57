"""Grad-CAM cuts every medflow model into (image -> feature map, feature map -> logit) without changing it."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from medflow.config import TrainConfig
from medflow.errors import StepError
from medflow.evaluation import gradcam
from medflow.training.models import build_model


def _check(model_name: str, size: int) -> None:
    model = build_model(TrainConfig(model=model_name), input_shape=(size, size, 1), allow_flips=False, pos=1,
                        neg=2)
    x = np.random.default_rng(0).integers(0, 255, (2, size, size, 1)).astype(np.float32)
    features, head = gradcam._cut(model)
    feats = features(x)
    assert min(feats.shape[1:3]) >= gradcam.MIN_SIDE
    whole = keras.Model(model.input, model.get_layer("logit").output)(x, training=False)
    assert np.allclose(keras.ops.convert_to_numpy(head(feats)), keras.ops.convert_to_numpy(whole), atol=1e-4)
    cams = gradcam.gradcam(model, x.astype(np.uint8))
    assert cams.shape == (2, size, size) and np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1


@pytest.mark.parametrize(("model_name", "size"), [("medflow_cnn", 32), ("tutorial_cnn", 64)])
def test_cut_reproduces_the_logit(model_name: str, size: int) -> None:
    _check(model_name, size)


@pytest.mark.slow
def test_cut_inside_a_pretrained_backbone() -> None:
    _check("densenet121", 64)


def test_feature_layer_is_7x7_on_224_inputs() -> None:
    model = build_model(TrainConfig(model="medflow_cnn"), input_shape=(224, 224, 1), allow_flips=False, pos=1,
                        neg=1)
    assert gradcam.feature_layer(model).name == "stage4_block2_out"


def test_overlay_is_rgb_uint8() -> None:
    img = np.full((16, 16, 1), 100, dtype=np.uint8)
    out = gradcam.overlay(img, np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_a_foreign_model_is_refused() -> None:
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
    with pytest.raises(StepError, match="no 'logit' layer"):
        gradcam.gradcam(model, np.zeros((1, 8, 8, 1), dtype=np.uint8))

"""Model building: shapes, seeding, output bias, augmentation, preprocessing, weights files, fine-tuning,
saving and mixed precision. Tiny inputs (32-75 px) and weights="none"; slower backbones marked slow."""

from __future__ import annotations

import ast
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from medflow.config import AugmentConfig, TrainConfig, parse_config  # noqa: E402
from medflow.errors import StepError  # noqa: E402
from medflow.training import models  # noqa: E402
from medflow.training.models import augmentation, build_model, preprocess, split_trainable  # noqa: E402

FAST_BACKBONE = "vgg19"  # 23 layers: builds in well under a second
SLOW_BACKBONES = ["densenet121", "efficientnetb0", "resnet50", "inceptionv3"]
NO_AUGMENT = AugmentConfig(rotation_deg=0, zoom=0, translate=0, brightness=0, contrast=0)


def _build(model: str = "medflow_cnn", shape: tuple[int, int, int] = (32, 32, 1), *, allow_flips: bool = False,
           pos: int = 30, neg: int = 10, **kw: Any) -> keras.Model:
    train = TrainConfig(**{"model": model, **kw})
    return build_model(train, input_shape=shape, allow_flips=allow_flips, pos=pos, neg=neg)


def _images(n: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def medflow() -> keras.Model:
    """medflow_cnn at 32 px grey with every augmentation on (flips too), pos:neg = 3:1; not modified by tests."""
    return _build(allow_flips=True)


@pytest.fixture(scope="module")
def vgg_gray() -> keras.Model:
    """The fast backbone, frozen, on 32 px grey input; not modified by tests."""
    return _build(FAST_BACKBONE, (32, 32, 1))


@pytest.fixture
def bfloat16_policy() -> Iterator[None]:
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


# --- builds and outputs -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape"), [("tutorial_cnn", (32, 32, 1)), ("medflow_cnn", (32, 40, 3))])
def test_own_models_output_one_probability_per_image(name: str, shape: tuple[int, int, int]) -> None:
    model = _build(name, shape)  # pos:neg = 30:10
    out = np.asarray(model(_images(4, shape), training=False))
    assert model.name == name
    assert out.shape == (4, 1) and out.dtype == np.float32
    # The head's input depends on the image. (Not the output itself: untrained, tutorial_cnn's inference-mode
    # activations shrink to ~1e-9 before the head, BatchNorm using its initial statistics, so every image
    # gets the prior below to float32 precision; in training BatchNorm normalises by the batch instead.)
    features = np.asarray(keras.Model(model.input, model.get_layer("logit").input)(_images(4, shape), training=False))
    assert np.ptp(features, axis=0).max() > 0, "the features do not depend on the image"
    # A blank image reaches the head as zero features (zero-initialised biases, BatchNorm at its initial
    # statistics, ReLU), so the untrained model answers with the prior: sigmoid(log(pos/neg)) = pos/(pos+neg).
    blank = np.asarray(model(np.zeros((1, *shape), dtype=np.uint8), training=False))
    assert float(blank[0, 0]) == pytest.approx(30 / 40, abs=1e-6)


def _check_backbone(name: str, size: int) -> None:
    model = _build(name, (size, size, 3))  # pos:neg = 30:10
    x = _images(2, (size, size, 3))
    out = np.asarray(model(x, training=False))
    assert model.get_layer("backbone").output.shape == (None, model.get_layer("logit").input.shape[-1])
    assert out.shape == (2, 1) and np.ptp(out) > 0, "the output does not depend on the image"
    # With the head's kernel zeroed only its bias is left: every image gets the prior pos/(pos+neg), which
    # checks that the probability is the sigmoid of the logit layer and the bias its log prior odds.
    logit = model.get_layer("logit")
    logit.kernel.assign(np.zeros(logit.kernel.shape, dtype="float32"))
    np.testing.assert_allclose(np.asarray(model(x, training=False)), 30 / 40, atol=1e-6)


def test_fast_backbone_builds_and_outputs_probabilities() -> None:
    _check_backbone(FAST_BACKBONE, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_BACKBONES)
def test_slow_backbones_build_and_output_probabilities(name: str) -> None:
    _check_backbone(name, models.min_input_size(name))


def test_model_accepts_uint8_and_float_input_alike(medflow: keras.Model) -> None:
    x = _images(3, (32, 32, 1))
    np.testing.assert_array_equal(np.asarray(medflow(x, training=False)),
                                  np.asarray(medflow(x.astype("float32"), training=False)))


def test_medflow_cnn_size_is_independent_of_the_image_size(medflow: keras.Model) -> None:
    assert _build(shape=(64, 64, 1)).count_params() == medflow.count_params()
    assert 1_000_000 <= medflow.count_params() <= 3_000_000


def test_tutorial_cnn_has_the_tutorial_layers() -> None:
    model = _build("tutorial_cnn", (64, 64, 1))
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("SeparableConv2D") == 8 and kinds.count("Conv2D") == 2
    assert [model.get_layer(f"dense{u}_dropout").rate for u in (512, 128, 64)] == [0.7, 0.5, 0.3]
    assert [model.get_layer(f"sep{f}_dropout").rate for f in (128, 256)] == [0.2, 0.2]
    assert model.get_layer("flatten").output.shape[-1] == 2 * 2 * 256


# --- seeding and output bias --------------------------------------------------------------------


def test_same_seed_same_initial_weights_different_seed_different() -> None:
    first, again, other = (_build("tutorial_cnn", seed=seed) for seed in (1, 1, 2))
    assert _same_weights(first.get_weights(), again.get_weights())
    assert not _same_weights(first.get_weights(), other.get_weights())


def test_output_bias_is_log_prior_odds(medflow: keras.Model) -> None:
    assert float(medflow.get_layer("logit").bias.numpy()[0]) == pytest.approx(math.log(30 / 10))


def test_options_off_give_zero_bias_and_no_augmentation_layer() -> None:
    model = _build("tutorial_cnn", pos=30, neg=10, output_bias=False, augment=NO_AUGMENT)
    assert float(model.get_layer("logit").bias.numpy()[0]) == 0.0
    assert [layer.name for layer in model.layers][:2] == ["image", "rescale"]


def test_output_bias_without_both_classes_fails() -> None:
    with pytest.raises(StepError, match=r"train.output_bias.*pos=0"):
        _build(pos=0, neg=10)


# --- augmentation -------------------------------------------------------------------------------


def _layer_kinds(seq: keras.Sequential) -> list[str]:
    return [type(layer).__name__ for layer in seq.layers]


def test_augmentation_has_no_flip_unless_flips_are_allowed() -> None:
    cfg = AugmentConfig()
    assert "RandomFlip" not in _layer_kinds(augmentation(cfg, False, 0))
    kinds = _layer_kinds(augmentation(cfg, True, 0))
    assert "RandomFlip" in kinds
    assert augmentation(cfg, True, 0).get_layer("flip").mode == "horizontal"
    assert set(kinds) == {"RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomBrightness",
                          "RandomContrast"}


def test_augmentation_omits_layers_whose_amount_is_zero() -> None:
    assert augmentation(NO_AUGMENT, False, 0).layers == []
    only_rotation = augmentation(NO_AUGMENT.model_copy(update={"rotation_deg": 18.0}), False, 0)
    assert _layer_kinds(only_rotation) == ["RandomRotation"]
    assert only_rotation.layers[0].factor == pytest.approx((-0.05, 0.05))  # 18 degrees = 0.05 of a turn


def test_augmentation_changes_images_only_in_training() -> None:
    aug = augmentation(AugmentConfig(), True, 0)
    x = _images(4, (32, 32, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)
    assert not np.allclose(np.asarray(aug(x, training=True)), x)


def test_augmentation_is_seeded() -> None:
    x = _images(4, (32, 32, 1)).astype("float32")
    first = np.asarray(augmentation(AugmentConfig(), True, 5)(x, training=True))
    again = np.asarray(augmentation(AugmentConfig(), True, 5)(x, training=True))
    np.testing.assert_array_equal(first, again)


def test_inference_is_deterministic_and_skips_augmentation(medflow: keras.Model) -> None:
    assert medflow.layers[1].name == "augmentation" and len(medflow.layers[1].layers) == 6
    x = _images(4, (32, 32, 1))
    first, second = medflow.predict(x, verbose=0), medflow.predict(x, verbose=0)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, np.asarray(medflow(x, training=False)), rtol=1e-5, atol=1e-6)



def test_lesion_augmentation_flips_both_ways_and_jitters_colour_only_in_training(tmp_path: Path) -> None:
    """vertical_flip, saturation and hue (the melanoma recipe): appended after the other layers, so the seeds
    of those stay as they were; a saved model with them loads and predicts identically."""
    cfg = AugmentConfig(vertical_flip=True, saturation=0.4, hue=0.05)
    aug = augmentation(cfg, True, 0)
    assert aug.get_layer("flip").mode == "horizontal_and_vertical"
    assert [layer.name for layer in aug.layers][-2:] == ["saturation", "hue"]
    assert aug.get_layer("saturation").factor == pytest.approx((0.3, 0.7))
    assert aug.get_layer("hue").factor == pytest.approx((0.0, 0.1))  # shifts of up to 0.05 of the circle
    assert augmentation(AugmentConfig(vertical_flip=True), False, 0).layers[0].name != "flip"  # flips need allow_flips
    x = _images(4, (16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)
    only_colour = augmentation(NO_AUGMENT.model_copy(update={"saturation": 0.4, "hue": 0.05}), False, 1)
    jittered = np.asarray(only_colour(x, training=True))
    assert not np.allclose(jittered, x)
    assert np.allclose(jittered.mean(), x.mean(), rtol=0.2)  # colour moves, the image stays
    inputs = keras.Input((16, 16, 3))  # the shape aug was built for above
    model = keras.Model(inputs, preprocess(aug(inputs), "medflow_cnn", "per_channel"))  # no network: fast
    _check_save_and_load(model, tmp_path / "lesion.keras")


def test_colour_jitter_on_grey_images_fails_naming_the_key() -> None:
    with pytest.raises(StepError, match=r"train.augment.saturation: colour jitter needs RGB images"):
        _build(shape=(32, 32, 1), augment=AugmentConfig(saturation=0.2))


def test_acquisition_shift_augmentation_blurs_and_adds_noise_only_in_training() -> None:
    cfg = NO_AUGMENT.model_copy(update={"blur_sigma": 1.5, "noise": 0.05})
    aug = augmentation(cfg, False, 3)
    assert [layer.name for layer in aug.layers] == ["blur", "noise"]
    assert aug.get_layer("blur").kernel_size == (7, 7)  # covers 2 sigma either side
    flat = np.full((2, 16, 16, 1), 128.0, dtype="float32")
    noisy = np.asarray(augmentation(NO_AUGMENT.model_copy(update={"noise": 0.05}), False, 3)(flat, training=True))
    assert noisy.std() == pytest.approx(0.05 * 255, rel=0.15)  # a fraction of the 0..255 range
    x = _images(2, (16, 16, 1)).astype("float32")
    blurred = np.asarray(augmentation(NO_AUGMENT.model_copy(update={"blur_sigma": 1.5}), False, 3)(x, training=True))
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(x, axis=1)).mean()  # smoother
    np.testing.assert_allclose(np.asarray(aug(x, training=False)), x, atol=1e-3)

# --- preprocessing ------------------------------------------------------------------------------


_KERAS_PREPROCESS = {
    "densenet121": keras.applications.densenet.preprocess_input,
    "efficientnetb0": keras.applications.efficientnet.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "inceptionv3": keras.applications.inception_v3.preprocess_input,
    "vgg19": keras.applications.vgg19.preprocess_input,
}


def _preprocessor(name: str, channels: int) -> keras.Model:
    inputs = keras.Input((8, 8, channels))
    return keras.Model(inputs, preprocess(inputs, name))


@pytest.mark.parametrize("name", sorted(_KERAS_PREPROCESS))
def test_preprocessing_matches_keras_applications_preprocess_input(name: str) -> None:
    rgb = _images(2, (8, 8, 3), seed=1).astype("float32")
    expected = _KERAS_PREPROCESS[name](rgb.copy())
    np.testing.assert_allclose(np.asarray(_preprocessor(name, 3)(rgb)), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(_KERAS_PREPROCESS))
def test_gray_preprocessing_equals_rgb_preprocessing_of_the_repeated_channel(name: str) -> None:
    gray = _images(2, (8, 8, 1), seed=2).astype("float32")
    expected = _KERAS_PREPROCESS[name](np.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(np.asarray(_preprocessor(name, 1)(gray)), expected, rtol=1e-5, atol=1e-4)


def test_per_image_normalization_gives_each_image_zero_mean_and_unit_variance(tmp_path: Path) -> None:
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, preprocess(inputs, "medflow_cnn", "per_image"))
    dim = _images(1, (8, 8, 1), seed=4).astype("float32") * 0.5
    x = np.concatenate([dim, dim * 1.5 + 40])  # the same image at another exposure and contrast
    out = np.asarray(model(x))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1, atol=0.02)
    np.testing.assert_allclose(out[0], out[1], atol=0.02)  # exposure and contrast are gone
    _check_save_and_load(model, tmp_path / "per_image.keras")


def test_per_channel_normalization_removes_a_colour_cast() -> None:
    """Grey-world colour constancy: each channel of each image to zero mean and unit variance, so the same
    lesion under a warmer light (a gain and an offset per channel) gives the same input."""
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, preprocess(inputs, "medflow_cnn", "per_channel"))
    image = _images(1, (8, 8, 3), seed=5).astype("float32") * 0.6
    cast = image * np.array([1.3, 1.0, 0.7], dtype="float32") + np.array([20, 5, 0], dtype="float32")
    out = np.asarray(model(np.concatenate([image, cast])))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1, atol=0.02)
    np.testing.assert_allclose(out[0], out[1], atol=0.02)
    per_image = keras.Model(inputs, preprocess(inputs, "medflow_cnn", "per_image"))(np.concatenate([image, cast]))
    assert not np.allclose(np.asarray(per_image)[0], np.asarray(per_image)[1], atol=0.1)  # per_image keeps the cast


def test_per_image_normalization_is_refused_for_pretrained_backbones() -> None:
    with pytest.raises(ValueError, match="normalize: per_image is for medflow's own CNNs"):
        TrainConfig(model=FAST_BACKBONE, normalize="per_image")


@pytest.mark.parametrize("name", ["tutorial_cnn", "medflow_cnn"])
def test_own_models_rescale_to_unit_range(name: str) -> None:
    x = np.array([0.0, 51.0, 255.0], dtype="float32").reshape(1, 1, 3, 1)
    np.testing.assert_allclose(np.asarray(_preprocessor(name, 1)(np.tile(x, (1, 8, 8 // 3 + 1, 1))[:, :8, :8])),
                               np.tile(x / 255, (1, 8, 8 // 3 + 1, 1))[:, :8, :8], rtol=1e-6)


def test_one_channel_input_feeds_a_three_channel_backbone(vgg_gray: keras.Model) -> None:
    gray_model = vgg_gray
    rgb_model = _build(FAST_BACKBONE, (32, 32, 3))
    assert gray_model.get_layer("gray_to_rgb").output.shape[-1] == 3
    assert _same_weights(gray_model.get_layer("backbone").get_weights(), rgb_model.get_layer("backbone").get_weights())
    gray = _images(2, (32, 32, 1))
    np.testing.assert_allclose(np.asarray(gray_model(gray, training=False)),
                               np.asarray(rgb_model(np.repeat(gray, 3, axis=-1), training=False)), rtol=1e-4)


def test_two_channel_input_fails() -> None:
    with pytest.raises(StepError, match="dataset.channels"):
        _build(shape=(32, 32, 2))


# --- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size", "minimum"), [("inceptionv3", 64, 75), ("medflow_cnn", 16, 32),
                                                       ("vgg19", 31, 32)])
def test_too_small_images_fail_naming_resize_size(name: str, size: int, minimum: int) -> None:
    with pytest.raises(StepError, match=rf"resize.size: {name} needs images of at least {minimum} px, got {size}"):
        _build(name, (size, size, 3))


def test_input_size_ok_returns_the_minimum() -> None:
    assert models.input_size_ok("inceptionv3", 75) == 75
    assert models.input_size_ok("densenet121", 224) == 32


def test_unknown_model_fails_clearly() -> None:
    with pytest.raises(StepError, match="train.model: unknown model 'alexnet'"):
        models.min_input_size("alexnet")


# --- weights ------------------------------------------------------------------------------------


def test_backbone_loads_local_weights_file(vgg_gray: keras.Model, tmp_path: Path) -> None:
    source = vgg_gray.get_layer("backbone")
    path = tmp_path / "b.weights.h5"
    source.save_weights(path)
    loaded = _build(FAST_BACKBONE, (32, 32, 1), seed=7, weights=str(path)).get_layer("backbone")
    assert _same_weights(loaded.get_weights(), source.get_weights())


def test_own_model_loads_weights_from_a_saved_keras_model(tmp_path: Path) -> None:
    source = _build("tutorial_cnn", seed=1)
    path = tmp_path / "m.keras"
    source.save(path)
    loaded = _build("tutorial_cnn", seed=2, weights=str(path))
    assert _same_weights(loaded.get_weights(), source.get_weights())


def test_missing_weights_file_fails_naming_the_key_and_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.weights.h5"
    with pytest.raises(StepError, match=rf"train.weights: weights file not found: {path}"):
        _build(FAST_BACKBONE, (32, 32, 3), weights=str(path))


def test_weights_file_of_unknown_kind_fails(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"x")
    with pytest.raises(StepError, match=r"train.weights: .*w.bin: expected a .weights.h5"):
        _build(weights=str(path))


def test_weights_of_another_architecture_fail(medflow: keras.Model, tmp_path: Path) -> None:
    path = tmp_path / "medflow.weights.h5"
    medflow.save_weights(path)
    with pytest.raises(StepError, match=r"train.weights: .*medflow.weights.h5 does not fit tutorial_cnn"):
        _build("tutorial_cnn", weights=str(path))


def test_legacy_h5_for_efficientnet_points_to_the_keras_cache(tmp_path: Path) -> None:
    path = tmp_path / "efficientnetb0_notop.h5"
    path.write_bytes(b"x")
    with pytest.raises(StepError, match=r"efficientnetb0.*~/.keras/models.*weights: imagenet"):
        _build("efficientnetb0", (32, 32, 3), weights=str(path))


def test_unreachable_imagenet_weights_fail_with_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_server: tuple[str, Path]
) -> None:
    """ImageNet weights served by a loopback server that does not have them (an empty Keras cache)."""
    base_url, _ = file_server
    monkeypatch.setattr("keras.src.applications.vgg19.WEIGHTS_PATH_NO_TOP", f"{base_url}/vgg19_notop.h5")
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "keras_home"))
    with pytest.raises(StepError, match=r"could not fetch ImageNet weights for vgg19 \(.*404.*\); download them "
                                        r"elsewhere and set train.weights to the local file"):
        _build(FAST_BACKBONE, (32, 32, 3), weights="imagenet")


def _readme_imagenet_recipe() -> dict[str, Any]:
    """The train params of README's melanoma ImageNet command (``-S 'datasets/melanoma.yaml:train.KEY=VALUE'``)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "train.weights=imagenet" in line and "exp run" in line)
    pairs = re.findall(r"-S 'datasets/melanoma\.yaml:train\.([\w.]+)=([^']*)'", line)
    assert pairs, line
    return {key: yaml.safe_load(value) for key, value in pairs}


@pytest.mark.slow  # two EfficientNetB0 builds (at 32 px: the weights do not depend on the image size)
def test_readme_imagenet_recipe_trains_from_a_local_weights_file(tmp_path: Path) -> None:
    """README's melanoma ImageNet command, offline: its train params with a local weights file of the same
    architecture, made here (the unreachable-download message is tested on VGG19 above)."""
    recipe = _readme_imagenet_recipe()
    assert recipe["weights"] == "imagenet" and recipe["model"] == "efficientnetb0"
    parse_config({"dataset": {"name": "t", "labels": {"benign": 0, "melanoma": 1}, "channels": 3},
                  "train": recipe})  # the command's params validate as a whole
    source = _build(shape=(32, 32, 3), **{**recipe, "weights": "none", "seed": 1}).get_layer("backbone")
    path = tmp_path / "efficientnetb0_local.weights.h5"
    source.save_weights(path)
    model = _build(shape=(32, 32, 3), **{**recipe, "weights": str(path), "seed": 2})
    assert _same_weights(model.get_layer("backbone").get_weights(), source.get_weights())
    assert models.backbone_variables(model)  # fine_tune: all


# --- fine-tuning --------------------------------------------------------------------------------


def test_frozen_backbone_has_no_trainable_variables() -> None:
    model = _build(FAST_BACKBONE, (32, 32, 3), fine_tune="frozen")
    backbone_vars, head_vars = split_trainable(model)
    assert backbone_vars == [] and models.backbone_variables(model) == []
    assert {v.path for v in head_vars} == {"logit/kernel", "logit/bias"}


def test_last_n_unfreezes_exactly_n_layers() -> None:
    model = _build(FAST_BACKBONE, (32, 32, 3), fine_tune="last_n", fine_tune_layers=3)
    backbone = model.get_layer("backbone")
    trainable = [layer.name for layer in backbone.layers if layer.trainable_weights]
    assert trainable == ["block5_conv2", "block5_conv3", "block5_conv4"]
    backbone_vars, head_vars = split_trainable(model)
    assert len(backbone_vars) == 6 and len(head_vars) == 2


@pytest.mark.slow
def test_last_n_keeps_batchnorm_frozen() -> None:
    model = _build("resnet50", (32, 32, 3), fine_tune="last_n", fine_tune_layers=4)
    backbone = model.get_layer("backbone")
    trainable = [layer for layer in backbone.layers if layer.trainable_weights]
    assert len(trainable) == 4
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)


def test_last_n_beyond_the_backbone_fails() -> None:
    with pytest.raises(StepError, match=r"train.fine_tune_layers: vgg19 has 16 layers"):
        _build(FAST_BACKBONE, (32, 32, 3), fine_tune="last_n", fine_tune_layers=17)


def test_all_makes_the_whole_backbone_trainable() -> None:
    model = _build(FAST_BACKBONE, (32, 32, 3), fine_tune="all")
    backbone = model.get_layer("backbone")
    assert len(models.backbone_variables(model)) == len(backbone.weights) == 32


def test_own_models_have_no_backbone_variables(medflow: keras.Model) -> None:
    backbone_vars, head_vars = split_trainable(medflow)
    assert backbone_vars == [] and len(head_vars) == len(medflow.trainable_variables) > 2


# --- saving and mixed precision -----------------------------------------------------------------


def _check_save_and_load(model: keras.Model, path: Path) -> None:
    model.save(path)
    loaded = keras.saving.load_model(path, custom_objects=models.custom_objects())
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert _same_weights(loaded.get_weights(), model.get_weights())
    x = _images(3, tuple(model.input.shape[1:]))
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)))


def test_saved_own_model_loads_and_predicts_identically(medflow: keras.Model, tmp_path: Path) -> None:
    _check_save_and_load(medflow, tmp_path / "medflow.keras")


@pytest.mark.parametrize(("name", "channels"), [("vgg19", 3), ("densenet121", 1), ("inceptionv3", 3)])
def test_saved_preprocessing_loads_and_computes_identically(name: str, channels: int, tmp_path: Path) -> None:
    """The preprocessing layers alone (fast): caffe BGR convolution, per-channel and scalar Rescaling."""
    _check_save_and_load(_preprocessor(name, channels), tmp_path / "pre.keras")


@pytest.mark.slow  # an 80 MB file
def test_saved_backbone_model_loads_and_predicts_identically(tmp_path: Path) -> None:
    """RGB input: the caffe BGR convolution, the nested backbone and the frozen call all survive saving."""
    model = _build(FAST_BACKBONE, (32, 32, 3), allow_flips=True)
    _check_save_and_load(model, tmp_path / "vgg.keras")
    # the saved model's backbone is also a valid train.weights source
    warm = _build(FAST_BACKBONE, (32, 32, 1), seed=7, weights=str(tmp_path / "vgg.keras"))
    assert _same_weights(warm.get_layer("backbone").get_weights(), model.get_layer("backbone").get_weights())


@pytest.mark.usefixtures("bfloat16_policy")
def test_mixed_bfloat16_keeps_the_output_float32() -> None:
    model = _build("tutorial_cnn", allow_flips=True)
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    out = model(_images(2, (32, 32, 1)), training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert model.get_layer("logit").compute_dtype == "float32"


def test_models_module_never_imports_tensorflow() -> None:
    tree = ast.parse(Path(models.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "keras" in imported
    assert not imported & {"tensorflow", "tf_keras", "jax", "torch"}

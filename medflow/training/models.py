"""Keras 3 models for binary classification: augmentation, preprocessing and network in one graph.

Backend-agnostic: this module imports ``keras`` only (never TensorFlow), so the same code builds and
serialises under ``KERAS_BACKEND=tensorflow``, ``jax`` or ``torch``.

Every model built by :func:`build_model` is one functional graph::

    image (H, W, C; uint8 values 0..255, fed as uint8 or float)
      -> augmentation   train-only random layers (inactive when training=False)      [GUIDE habit 11]
      -> preprocessing  deterministic, the same for train/val/test/inference, saved in the .keras file
      -> network        tutorial_cnn | medflow_cnn | a keras.applications backbone ("backbone") + head
      -> logit          Dense(1), float32, bias = log(pos / neg) when train.output_bias
      -> probability    sigmoid, float32 (numerically safe under mixed_float16 / mixed_bfloat16)

No custom layers and no Lambda layers: a saved model loads with plain ``keras.saving.load_model``
(:func:`custom_objects` is empty and exists so callers need not special-case that).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from medflow.config import AugmentConfig, TrainConfig
from medflow.errors import StepError

log = logging.getLogger(__name__)

OWN_MODELS = ("tutorial_cnn", "medflow_cnn")
BACKBONE_NAME = "backbone"

# Mean and standard deviation of ImageNet, RGB, on the 0..1 scale ('torch' mode of preprocess_input).
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# Channel means of ImageNet on the 0..255 scale, BGR order ('caffe' mode of preprocess_input).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class _Backbone:
    """A keras.applications family: its constructor, preprocess_input mode and smallest input side."""

    constructor: str  # attribute of keras.applications
    preprocess: str  # 'torch' | 'caffe' | 'tf' | 'none' (the model rescales itself)
    min_size: int


# preprocess modes, as keras.applications.<family>.preprocess_input defines them:
#   torch: x / 255, minus the ImageNet mean, divided by its std, per RGB channel    (densenet)
#   caffe: RGB -> BGR, minus the ImageNet BGR mean, no scaling                       (resnet50, vgg19)
#   tf:    x / 127.5 - 1, i.e. [-1, 1]                                               (inception_v3)
#   none:  identity; EfficientNet has Rescaling(1/255) + Normalization inside itself (efficientnet)
BACKBONES: dict[str, _Backbone] = {
    "densenet121": _Backbone("DenseNet121", "torch", 32),
    "efficientnetb0": _Backbone("EfficientNetB0", "none", 32),
    "resnet50": _Backbone("ResNet50", "caffe", 32),
    "inceptionv3": _Backbone("InceptionV3", "tf", 75),
    "vgg19": _Backbone("VGG19", "caffe", 32),
}
# Own CNNs halve the input five times; below 32 px the last stages see 1x1 maps.
_OWN_MIN_SIZE = 32


def custom_objects() -> dict[str, Any]:
    """Custom objects needed by keras.saving.load_model for medflow models: none (built-in layers only)."""
    return {}


def jit_compile(asked: bool) -> bool:
    """``train.jit_compile`` is XLA for TensorFlow. JAX always compiles: without jit Keras runs every op
    eagerly, one XLA compilation per op and device (2-device data_parallel test script, loaded 2-core VM: epoch 2
    32 s eager, 3 s jitted). torch never."""
    return {"jax": True, "torch": False}.get(keras.backend.backend(), asked)


def allow_jit(model: keras.Model, asked: bool | None) -> None:
    """Keras marks its affine augmentation layers ``supports_jit = False`` on every backend (for TensorFlow's
    transform op), which turns jit off for the whole model; on JAX they are plain jnp ops and trace fine. Every
    path that runs a model calls it (training, and evaluation, prediction and champion/challenger through
    :func:`medflow.evaluation.assess.load_trained`), so none of them runs op by op on JAX. ``asked`` None (a
    loaded model) leaves Keras's own choice on the other backends."""
    if keras.backend.backend() == "jax":
        affine = (keras.layers.RandomRotation, keras.layers.RandomZoom, keras.layers.RandomTranslation)
        for layer in model._flatten_layers():
            if isinstance(layer, affine):
                layer.supports_jit = True
    if asked is not None or keras.backend.backend() == "jax":
        model.jit_compile = jit_compile(bool(asked))


def min_input_size(model_name: str) -> int:
    """Smallest image side (pixels) that ``model_name`` accepts."""
    if model_name in OWN_MODELS:
        return _OWN_MIN_SIZE
    return _backbone_spec(model_name).min_size


def input_size_ok(model_name: str, size: int) -> int:
    """Check that images of side ``size`` fit ``model_name``; return the model's minimum side.

    Raises StepError naming ``resize.size`` and the minimum when the images are too small
    (e.g. inceptionv3 needs at least 75 px).
    """
    minimum = min_input_size(model_name)
    if size < minimum:
        raise StepError(f"resize.size: {model_name} needs images of at least {minimum} px, got {size}")
    return minimum


def augmentation(cfg: AugmentConfig, allow_flips: bool, seed: int, channels: int = 3) -> keras.Sequential:
    """Train-only random augmentation as Keras preprocessing layers (inactive when training=False).

    One layer per non-zero amount in ``cfg``; RandomFlip("horizontal") only when ``allow_flips``
    (never for chest X-rays: the heart is on the left). Layer ``i`` is seeded with ``seed + i`` so
    that the layers draw independent streams, reproducibly. Geometric layers fill with black
    (``fill_mode="constant"``) rather than Keras' default reflection, which would paste mirrored
    anatomy into the borders. Layers run in float32 whatever the global mixed-precision policy.
    The result may be empty (no layers) when every amount is 0 and flips are off. Saturation and hue jitter
    need colour (``channels`` 3): a StepError names the key otherwise.
    """
    colour = [key for key in ("saturation", "hue") if getattr(cfg, key) > 0]
    if colour and channels != 3:
        raise StepError(f"train.augment.{colour[0]}: colour jitter needs RGB images (dataset.channels: 3), "
                        f"got {channels} channel(s)")
    makers: list[tuple[bool, Callable[[int], layers.Layer]]] = [
        (allow_flips, lambda s: layers.RandomFlip(
            "horizontal_and_vertical" if cfg.vertical_flip else "horizontal", seed=s, dtype="float32", name="flip")),
        (cfg.rotation_deg > 0, lambda s: layers.RandomRotation(
            cfg.rotation_deg / 360.0, fill_mode="constant", seed=s, dtype="float32", name="rotation")),
        (cfg.zoom > 0, lambda s: layers.RandomZoom(
            cfg.zoom, fill_mode="constant", seed=s, dtype="float32", name="zoom")),
        (cfg.translate > 0, lambda s: layers.RandomTranslation(
            cfg.translate, cfg.translate, fill_mode="constant", seed=s, dtype="float32", name="translation")),
        (cfg.brightness > 0, lambda s: layers.RandomBrightness(
            cfg.brightness, value_range=(0, 255), seed=s, dtype="float32", name="brightness")),
        (cfg.contrast > 0, lambda s: layers.RandomContrast(
            cfg.contrast, value_range=(0, 255), seed=s, dtype="float32", name="contrast")),
        (cfg.blur_sigma > 0, lambda s: layers.RandomGaussianBlur(
            1.0, kernel_size=2 * math.ceil(2 * cfg.blur_sigma) + 1, sigma=(0.0, cfg.blur_sigma),
            value_range=(0, 255), seed=s, dtype="float32", name="blur")),
        (cfg.noise > 0, lambda s: _noise(cfg.noise, s)),
        # last, so that adding them left the seeds of the layers above unchanged
        (cfg.saturation > 0, lambda s: layers.RandomSaturation(
            (0.5 - cfg.saturation / 2, 0.5 + cfg.saturation / 2), value_range=(0, 255),
            seed=s, dtype="float32", name="saturation")),
        (cfg.hue > 0, lambda s: layers.RandomHue(  # factor f shifts the hue by up to f / 2 of the circle
            2 * cfg.hue, value_range=(0, 255), seed=s, dtype="float32", name="hue")),
    ]
    chosen = [make(seed + i) for i, (wanted, make) in enumerate(makers) if wanted]
    return keras.Sequential(chosen, name="augmentation")


def _noise(fraction: float, seed: int) -> keras.Sequential:
    """Additive Gaussian noise of ``fraction`` of the 0..255 range (GaussianNoise takes a stddev of at most 1,
    so it runs between a rescale to 0..1 and back)."""
    return keras.Sequential([layers.Rescaling(1.0 / 255, dtype="float32"),
                             layers.GaussianNoise(fraction, seed=seed, dtype="float32"),
                             layers.Rescaling(255.0, dtype="float32")], name="noise")


def preprocess(x: Any, model_name: str, normalize: str = "scale") -> Any:
    """Apply ``model_name``'s deterministic preprocessing to a symbolic image tensor (values 0..255).

    Own CNNs: Rescaling(1/255), then with ``normalize="per_image"`` each image to zero mean and unit
    variance over height, width and channels (a LayerNormalization without learnt scale or offset:
    ``tf.image.per_image_standardization`` as a built-in, serialisable layer), or with ``"per_channel"`` each
    colour channel of each image over height and width (grey-world colour constancy: a colour cast goes too).
    Backbones: one-channel input is repeated to three channels (Concatenate, serialisable, no Lambda), then
    ``keras.applications.<family>.preprocess_input`` reproduced with built-in layers (see ``BACKBONES``),
    so it is saved in the .keras file and runs on every backend. The caffe mode's RGB->BGR swap is a
    frozen 1x1 convolution for three-channel input; for repeated grey channels it is a no-op and a
    per-channel Rescaling suffices.
    """
    if model_name in OWN_MODELS:
        x = layers.Rescaling(1.0 / 255, dtype="float32", name="rescale")(x)
        if normalize in ("per_image", "per_channel"):
            axes = (1, 2, 3) if normalize == "per_image" else (1, 2)
            x = layers.LayerNormalization(axis=axes, center=False, scale=False, epsilon=1e-4,
                                          dtype="float32", name=normalize)(x)
        return x
    mode = _backbone_spec(model_name).preprocess
    gray = x.shape[-1] == 1
    if gray:
        x = layers.Concatenate(axis=-1, dtype="float32", name="gray_to_rgb")([x, x, x])
    if mode == "torch":
        scale = [1.0 / (255.0 * s) for s in _IMAGENET_STD_RGB]
        offset = [-m / s for m, s in zip(_IMAGENET_MEAN_RGB, _IMAGENET_STD_RGB, strict=True)]
        return layers.Rescaling(scale, offset, dtype="float32", name="preprocess")(x)
    if mode == "tf":
        return layers.Rescaling(1.0 / 127.5, -1.0, dtype="float32", name="preprocess")(x)
    if mode == "caffe":
        if gray:
            return layers.Rescaling(1.0, [-m for m in _CAFFE_MEAN_BGR], dtype="float32", name="preprocess")(x)
        return _rgb_to_caffe_bgr(x)
    return x


def _rgb_to_caffe_bgr(x: Any) -> Any:
    """RGB -> BGR and subtract the ImageNet BGR mean: a frozen 1x1 Conv2D (permutation kernel, bias)."""
    # zeros initialiser: draws no random numbers, so the backbone's initial weights do not depend on C
    conv = layers.Conv2D(3, 1, kernel_initializer="zeros", trainable=False, dtype="float32", name="preprocess")
    y = conv(x)
    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_channel, in_channel in enumerate((2, 1, 0)):
        kernel[0, 0, in_channel, out_channel] = 1.0
    conv.set_weights([kernel, -np.asarray(_CAFFE_MEAN_BGR, dtype="float32")])
    return y


def build_model(
    train: TrainConfig, *, input_shape: tuple[int, int, int], allow_flips: bool, pos: int, neg: int
) -> keras.Model:
    """Build ``train.model`` for images of ``input_shape`` (H, W, C), with augmentation and preprocessing inside.

    ``pos`` / ``neg`` are the training split's class counts (for the output bias). Seeds Keras
    (``keras.utils.set_random_seed(train.seed)``) first, so the same config gives identical initial
    weights. Raises StepError for an image size the model cannot take, a missing or unfit weights file,
    unreachable ImageNet weights, or an output bias without both classes.
    """
    height, width, channels = input_shape
    if channels not in (1, 3):
        raise StepError(f"dataset.channels: models take 1 or 3 channels, got {channels}")
    input_size_ok(train.model, min(height, width))
    bias = _output_bias(train.output_bias, pos, neg)
    weights_path = _weights_path(train)
    keras.utils.set_random_seed(train.seed)

    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = inputs
    augment = augmentation(train.augment, allow_flips, train.seed, channels)
    if augment.layers:
        x = augment(x)
    x = preprocess(x, train.model, train.normalize)
    if train.model == "tutorial_cnn":
        x = _tutorial_cnn(x)
    elif train.model == "medflow_cnn":
        x = _medflow_cnn(x)
    else:
        x = _backbone_features(x, train, (height, width), weights_path)
    logit = layers.Dense(1, bias_initializer=keras.initializers.Constant(bias), dtype="float32", name="logit")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="probability")(logit)
    model = keras.Model(inputs, outputs, name=train.model)
    if train.model in OWN_MODELS and weights_path is not None:
        _load_weights(model, weights_path, train, full_model=True)
    log.info("built %s for %s: %d parameters (%d trainable)", train.model, input_shape,
             model.count_params(), sum(math.prod(v.shape) for v in model.trainable_variables))
    return model


def backbone_variables(model: keras.Model) -> list[Any]:
    """Trainable variables of the model's pretrained backbone (empty for own CNNs)."""
    return split_trainable(model)[0]


def split_trainable(model: keras.Model) -> tuple[list[Any], list[Any]]:
    """(backbone variables, head variables) among the trainable ones, so the trainer can give the
    backbone a smaller learning rate (``learning_rate * fine_tune_lr_factor``). Own CNNs: ([], all)."""
    try:
        backbone = model.get_layer(BACKBONE_NAME)
    except ValueError:
        return [], list(model.trainable_variables)
    backbone_vars = list(backbone.trainable_variables)
    ids = {id(v) for v in backbone_vars}
    return backbone_vars, [v for v in model.trainable_variables if id(v) not in ids]


# --- own networks -------------------------------------------------------------------------------


def _tutorial_cnn(x: Any) -> Any:
    """The Keras TPU pneumonia tutorial's network (keras.io xray_classification_with_tpus), unchanged
    except for names: Conv 16 x2 + MaxPool, SeparableConv blocks 32, 64, 128, 256 (the last two followed
    by Dropout 0.2), Flatten, dense blocks 512/128/64 with Dropout 0.7/0.5/0.3. Its Flatten ties the size to
    the image (512 weights per flattened feature): 3.5 M parameters at 180 px RGB, 6.6 M at 224 px grey."""
    x = layers.Conv2D(16, 3, activation="relu", padding="same", name="conv1")(x)
    x = layers.Conv2D(16, 3, activation="relu", padding="same", name="conv2")(x)
    x = layers.MaxPool2D(name="pool")(x)
    for filters in (32, 64, 128, 256):
        name = f"sep{filters}"
        x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same", name=f"{name}_a")(x)
        x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same", name=f"{name}_b")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        x = layers.MaxPool2D(name=f"{name}_pool")(x)
        if filters >= 128:
            x = layers.Dropout(0.2, name=f"{name}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    for units, rate in ((512, 0.7), (128, 0.5), (64, 0.3)):
        x = layers.Dense(units, activation="relu", name=f"dense{units}")(x)
        x = layers.BatchNormalization(name=f"dense{units}_bn")(x)
        x = layers.Dropout(rate, name=f"dense{units}_dropout")(x)
    return x


# medflow_cnn: (width, residual blocks) per stage; each stage starts with a stride-2 block.
_MEDFLOW_STAGES = ((32, 2), (64, 2), (128, 2), (256, 2))


def _medflow_cnn(x: Any) -> Any:
    """medflow's default from-scratch network: a compact ResNet-18-style CNN (~2.8 M parameters).

    Why this shape: a few thousand grey 224 px images are too few for the tutorial's 6 M-parameter
    Flatten+Dense head (it overfits and its size grows with the image), and too few to train a
    23 M-parameter ResNet50 from scratch. Residual blocks with BatchNorm train reliably from random
    init at Adam's default rate; global average pooling makes the parameter count independent of the
    image size. Cost: stem conv 3x3/2 (32) to 112 px, then four stages of two basic blocks
    (3x3 conv-BN-ReLU x2 + shortcut) at widths 32/64/128/256 and 56/28/14/7 px, each stage entered by a
    stride-2 block with a 1x1 projection shortcut: ~0.5 GMAC per 224 px image, a quarter of
    ResNet-18, so it is fast on CPU and small enough for large GPU batches. The last BatchNorm of every
    residual branch starts at gamma = 0 (each block starts as identity; Goyal et al. 2017), convs use
    He init and no bias (BatchNorm follows), ReLU (cheaper than SiLU on CPU); Dropout 0.3 before the
    output.
    """
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, kernel_initializer="he_normal",
                      name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, (width, blocks) in enumerate(_MEDFLOW_STAGES, start=1):
        for block in range(1, blocks + 1):
            x = _residual_block(x, width, strides=2 if block == 1 else 1, name=f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return layers.Dropout(0.3, name="dropout")(x)


# BatchNorm's moving statistics average over ~1/(1-momentum) steps. Keras' default 0.99 (~100 steps, three
# epochs of a 1,000-image training set) lags the weights so far that inference-mode predictions collapse to
# one class while training-mode accuracy climbs; 0.9 (PyTorch's default) tracks them.
_BN_MOMENTUM = 0.9


def _residual_block(x: Any, width: int, *, strides: int, name: str) -> Any:
    """Basic ResNet block: conv3x3-BN-ReLU-conv3x3-BN (+ projection shortcut when the shape changes), ReLU."""
    shortcut = x
    if strides != 1 or x.shape[-1] != width:
        shortcut = layers.Conv2D(width, 1, strides=strides, use_bias=False, kernel_initializer="he_normal",
                                 name=f"{name}_proj")(x)
        shortcut = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"{name}_proj_bn")(shortcut)
    y = layers.Conv2D(width, 3, strides=strides, padding="same", use_bias=False, kernel_initializer="he_normal",
                      name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                      name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(momentum=_BN_MOMENTUM, gamma_initializer="zeros", name=f"{name}_bn2")(y)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


# --- pretrained backbones -----------------------------------------------------------------------


def _backbone_spec(model_name: str) -> _Backbone:
    try:
        return BACKBONES[model_name]
    except KeyError:
        known = ", ".join((*OWN_MODELS, *BACKBONES))
        raise StepError(f"train.model: unknown model {model_name!r}; known: {known}") from None


def _backbone_features(x: Any, train: TrainConfig, size: tuple[int, int], weights_path: Path | None) -> Any:
    """Backbone (named "backbone", include_top=False, average pooled) + Dropout 0.2, fine-tuning applied."""
    backbone = _make_backbone(train, size, weights_path)
    _set_fine_tuning(backbone, train)
    # frozen: call in inference mode so its BatchNorm statistics never move (Keras transfer-learning guide)
    x = backbone(x, training=False) if train.fine_tune == "frozen" else backbone(x)
    return layers.Dropout(0.2, name="dropout")(x)


def _make_backbone(train: TrainConfig, size: tuple[int, int], weights_path: Path | None) -> keras.Model:
    constructor = getattr(keras.applications, _backbone_spec(train.model).constructor)
    imagenet = train.weights == "imagenet"
    kwargs = {"include_top": False, "input_shape": (*size, 3), "pooling": "avg", "name": BACKBONE_NAME}
    if not imagenet:
        backbone = constructor(weights=None, **kwargs)
        if weights_path is not None:
            _load_weights(backbone, weights_path, train, full_model=False)
        return backbone
    try:
        return constructor(weights="imagenet", **kwargs)
    except Exception as e:  # keras.utils.get_file raises a bare Exception when the download fails
        raise StepError(
            f"train.weights: could not fetch ImageNet weights for {train.model} ({type(e).__name__}: {e}); "
            "download them elsewhere and set train.weights to the local file (or copy it into the Keras "
            "cache, $KERAS_HOME/models or ~/.keras/models, where weights: imagenet finds it offline)"
        ) from e


def _weights_path(train: TrainConfig) -> Path | None:
    """The local weights file named by ``train.weights``, checked before anything is built; None if none.

    ``.weights.h5``: Keras 3 weights of the same architecture (``backbone.save_weights(...)`` or
    ``model.save_weights(...)``). ``.keras``: a saved model whose "backbone" layer (or the whole model)
    has the same architecture. ``.h5``: a legacy keras.applications weights file (what Keras downloads
    into ~/.keras/models), except for EfficientNet: its ImageNet graph has an extra input rescaling that
    a legacy file cannot carry, so there the file belongs in the Keras cache with weights: imagenet.
    """
    if train.weights in ("", "none", "imagenet"):
        return None
    path = Path(train.weights).expanduser()
    if not path.is_file():
        raise StepError(f"train.weights: weights file not found: {path}")
    name = path.name.lower()
    if not name.endswith((".weights.h5", ".keras", ".h5")):
        raise StepError(f"train.weights: {path}: expected a .weights.h5, .keras or legacy .h5 file")
    if not name.endswith((".weights.h5", ".keras")) and train.model == "efficientnetb0":
        raise StepError(
            f"train.weights: {path}: legacy .h5 ImageNet files for efficientnetb0 need Keras' own loader; "
            "copy the file into ~/.keras/models (or $KERAS_HOME/models) and set train.weights: imagenet")
    return path


def _load_weights(target: keras.Model, path: Path, train: TrainConfig, *, full_model: bool) -> None:
    """Load the local weights file ``path`` into the backbone, or into the whole model for own CNNs."""
    try:
        if path.name.lower().endswith(".keras"):
            target.set_weights(_weights_from_saved_model(path, full_model))
        else:
            target.load_weights(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise StepError(f"train.weights: {path} does not fit {train.model}: {e}") from e
    log.info("loaded %s weights from %s", train.model if full_model else f"{train.model} backbone", path)


def _weights_from_saved_model(path: Path, full_model: bool) -> list[Any]:
    saved = keras.saving.load_model(path, compile=False, custom_objects=custom_objects(), safe_mode=True)
    if not full_model:
        try:
            return list(saved.get_layer(BACKBONE_NAME).get_weights())
        except ValueError:
            pass
    return list(saved.get_weights())


def _set_fine_tuning(backbone: keras.Model, train: TrainConfig) -> None:
    """frozen: nothing trainable; all: everything; last_n: the last ``fine_tune_layers`` layers that own
    weights, BatchNorm excluded (BatchNorm stays frozen, i.e. in inference mode, so small batches of
    X-rays do not wreck the ImageNet statistics)."""
    if train.fine_tune == "frozen":
        backbone.trainable = False
        return
    backbone.trainable = True
    if train.fine_tune == "all":
        return
    tunable = [layer for layer in backbone.layers
               if layer.weights and not isinstance(layer, layers.BatchNormalization)]
    n = train.fine_tune_layers
    if n > len(tunable):
        raise StepError(f"train.fine_tune_layers: {train.model} has {len(tunable)} layers with weights "
                        f"(BatchNorm excluded), got {n}")
    unfrozen = {id(layer) for layer in tunable[-n:]}
    for layer in backbone.layers:
        layer.trainable = id(layer) in unfrozen


def _output_bias(wanted: bool, pos: int, neg: int) -> float:
    """log(pos / neg): the initial output then predicts the training prior (Karpathy's 'init well')."""
    if not wanted:
        return 0.0
    if pos <= 0 or neg <= 0:
        raise StepError(f"train.output_bias: needs both classes in the training split, got pos={pos}, neg={neg}")
    return math.log(pos / neg)

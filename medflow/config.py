"""Typed, validated configuration: params.yaml and one catalog entry are read once here and passed down.

params.yaml holds the shared stage defaults; ``datasets/<name>.yaml`` (see :mod:`medflow.catalog`)
describes one dataset and overrides those defaults. :func:`load_config` merges the two and validates the
result once into :class:`Config`. Unknown keys and bad values raise :class:`ConfigError` naming the file
that set the offending key, e.g. ``datasets/malaria.yaml: resize.size: Input should be greater than or
equal to 8``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from medflow.catalog import (
    NAME_PATTERN,
    OPTIONAL_SECTIONS,
    STAGE_SECTIONS,
    catalog_dir,
    check_name,
    listed_datasets,
    load_yaml,
    read_entry,
)
from medflow.errors import ConfigError
from medflow.patients import GROUP_RULES

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]

DEFAULT_PARAMS = Path("params.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """One input: an http(s)/file URL or local path to an archive, or a local folder."""

    url: str
    filename: str | None = None  # name to save a download under (default: last URL path segment)
    sha256: str | None = None  # pinned digest of the archive; None = record and warn
    insecure: bool = False  # allow plain http:// (and redirects to it); https only otherwise

    @field_validator("sha256")
    @classmethod
    def _hex64(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be 64 hexadecimal characters")
        return v.lower() if v else v

    @property
    def is_remote(self) -> bool:
        return self.url.startswith(("http://", "https://", "file://"))


class DatasetCard(_Strict):
    """What the model card says about the data and the model's use (one block per dataset preset)."""

    title: str = ""  # e.g. "Pediatric chest X-rays (Kermany et al. 2018)"
    provenance: str = ""  # who collected the images, where, licence, citation
    intended_use: str = "Research on medical-image classification; not a medical device, not for clinical use."
    limitations: list[str] = []


class DatasetConfig(_Strict):
    # a path segment and a DVC stage key: the catalog's pattern (no '.', '..', '/', upper case or shell syntax)
    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
    # Remote or local inputs; archives and folders dropped into data/inbox/<name>/ are added to these.
    sources: list[Source] = []
    labels: dict[str, Literal[0, 1]]
    # The binary classes' own names, [label 0's, label 1's] (metadata, model card, report, `medflow predict`):
    # required where a label has several source classes; [] = each label's single source class. A list, not
    # {0: .., 1: ..}: DVC cannot read integer keys in a params file.
    class_names: list[str] = Field(default_factory=list, validate_default=True)
    group_rule: str = "filename"
    channels: Literal[1, 3] = 1
    allow_flips: bool = False
    card: DatasetCard = DatasetCard()

    @field_validator("sources", mode="before")
    @classmethod
    def _strings_are_urls(cls, v: object) -> object:
        if v is None:
            return []
        if isinstance(v, str | dict):
            v = [v]
        if isinstance(v, list):
            return [{"url": s} if isinstance(s, str) else s for s in v]
        return v

    @field_validator("labels")
    @classmethod
    def _both_labels(cls, v: dict[str, int]) -> dict[str, int]:
        if set(v.values()) != {0, 1}:
            raise ValueError("needs at least one class mapped to 0 and one mapped to 1")
        return v

    @field_validator("class_names")
    @classmethod
    def _binary_names(cls, v: list[str], info: ValidationInfo) -> list[str]:
        labels = info.data.get("labels")
        if labels is None:  # labels failed validation: that error is reported
            return v
        if not v:
            return default_class_names(labels)
        names = [name.strip() for name in v]
        if len(names) != 2 or not all(names) or names[0] == names[1]:
            raise ValueError(f"expected two different names, [label 0's, label 1's], e.g. [benign, melanoma], got {v}")
        return names

    @field_validator("group_rule")
    @classmethod
    def _valid_rule(cls, v: str) -> str:
        pattern = GROUP_RULES.get(v, v)
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a rule name ({', '.join(GROUP_RULES)}) nor a valid regex: {e}") from e
        if compiled.groups < 1:
            raise ValueError("a custom regex needs one capturing group: the patient/group id")
        return v

    @property
    def group_pattern(self) -> re.Pattern[str]:
        return re.compile(GROUP_RULES.get(self.group_rule, self.group_rule))


def default_class_names(labels: dict[str, int]) -> list[str]:
    """Each label's single source class as its name; ValueError where a label has several (name them)."""
    sources = {value: [k for k, v in labels.items() if v == value] for value in (0, 1)}
    several = {value: names for value, names in sources.items() if len(names) > 1}
    if several:
        which = "; ".join(f"label {value} has {', '.join(names)}" for value, names in several.items())
        raise ValueError(f"required: {which}, so the binary classes need names of their own, [label 0's, "
                         "label 1's], e.g. class_names: [benign, malignant] (the source classes stay in the manifest)")
    return [sources[0][0], sources[1][0]]


class DownloadConfig(_Strict):
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    retries: Annotated[int, Field(ge=0)] = 5
    backoff_s: Annotated[float, Field(ge=0)] = 1.0


class ExtractConfig(_Strict):
    max_total_bytes: Annotated[int, Field(gt=0)] = 50_000_000_000
    max_ratio: Annotated[float, Field(gt=1)] = 200.0
    max_members: Annotated[int, Field(gt=0)] = 1_000_000


class FilterConfig(_Strict):
    min_side: Annotated[int, Field(ge=1)] = 32
    max_pixels: Annotated[int, Field(gt=0)] = 89_478_485  # Pillow's MAX_IMAGE_PIXELS
    near_duplicate_distance: Annotated[int, Field(ge=0, le=64)] = 2
    near_duplicate_min_correlation: Annotated[float, Field(ge=-1, le=1)] = 0.97
    workers: Annotated[int, Field(ge=0)] = 0


class ResizeConfig(_Strict):
    size: Annotated[int, Field(ge=8, le=4096)] = 224
    workers: Annotated[int, Field(ge=0)] = 0


class SplitConfig(_Strict):
    seed: int = 42
    train: Annotated[float, Field(gt=0, lt=1)] = 0.70
    val: Annotated[float, Field(gt=0, lt=1)] = 0.15
    test: Annotated[float, Field(gt=0, lt=1)] = 0.15
    # the source's own test split (a folder named test/testing, e.g. Kermany's chest_xray/test/): auto = kept as
    # the test split where the source has one, else carved by the ratios; true = required; false = ignored
    keep_source_test: Literal["auto"] | bool = "auto"

    def keeps_source_test(self, has_source_test: bool) -> bool:
        """Whether the split keeps the source's test split, given whether any image has one."""
        return has_source_test if self.keep_source_test == "auto" else bool(self.keep_source_test)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train + self.val + self.test:g}")
        return self


class ValidateConfig(_Strict):
    split_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.05
    class_ratio_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.10
    shortcut_auc_max: Annotated[float, Field(gt=0.5, le=1)] = 0.70  # metadata -> label AUC above this: warn/fail
    fail_on_shortcut: bool = False  # true: a flagged shortcut check fails the validate step


class AugmentConfig(_Strict):
    """Train-only augmentation (Keras layers, inactive at inference). Flips follow dataset.allow_flips."""

    rotation_deg: Annotated[float, Field(ge=0, le=180)] = 15.0
    zoom: Annotated[float, Field(ge=0, lt=1)] = 0.1
    translate: Annotated[float, Field(ge=0, lt=1)] = 0.1
    brightness: Annotated[float, Field(ge=0, le=1)] = 0.1
    contrast: Annotated[float, Field(ge=0, le=1)] = 0.1
    # acquisition shift (another scanner, exposure or encoder): Gaussian blur up to this sigma (px), and
    # additive Gaussian noise of this standard deviation, as a fraction of the 0..255 range
    blur_sigma: Annotated[float, Field(ge=0, le=5)] = 0.0
    noise: Annotated[float, Field(ge=0, le=0.2)] = 0.0
    # colour jitter (RGB only): saturation scaled by up to 1 +- this, hue shifted by up to this fraction of the circle
    saturation: Annotated[float, Field(ge=0, le=1)] = 0.0
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    # vertical flips too, where dataset.allow_flips (lesions and cells have no up or down; X-rays do)
    vertical_flip: bool = False


class TrainConfig(_Strict):
    model: Literal["tutorial_cnn", "medflow_cnn", "densenet121", "efficientnetb0", "resnet50", "inceptionv3",
                   "vgg19"] = "medflow_cnn"
    weights: str = "none"  # backbones: imagenet | none | path to a local .weights.h5 / .keras file
    fine_tune: Literal["frozen", "last_n", "all"] = "frozen"  # backbones: train the head only, or more
    fine_tune_layers: Annotated[int, Field(ge=0)] = 0  # last_n: how many backbone layers to unfreeze
    fine_tune_lr_factor: Annotated[float, Field(gt=0, le=1)] = 0.1  # last_n/all: lr = learning_rate * this
    epochs: Annotated[int, Field(ge=1)] = 30  # 0 would train nothing and still replace the model
    batch_size: Annotated[int, Field(ge=1)] = 32  # per replica; global = batch_size * replicas (logged)
    optimizer: Literal["adam", "adamw", "rmsprop"] = "adam"
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4  # adamw only
    schedule: Literal["constant", "exponential", "cosine"] = "constant"
    decay_rate: Annotated[float, Field(gt=0, le=1)] = 0.96  # exponential: per epoch
    reduce_lr_patience: Annotated[int, Field(ge=0)] = 3  # ReduceLROnPlateau on select_on; 0 = off
    early_stopping_patience: Annotated[int, Field(ge=0)] = 8  # on select_on, best weights restored; 0 = off
    class_weights: bool = True  # weight_c = n / (2 * n_c), the tutorial's formula
    # The val figure that picks the kept epoch, stops early and lowers the lr (medflow/training/selection.py):
    # val_loss = the training objective on val (class-weighted like training) | val_auc | val_pr_auc
    select_on: Literal["val_loss", "val_auc", "val_pr_auc"] = "val_loss"
    output_bias: bool = True  # initialise the output bias to log(pos / neg)
    # own CNNs' input scaling: scale = x / 255 | per_image = each image to zero mean and unit variance
    # (LayerNormalization over height, width and channels), which removes exposure and contrast differences |
    # per_channel = each colour channel of each image to zero mean and unit variance (grey-world colour
    # constancy: a camera's or light's colour cast is removed as well)
    normalize: Literal["scale", "per_image", "per_channel"] = "scale"
    augment: AugmentConfig = AugmentConfig()
    mixed_precision: Literal["none", "mixed_float16", "mixed_bfloat16"] = "none"
    jit_compile: bool = False  # XLA
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker", "tpu", "data_parallel"] = "auto"
    seed: int = 42

    @model_validator(mode="after")
    def _fine_tune_needs_layers(self) -> TrainConfig:
        if self.fine_tune == "last_n" and self.fine_tune_layers == 0:
            raise ValueError("fine_tune: last_n needs fine_tune_layers > 0")
        if self.model in ("tutorial_cnn", "medflow_cnn") and self.weights == "imagenet":
            raise ValueError(f"weights: imagenet needs a keras.applications backbone, not {self.model}")
        if self.normalize != "scale" and self.model not in ("tutorial_cnn", "medflow_cnn"):
            raise ValueError(f"normalize: {self.normalize} is for medflow's own CNNs; {self.model} takes its "
                             "pretrained weights' own preprocessing")
        return self


class EvaluateConfig(_Strict):
    """Operating threshold (chosen on val) and test-split report settings."""

    threshold_rule: Literal["target_sensitivity", "youden", "fixed"] = "target_sensitivity"
    target_sensitivity: Annotated[float, Field(gt=0, le=1)] = 0.95  # target_sensitivity: the val sensitivity to reach
    fixed_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5  # fixed: this probability
    bootstrap: Annotated[int, Field(ge=1000)] = 2000  # stratified resamples for the 95% CIs
    bootstrap_by: Literal["image", "patient"] = "image"  # patient: resample whole patients (cluster bootstrap)
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    calibration_bins: Annotated[int, Field(ge=2, le=100)] = 10  # equal-width bins for ECE and the reliability plot
    gradcam_examples: Annotated[int, Field(ge=0, le=16)] = 2  # Grad-CAM overlays per outcome (TP, FP, TN, FN)
    batch_size: Annotated[int, Field(ge=1)] = 64
    seed: int = 42
    # external validation sets: folders of class folders, or archives of them (relative to the project folder),
    # scored by the evaluate stage at the val-chosen threshold; never used for training, selection or thresholds
    external: list[str] = []
    # file names and patient ids as salted hashes in the report, model card, predictions and Prefect artifacts
    # (key per checkout in .dvc/tmp/medflow/salt; medflow.evaluation.pseudonym)
    pseudonymize: bool = False


class CrossvalConfig(_Strict):
    """Grouped k-fold cross-validation of the training recipe (the crossval stage; medflow.evaluation.crossval)."""

    folds: Annotated[int, Field(ge=0, le=20)] = 0  # 0 = off; else at least 3 (one fold tests, the next selects)
    seed: int = 42  # how the split units are dealt into folds

    @field_validator("folds")
    @classmethod
    def _off_or_three(cls, v: int) -> int:
        if v in (1, 2):
            raise ValueError("must be 0 (off) or at least 3: each fold is test once, the next one is its val, the "
                             "rest train")
        return v


class RetrainConfig(_Strict):
    """Retraining when new data lands (Prefect): schedule and champion/challenger promotion."""

    cron: str = "0 2 * * *"  # nightly retrain schedule (Prefect cron, in timezone)
    timezone: str = "UTC"
    poll_s: Annotated[float, Field(gt=0)] = 30.0  # inbox polling interval of `medflow watch`
    tolerance: Annotated[float, Field(ge=0, le=1)] = 0.02  # AUC drop allowed for a challenger (non-inferiority)
    bootstrap: Annotated[int, Field(ge=1000)] = 2000  # paired resamples for the AUC difference
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95  # promote iff the CI's lower bound >= -tolerance
    seed: int = 42


class ComputeConfig(_Strict):
    """Where the filter and resize steps decode: their local process pool, or a Dask cluster (README, "Dask")."""

    # a dask.distributed scheduler (tcp://host:8786); null: $DASK_SCHEDULER_ADDRESS, else the local pool.
    # Not a DVC param of any stage: the outputs are the same bytes wherever they are decoded.
    dask_address: Annotated[str, Field(min_length=1, pattern=r"^\S+$")] | None = None


class Config(_Strict):
    dataset: DatasetConfig
    download: DownloadConfig = DownloadConfig()
    extract: ExtractConfig = ExtractConfig()
    filter: FilterConfig = FilterConfig()
    resize: ResizeConfig = ResizeConfig()
    split: SplitConfig = SplitConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    crossval: CrossvalConfig = CrossvalConfig()
    retrain: RetrainConfig = RetrainConfig()
    compute: ComputeConfig = ComputeConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _format_errors(source: str, err: ValidationError, override: tuple[str, dict[str, Any]] | None = None) -> str:
    """One line per error, ``<file>: <key>: <message>``; with ``override`` (catalog file, its data), an error
    whose key that file sets is attributed to it, the rest to ``source``."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else f"{e['msg']} (got {_shown(e.get('input'))})"
        where = source
        if override is not None and _sets(override[1], loc):
            where = override[0]
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """A bad value as an error names it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sets(data: dict[str, Any], loc: list[str]) -> bool:
    """Whether the mapping ``data`` holds the key path ``loc`` (``validate`` stands for ``validate_``)."""
    node: Any = data
    for part in loc:
        part = "validate" if part == "validate_" else part
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def parse_config(data: object, source: str = "params") -> Config:
    """Validate a params mapping that holds its own ``dataset:`` block; raise ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def load_config(params: Path | str = DEFAULT_PARAMS, dataset: str | None = None) -> Config:
    """The typed config of one dataset: params.yaml's shared defaults merged with its catalog entry.

    ``dataset`` names an entry of the catalog beside ``params`` (``datasets/<dataset>.yaml``, listed in
    params.yaml's ``datasets:``); its sections override params.yaml's, key by key (mappings merge, lists
    and values replace). Without ``dataset``, ``params`` must be self-contained (its own ``dataset:``
    block with a ``name``), as the step tests and benchmarks write them.
    """
    params = Path(params)
    data = _read_params(params)
    if dataset is None:
        if "dataset" not in data:
            raise ConfigError(f"{params}: no dataset: block; name a dataset of the catalog (--dataset NAME): "
                              f"{', '.join(_listed_or_empty(data, params))}")
        return parse_config(data, str(params))
    if "dataset" in data:
        raise ConfigError(f"{params}: holds its own dataset: block ({data['dataset'].get('name', '?')!r}) and a "
                          f"catalog dataset ({dataset!r}) was named as well: use one or the other")
    check_name(dataset, "--dataset")
    listed_datasets(data, params)  # the list matches the catalog, so an entry that exists is one dvc.yaml builds
    entry = read_entry(catalog_dir(params), dataset)
    sections = (*STAGE_SECTIONS, *OPTIONAL_SECTIONS)
    merged = {s: _deep_merge(data.get(s) or {}, entry.overrides.get(s, {})) for s in sections}
    unknown = {k: v for k, v in data.items() if k not in (*sections, "datasets")}
    try:
        return Config.model_validate({"dataset": entry.dataset, **merged, **unknown})
    except ValidationError as e:
        raw = {"dataset": entry.dataset, **entry.overrides}
        raise ConfigError(_format_errors(str(params), e, (str(entry.path), raw))) from None


def _read_params(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _listed_or_empty(data: dict[str, Any], params: Path) -> list[str]:
    try:
        return listed_datasets(data, params)
    except ConfigError:
        return ["(none: params.yaml has no valid datasets: list)"]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it: nested mappings merge key by key; anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def changed_params(before: Config, after: Config, keys: list[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """The dotted keys (``train.epochs``) whose value differs between two configs, with (old, new) values.

    ``keys``: only these keys or sections (``train``, ``resize.size``: what a dvc.yaml stage lists under
    ``params``); None compares everything.
    """
    old, new = _flat(before.model_dump(mode="json")), _flat(after.model_dump(mode="json"))
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if keys is not None:
        differing = [k for k in differing if any(k == s or k.startswith(s + ".") for s in keys)]
    return {k: (old.get(k), new.get(k)) for k in differing}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}

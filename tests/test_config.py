"""The typed config: params.yaml's shared defaults merged with one catalog entry (datasets/<name>.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from medflow.catalog import DATASET_KEYS, STAGE_SECTIONS, catalog_names
from medflow.config import ConfigError, load_config, parse_config

DATASET = {"sources": ["x.zip"], "labels": {"A": 0, "B": 1}, "class_names": ["A", "B"],
           "group_rule": "filename", "channels": 1, "allow_flips": False, "card": {}}
MELANOMA_LIKE = {"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0}


def _minimal(**overrides: object) -> dict:
    data: dict = {"dataset": {"name": "t", "sources": ["x.zip"], "labels": {"A": 0, "B": 1}}}
    data.update(overrides)
    return data


def _entry(**sections: Any) -> dict[str, Any]:
    """A catalog file's content: the dataset block and every stage section (empty unless given)."""
    return {"dataset": dict(DATASET), **{s: {} for s in STAGE_SECTIONS}, **sections}


def _checkout(tmp_path: Path, entries: dict[str, dict[str, Any]], listed: list[str] | None = None,
              **params: Any) -> Path:
    """params.yaml (shared defaults + ``datasets:``) beside a datasets/ catalog folder; returns params.yaml."""
    (tmp_path / "datasets").mkdir()
    for name, entry in entries.items():
        (tmp_path / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(entry))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"datasets": listed if listed is not None else list(entries),
                                    "train": {"epochs": 30, "augment": {"zoom": 0.1, "rotation_deg": 15}},
                                    **params}))
    return path


# ------------------------------------------------------------------------------ the shipped catalog
def test_shipped_catalog_loads_every_listed_dataset(shipped_params: Path) -> None:
    listed = yaml.safe_load(shipped_params.read_text())["datasets"]
    assert listed == ["pneumonia", "malaria", "melanoma", "covid_ct"]
    assert sorted(listed) == catalog_names(shipped_params.parent / "datasets")
    configs = {name: load_config(shipped_params, name) for name in listed}
    assert {name: cfg.dataset.name for name, cfg in configs.items()} == {n: n for n in listed}
    pneumonia = configs["pneumonia"]
    assert pneumonia.dataset.channels == 1 and not pneumonia.dataset.allow_flips
    assert pneumonia.dataset.group_rule == "kermany" and pneumonia.resize.size == 224
    assert pneumonia.split.train + pneumonia.split.val + pneumonia.split.test == pytest.approx(1.0)
    assert configs["malaria"].resize.size == 128 and configs["malaria"].dataset.channels == 3  # its one override
    melanoma = configs["melanoma"]  # its recipe (README, "Melanoma: the per-task recipe")
    assert melanoma.resize.size == 64 and melanoma.dataset.allow_flips and melanoma.train.augment.vertical_flip
    assert melanoma.train.select_on == "val_auc" and melanoma.train.augment.rotation_deg == 180
    assert melanoma.train.schedule == "cosine" and melanoma.train.reduce_lr_patience == 0  # no plateau halving
    assert configs["covid_ct"].crossval.folds == 5 and configs["pneumonia"].crossval.folds == 0
    assert melanoma.train.augment.brightness == 0.1  # the shared default, merged key by key
    assert {name: cfg.dataset.class_names for name, cfg in configs.items()} == {
        "pneumonia": ["NORMAL", "PNEUMONIA"], "malaria": ["Uninfected", "Parasitized"],
        "melanoma": ["benign", "melanoma"], "covid_ct": ["CT_NonCOVID", "CT_COVID"]}


def test_shipped_params_hold_no_dataset_block(shipped_params: Path) -> None:
    params = yaml.safe_load(shipped_params.read_text())
    assert "dataset" not in params
    with pytest.raises(ConfigError, match="no dataset: block; name a dataset of the catalog.*pneumonia, malaria"):
        load_config(shipped_params)


# ----------------------------------------------------------------------------------------- merging
def test_overrides_merge_key_by_key(tmp_path: Path) -> None:
    params = _checkout(tmp_path, {"cells": _entry(train={"augment": {"zoom": 0.3}}, resize={"size": 96}),
                                  "plain": _entry()})
    cells, plain = load_config(params, "cells"), load_config(params, "plain")
    assert cells.train.augment.zoom == 0.3 and cells.train.augment.rotation_deg == 15  # the rest kept
    assert cells.train.epochs == 30 and cells.resize.size == 96
    assert plain.train.augment.zoom == 0.1 and plain.resize.size == 224
    assert cells.dataset.name == "cells"  # the file stem


def test_override_lists_replace(tmp_path: Path) -> None:
    entry = _entry()
    entry["dataset"]["sources"] = ["a.zip", "b.zip"]
    cfg = load_config(_checkout(tmp_path, {"d": entry}), "d")
    assert [s.url for s in cfg.dataset.sources] == ["a.zip", "b.zip"]


def test_unknown_override_key_names_the_catalog_file(tmp_path: Path) -> None:
    params = _checkout(tmp_path, {"d": _entry(resize={"sise": 3})})
    with pytest.raises(ConfigError, match=r"datasets/d\.yaml: resize\.sise: unknown key"):
        load_config(params, "d")


def test_bad_override_value_names_the_catalog_file_and_a_bad_default_params(tmp_path: Path) -> None:
    params = _checkout(tmp_path, {"d": _entry(split={"train": -1})}, split={"seed": "x"})
    with pytest.raises(ConfigError) as e:
        load_config(params, "d")
    lines = str(e.value).splitlines()
    assert any(line.startswith(f"{tmp_path / 'datasets' / 'd.yaml'}: split.train") for line in lines), lines
    assert any(line.startswith(f"{params}: split.seed") for line in lines), lines


def test_unknown_params_section_is_named(tmp_path: Path) -> None:
    params = _checkout(tmp_path, {"d": _entry()}, trian={"epochs": 1})
    with pytest.raises(ConfigError, match=r"params\.yaml: trian: unknown key"):
        load_config(params, "d")


# ------------------------------------------------------------------------------ catalog structure
@pytest.mark.parametrize("section", ["resize", "retrain"])
def test_missing_section_names_file_and_section(tmp_path: Path, section: str) -> None:
    entry = _entry()
    del entry[section]
    params = _checkout(tmp_path, {"d": entry})
    with pytest.raises(ConfigError, match=rf"datasets/d\.yaml: missing section\(s\) {section}: .*{section}: {{}}"):
        load_config(params, "d")


@pytest.mark.parametrize("key", DATASET_KEYS)
def test_dataset_keys_dvc_lists_must_be_stated(tmp_path: Path, key: str) -> None:
    entry = _entry()
    del entry["dataset"][key]
    with pytest.raises(ConfigError, match=rf"datasets/d\.yaml: dataset\.{key}: missing"):
        load_config(_checkout(tmp_path, {"d": entry}), "d")


def test_unknown_top_level_key_and_non_mapping_section(tmp_path: Path) -> None:
    params = _checkout(tmp_path, {"d": _entry(manifest={}), "e": _entry(train=[1])})
    with pytest.raises(ConfigError, match=r"datasets/d\.yaml: manifest: unknown key"):
        load_config(params, "d")
    with pytest.raises(ConfigError, match=r"datasets/e\.yaml: train: expected a mapping"):
        load_config(params, "e")


def test_name_in_the_file_must_be_its_stem(tmp_path: Path) -> None:
    ok, bad = _entry(), _entry()
    ok["dataset"]["name"], bad["dataset"]["name"] = "same", "other"
    params = _checkout(tmp_path, {"same": ok, "d": bad})
    assert load_config(params, "same").dataset.name == "same"
    with pytest.raises(ConfigError, match=r"datasets/d\.yaml: dataset\.name: 'other' differs from the file name"):
        load_config(params, "d")


@pytest.mark.parametrize("name", ["Upper", "-dash", "a.b", "a/b", ""])
def test_bad_dataset_names_are_refused_before_use(tmp_path: Path, name: str) -> None:
    params = _checkout(tmp_path, {"d": _entry()})
    with pytest.raises(ConfigError, match="is not a dataset name"):
        load_config(params, name)


def test_unknown_dataset_lists_the_catalog(tmp_path: Path) -> None:
    params = _checkout(tmp_path, {"b": _entry(), "a": _entry()})
    with pytest.raises(ConfigError, match=r"unknown dataset 'c': no .*datasets/c\.yaml .*describes: a, b\)"):
        load_config(params, "c")


def test_datasets_list_must_match_the_catalog(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    unlisted = _checkout(tmp_path / "one", {"a": _entry(), "b": _entry()}, listed=["a"])
    with pytest.raises(ConfigError, match=r"datasets: b described in .* but not listed"):
        load_config(unlisted, "a")
    (tmp_path / "two").mkdir()
    missing = _checkout(tmp_path / "two", {"a": _entry()}, listed=["a", "zz"])
    with pytest.raises(ConfigError, match=r"datasets: no catalog file for zz"):
        load_config(missing, "a")
    (tmp_path / "three").mkdir()
    twice = _checkout(tmp_path / "three", {"a": _entry()}, listed=["a", "a"])
    with pytest.raises(ConfigError, match="appear twice"):
        load_config(twice, "a")


# ------------------------------------------------------------------ self-contained params files
def test_self_contained_params_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_minimal(resize={"size": 32})))
    cfg = load_config(path)
    assert cfg.dataset.name == "t" and cfg.resize.size == 32
    with pytest.raises(ConfigError, match="holds its own dataset: block .* and a catalog dataset .* use one"):
        load_config(path, "t")


def test_string_sources_become_urls() -> None:
    cfg = parse_config(_minimal())
    assert cfg.dataset.sources[0].url == "x.zip" and cfg.dataset.sources[0].sha256 is None


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"resize\.sise: unknown key"):
        parse_config(_minimal(resize={"sise": 3}))


def test_bad_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"split\.train"):
        parse_config(_minimal(split={"train": -1}))


def test_ratios_must_sum_to_one() -> None:
    with pytest.raises(ConfigError, match="must be 1"):
        parse_config(_minimal(split={"train": 0.5, "val": 0.1, "test": 0.1}))


def test_labels_need_both_classes() -> None:
    data = _minimal()
    data["dataset"]["labels"] = {"A": 1, "B": 1}
    with pytest.raises(ConfigError, match=r"dataset\.labels"):
        parse_config(data)


def test_bad_sha256_is_named() -> None:
    data = _minimal()
    data["dataset"]["sources"] = [{"url": "x.zip", "sha256": "abc"}]
    with pytest.raises(ConfigError, match=r"dataset\.sources\.0\.sha256"):
        parse_config(data)


def test_group_rule_regex_needs_a_group() -> None:
    data = _minimal()
    data["dataset"]["group_rule"] = "^P\\d+"
    with pytest.raises(ConfigError, match=r"dataset\.group_rule"):
        parse_config(data)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


# --------------------------------------------------------------------------------- binary class names
def test_class_names_default_to_the_single_source_class_per_label() -> None:
    assert parse_config(_minimal()).dataset.class_names == ["A", "B"]
    data = _minimal()
    data["dataset"]["class_names"] = ["healthy", "sick"]
    assert parse_config(data).dataset.class_names == ["healthy", "sick"]


def test_two_source_classes_on_one_label_need_class_names(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"name": "t", "labels": MELANOMA_LIKE}}))
    with pytest.raises(ConfigError, match=r"p\.yaml: dataset\.class_names: .*required: label 0 has nevus, "
                                          r"seborrheic_keratosis"):
        load_config(path)
    named = {"dataset": {"name": "t", "labels": MELANOMA_LIKE, "class_names": ["benign", "melanoma"]}}
    assert parse_config(named).dataset.class_names == ["benign", "melanoma"]


def test_catalog_entry_with_two_source_classes_and_no_names_is_named(tmp_path: Path) -> None:
    entry = _entry()
    entry["dataset"].update(labels=MELANOMA_LIKE, class_names=[])  # []: take them from the labels
    with pytest.raises(ConfigError, match=r"datasets/d\.yaml: dataset\.class_names: .*label 0 has nevus"):
        load_config(_checkout(tmp_path, {"d": entry}), "d")


@pytest.mark.parametrize("names", [["benign"], ["a", "b", "c"], ["same", "same"], [" ", "b"], {0: "a", 1: "b"}])
def test_bad_class_names_are_named(names: object) -> None:
    data = _minimal()
    data["dataset"]["class_names"] = names
    with pytest.raises(ConfigError, match=r"dataset\.class_names"):
        parse_config(data)


# ----------------------------------------------------------------------------------- model selection
def test_select_on_defaults_to_the_class_weighted_val_loss_and_is_checked() -> None:
    assert parse_config(_minimal()).train.select_on == "val_loss"
    assert parse_config(_minimal(train={"select_on": "val_auc"})).train.select_on == "val_auc"
    with pytest.raises(ConfigError, match=r"train\.select_on"):
        parse_config(_minimal(train={"select_on": "train_accuracy"}))

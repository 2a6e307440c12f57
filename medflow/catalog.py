"""The dataset catalog: ``datasets/<name>.yaml`` is the one place a dataset is described.

Each catalog file holds the dataset's ``dataset:`` block (sources, labels, class_names, group_rule,
channels, allow_flips, card) and one section per stage of params.yaml (``download:`` ... ``retrain:``) with
that dataset's overrides of params.yaml's shared defaults. Every section must be present, even empty
(``resize: {}``): each dvc.yaml stage lists its section of ``datasets/${item}.yaml`` as a parameter, and
DVC fails a stage whose listed key is missing. The dataset's name is the file stem.

params.yaml's ``datasets:`` list names the datasets the checkout builds (dvc.yaml's ``foreach``); it must
match the catalog folder, so a dataset is never described but silently not built, or the other way round.

This module reads and checks the catalog's structure; :func:`medflow.config.load_config` merges an entry
with params.yaml and validates the result into the typed ``Config``.

Names are checked before any shell sees them: dvc.yaml pastes ``${item}`` (each name of ``datasets:``) into
the stage commands DVC runs through a shell, and DVC's templating cannot check a value. :func:`preflight`
checks the list and the catalog's file names; the download stage runs it (``medflow preflight``) as its first
command, before the command that holds the name, and the flows and ``medflow serve`` run it before they
call DVC (SECURITY.md).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medflow.errors import ConfigError

log = logging.getLogger(__name__)

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML was built with it


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` through libyaml where PyYAML has it: the same documents, about 10x faster (dvc.yaml:
    65 -> 6 ms, read by every stage command). Raises yaml.YAMLError like safe_load."""
    return yaml.load(text, Loader=_LOADER)  # a safe loader: plain data only

CATALOG_DIR = "datasets"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# params.yaml's stage sections: each catalog file overrides them (and must hold each one, even empty).
STAGE_SECTIONS = ("download", "extract", "filter", "resize", "split", "validate", "train", "evaluate", "crossval",
                  "retrain")
# params.yaml's sections that a catalog file may override but need not hold (no dvc.yaml stage lists them).
OPTIONAL_SECTIONS = ("compute",)
# dataset keys that dvc.yaml stages list as params: DVC fails a stage whose listed key is missing, so a
# catalog file states each one even where the config has a default.
DATASET_KEYS = ("sources", "labels", "class_names", "group_rule", "channels", "allow_flips", "card")


@dataclass(frozen=True)
class CatalogEntry:
    """One dataset of the catalog: its ``dataset:`` block and its overrides of params.yaml's sections."""

    name: str
    path: Path
    dataset: dict[str, Any]
    overrides: dict[str, dict[str, Any]]


def check_name(name: str, where: str = "dataset name") -> str:
    """Return ``name`` if it can name a dataset (it becomes a path segment and a DVC stage key), else raise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{where}: {name!r} is not a dataset name (lower-case letters, digits, '_' and '-', "
                          f"starting with a letter or digit)")
    return name


def preflight(params: Path) -> list[str]:
    """The datasets of ``params`` (its ``datasets:`` list), once every name there and in the catalog beside it
    is a dataset name and the two match: run before DVC sees the names.

    Raises ConfigError naming the file and the offending entry (``params.yaml: datasets.1: 'x;id' is not a
    dataset name ...``), then validates every dataset's resolved config (:func:`check_configs`).
    """
    params = Path(params)
    try:
        data = load_yaml(params.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{params}: params file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{params}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{params}: expected a mapping at the top level, got {type(data).__name__}")
    names = listed_datasets(data, params)
    check_configs(params, names)
    return names


def check_configs(params: Path, names: list[str]) -> None:
    """Validate the resolved config of every dataset in ``names`` (:func:`medflow.config.load_config`); one
    ConfigError listing every bad key of every dataset (file, key, message, value).

    The download stage runs this first on every ``dvc repro``: DVC deletes a stage's outputs before its
    command reads a bad value, so a typo in ``train:`` must stop the run here, before DVC reaches the train
    stage."""
    from medflow.config import load_config  # config imports this module

    problems: dict[str, list[str]] = {}  # error line -> the datasets it holds for (a params.yaml typo: all)
    for name in names:
        try:
            load_config(params, name)
        except ConfigError as e:
            for line in str(e).splitlines():
                problems.setdefault(line, []).append(name)
    if problems:
        lines = [f"{line} [dataset(s) {', '.join(found)}]" for line, found in problems.items()]
        raise ConfigError("\n".join(lines) + "\nfix the value(s) above: nothing was run, no output removed")


def catalog_dir(params: Path) -> Path:
    """The catalog folder of a checkout: ``datasets/`` beside its params.yaml."""
    return Path(params).parent / CATALOG_DIR


def catalog_names(folder: Path) -> list[str]:
    """Names of the datasets described in ``folder`` (``<name>.yaml`` files), sorted."""
    return sorted(path.stem for path in Path(folder).glob("*.yaml"))


def listed_datasets(params_data: dict[str, Any], params: Path) -> list[str]:
    """params.yaml's ``datasets:`` list, checked against the catalog folder beside it.

    Raises ConfigError when the list is missing or malformed, holds or the catalog holds a name that is not a
    dataset name, names a dataset without a catalog file, or leaves out one the catalog describes.
    """
    listed = params_data.get("datasets")
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"{params}: datasets: expected a list of dataset names (the files of "
                          f"{catalog_dir(params)}/), got {listed!r}")
    for i, name in enumerate(listed):
        check_name(name, f"{params}: datasets.{i}")
    if len(set(listed)) != len(listed):
        raise ConfigError(f"{params}: datasets: names appear twice: {listed}")
    described = catalog_names(catalog_dir(params))
    for name in described:
        check_name(name, f"{catalog_dir(params) / name}.yaml: file name")
    missing = [n for n in listed if n not in described]
    if missing:
        raise ConfigError(f"{params}: datasets: no catalog file for {', '.join(missing)} "
                          f"(expected {', '.join(str(catalog_dir(params) / f'{n}.yaml') for n in missing)})")
    unlisted = [n for n in described if n not in listed]
    if unlisted:
        raise ConfigError(f"{params}: datasets: {', '.join(unlisted)} described in {catalog_dir(params)}/ but "
                          "not listed: add it to the list (or remove its file)")
    return list(listed)


def read_entry(folder: Path, name: str) -> CatalogEntry:
    """Read ``folder/<name>.yaml`` and check its structure (not its values: ``load_config`` validates those).

    Raises ConfigError naming the file for an unknown dataset, invalid YAML, a missing or malformed section,
    an unknown top-level key, or a ``dataset.name`` that differs from the file stem.
    """
    check_name(name)
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(catalog_names(folder)) or "none"
        raise ConfigError(f"unknown dataset {name!r}: no {path} (the catalog {folder}/ describes: {known})")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with dataset: and the stage sections, got "
                          f"{type(data).__name__}")
    return CatalogEntry(name=name, path=path, dataset=_dataset_block(path, data, name),
                        overrides=_stage_sections(path, data))


def _dataset_block(path: Path, data: dict[str, Any], name: str) -> dict[str, Any]:
    block = data.get("dataset")
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: dataset: missing, or not a mapping ({', '.join(DATASET_KEYS)})")
    missing = [k for k in DATASET_KEYS if k not in block]
    if missing:
        raise ConfigError(f"{path}: dataset.{missing[0]}: missing (every one of {', '.join(DATASET_KEYS)} must be "
                          "stated: dvc.yaml stages list them as params, and DVC fails on a missing one)")
    if "name" in block and block["name"] != name:
        raise ConfigError(f"{path}: dataset.name: {block['name']!r} differs from the file name; the name is the "
                          f"file stem ({name!r}): drop the key or rename the file")
    return {**block, "name": name}


def _stage_sections(path: Path, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    unknown = [k for k in data if k != "dataset" and k not in (*STAGE_SECTIONS, *OPTIONAL_SECTIONS)]
    if unknown:
        raise ConfigError(f"{path}: {', '.join(map(str, unknown))}: unknown key (expected dataset, the stage "
                          f"sections {', '.join(STAGE_SECTIONS)} and optionally {', '.join(OPTIONAL_SECTIONS)})")
    missing = [s for s in STAGE_SECTIONS if s not in data]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {', '.join(missing)}: every stage section must be present, "
                          f"even empty ({missing[0]}: {{}}), because each dvc.yaml stage lists it as a parameter")
    sections = {}
    for section in (s for s in (*STAGE_SECTIONS, *OPTIONAL_SECTIONS) if s in data):
        values = data[section]
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section}: expected a mapping of overrides ({section}: {{}} for none), "
                              f"got {values!r}")
        sections[section] = values
    return sections

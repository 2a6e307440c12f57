from pathlib import Path

import pytest

from medflow.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def _minimal(**overrides: object) -> dict:
    data: dict = {"dataset": {"name": "t", "sources": ["x.zip"], "labels": {"A": 0, "B": 1}}}
    data.update(overrides)
    return data


def test_project_params_load() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.dataset.name == "pneumonia"
    assert cfg.dataset.channels == 1 and not cfg.dataset.allow_flips
    assert cfg.resize.size == 224
    assert cfg.split.train + cfg.split.val + cfg.split.test == pytest.approx(1.0)


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


@pytest.mark.parametrize("preset", sorted((ROOT / "datasets").glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_parse(preset: Path) -> None:
    import yaml

    cfg = parse_config(yaml.safe_load(preset.read_text()), str(preset))
    assert cfg.dataset.name == preset.stem


def test_pneumonia_preset_matches_params() -> None:
    import yaml

    preset = yaml.safe_load((ROOT / "datasets" / "pneumonia.yaml").read_text())["dataset"]
    assert preset == yaml.safe_load((ROOT / "params.yaml").read_text())["dataset"]

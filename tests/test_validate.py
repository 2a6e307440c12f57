"""Validate step: the GX suite passes a good split and names the offending rows of every kind of bad one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset

from medflow.config import GROUP_RULES, Config, parse_config
from medflow.data import shortcuts
from medflow.data.expectations import (
    Table,
    _group_expectations,
    _raised,
    outcomes,
    split_table,
    splits_per_group,
    target_shares,
    validate_tables,
)
from medflow.data.manifest import build_manifest
from medflow.data.shortcuts import check_shortcuts, mode_facts
from medflow.data.split import assign_splits
from medflow.errors import StepError
from medflow.imaging.store import save_array
from medflow.io import read_csv, write_csv
from medflow.schema import SPLIT_COLUMNS
from tasks.validate import run

SHARED_DATA = Path(os.environ.get("MEDFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SIZE = 8


def _cfg(**split: object) -> Config:
    return parse_config({"dataset": {"name": "t", "labels": {"NORMAL": 0, "PNEUMONIA": 1},
                                     "group_rule": "kermany"},
                         "resize": {"size": SIZE}, "split": split})


def _good_split(n: int = 100) -> pd.DataFrame:
    """70/15/15 split by hand: patients of 5 images, never across splits; 1 positive image in 4."""
    rows = []
    for i in range(n):
        split = "train" if i < 0.7 * n else "val" if i < 0.85 * n else "test"
        label = int(i % 4 == 0)
        cls = ["NORMAL", "PNEUMONIA"][label]
        path = f"data/raw/t/{cls}/person{i // 5}_img_{i}.jpeg"
        sha = hashlib.sha256(path.encode()).hexdigest()
        rows.append({"path": path, "relpath": path.split("/", 3)[-1], "root": "data/raw/t", "class_name": cls,
                     "label": label, "group": f"person{i // 5}", "source_split": "", "sha256": sha,
                     "bytes": 100, "width": 64, "height": 64, "mode": "L", "format": "JPEG",
                     "phash": "0" * 16, "dup_group": sha, "row": i, "split_group": f"person{i // 5}",
                     "split": split})
    return pd.DataFrame(rows, columns=SPLIT_COLUMNS)


def _files(tmp_path: Path, df: pd.DataFrame, images: np.ndarray | None = None) -> dict[str, Path]:
    paths = {"split": tmp_path / "split.csv", "images": tmp_path / "images",
             "result": tmp_path / "validation.json", "summary": tmp_path / "validation.md"}
    write_csv(paths["split"], df)
    save_array(paths["images"], np.zeros((len(df), SIZE, SIZE, 1), np.uint8) if images is None else images)
    return paths


def _fails(tmp_path: Path, df: pd.DataFrame, images: np.ndarray | None = None, cfg: Config | None = None,
           ) -> tuple[str, dict, str]:
    """Run on bad input: StepError message, result JSON, summary Markdown (both must be written)."""
    paths = _files(tmp_path, df, images)
    with pytest.raises(StepError) as err:
        run(cfg or _cfg(), **paths)
    result = json.loads(paths["result"].read_text())
    assert result["success"] is False
    return str(err.value), result, paths["summary"].read_text()


# ------------------------------------------------------------------------------ one split per group
def _group_outcome(df: pd.DataFrame, column: str = "group"):  # noqa: ANN202
    tables = [Table("patients", splits_per_group(df, column), _group_expectations("one split"), "where")]
    (out,) = outcomes(tables, validate_tables(tables))
    return out


def test_group_table_counts_splits_and_names_first_paths() -> None:
    df = pd.DataFrame({"path": ["a0", "b0", "a1", "a2", "b1"], "group": ["a", "b", "a", "a", "b"],
                       "split": ["train", "val", "test", "train", "val"]})
    table = splits_per_group(df, "group")
    assert table.to_dict(orient="list") == {"value": ["a", "b"], "n_splits": [2, 1],
                                            "where": ["a (train: a0; test: a1)", "b"]}


def test_group_expectation_fails_on_a_leak_naming_the_group_and_passes_without() -> None:
    df = pd.DataFrame({"path": ["a0", "a1", "b0", "b1"], "group": ["a", "a", "b", "b"],
                       "split": ["train", "test", "val", "val"]})
    leak, ok = _group_outcome(df), _group_outcome(df.assign(split="val"))
    assert not leak.passed and leak.detail == ""  # failed on the data, not on an exception
    assert leak.unexpected_count == 1 and leak.offending == ["a (train: a0; test: a1)"]
    assert ok.passed and ok.unexpected_count == 0


def test_group_expectation_counts_a_null_as_a_split() -> None:
    df = pd.DataFrame({"path": ["a0", "a1"], "group": ["a", "a"], "split": ["train", None]})
    out = _group_outcome(df)
    assert not out.passed and out.offending == ["a (train: a0; <null>: a1)"]


def test_group_expectation_fails_without_the_column() -> None:
    df = pd.DataFrame({"path": ["a0"], "split": ["train"]})
    out = _group_outcome(df, "dup_group")
    assert not out.passed and out.offending == ["the split manifest has no dup_group column"]


def test_an_expectation_that_raises_is_a_failure() -> None:
    df = pd.DataFrame({"path": ["a0"], "group": ["a"]})
    exp = [gxe.ExpectColumnValuesToBeInSet(column="no_such_column", value_set=[1])]
    tables = [Table("t", df, exp, "path")]
    (out,) = outcomes(tables, validate_tables(tables))
    assert not out.passed and out.detail.startswith("raised:") and "no_such_column" in out.detail


def test_raised_reads_flat_and_nested_exception_info() -> None:
    assert _raised({"raised_exception": False, "exception_message": None}) is None
    assert _raised({"raised_exception": True, "exception_message": "boom"}) == "boom"
    assert _raised({"metric-id": {"raised_exception": True, "exception_message": "deep"}}) == "deep"
    assert _raised(None) is None


# ------------------------------------------------------------------------------------------- run
def test_good_split_passes_and_writes_both_files(tmp_path: Path) -> None:
    paths = _files(tmp_path, _good_split())
    summary = run(_cfg(), **paths)
    assert summary["failed"] == 0 and summary["rows"] == 100
    assert summary["splits"]["val"] == {"n": 15, "n_pos": 4, "n_neg": 11}
    result = json.loads(paths["result"].read_text())
    assert result["success"] is True and result["failed"] == []
    assert set(result["suites"]) == {"manifest", "patients", "near_duplicates", "split_units", "splits", "images"}
    n_results = sum(len(s["results"]) for s in result["suites"].values())
    assert n_results == summary["expectations"] > 20
    text = paths["summary"].read_text()
    assert text.startswith("# Validation PASSED") and "**FAIL**" not in text
    assert "no patient in two splits" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_leaking_patient_fails_naming_its_paths(tmp_path: Path) -> None:
    df = _good_split()
    df.loc[0, "split"] = "test"  # person0: image 0 in test, images 1-4 in train
    message, result, md = _fails(tmp_path, df)
    where = "person0 (test: data/raw/t/PNEUMONIA/person0_img_0.jpeg; train: data/raw/t/NORMAL/person0_img_1.jpeg)"
    assert "no patient in two splits" in message and where in message
    assert "person1" not in message
    assert "patients: expect_column_values_to_be_in_set(column=n_splits, value_set=[1])" in result["failed"]
    assert "**FAIL**" in md and where in md


def test_near_duplicate_group_across_splits_fails(tmp_path: Path) -> None:
    df = _good_split()
    df.loc[df["path"].str.endswith("_img_3.jpeg"), "dup_group"] = "shared"
    df.loc[df["path"].str.endswith("_img_90.jpeg"), "dup_group"] = "shared"  # test patient
    message, _, _ = _fails(tmp_path, df)
    assert "no near-duplicate set in two splits" in message
    assert ("shared (train: data/raw/t/NORMAL/person0_img_3.jpeg; test: data/raw/t/NORMAL/person18_img_90.jpeg)"
            in message)


def test_duplicate_sha256_fails(tmp_path: Path) -> None:
    df = _good_split()
    df.loc[11, "sha256"] = df.loc[10, "sha256"]
    message, _, _ = _fails(tmp_path, df)
    assert "sha256 is unique" in message
    assert df.loc[10, "path"] in message and df.loc[11, "path"] in message


@pytest.mark.parametrize(("images", "wrong"), [
    (np.zeros((100, SIZE, SIZE + 1, 1), np.uint8), "width"),
    (np.zeros((100, SIZE, SIZE, 3), np.uint8), "channels"),
])  # (a store holds uint8 (N, H, W, C) only: its reader refuses an index that says otherwise)
def test_wrong_image_shape_fails(tmp_path: Path, images: np.ndarray, wrong: str) -> None:
    message, _, _ = _fails(tmp_path, _good_split(), images)
    assert f"images {wrong} ==" in message


def test_fewer_images_than_rows_fails(tmp_path: Path) -> None:
    message, _, _ = _fails(tmp_path, _good_split(), np.zeros((99, SIZE, SIZE, 1), np.uint8))
    assert "images n == 100" in message
    assert "row indexes the image store" in message and "person19_img_99.jpeg" in message


def test_missing_class_in_a_split_fails(tmp_path: Path) -> None:
    df = _good_split()
    df.loc[df["split"] == "val", "label"] = 0
    message, _, md = _fails(tmp_path, df)
    assert "positives in each split" in message and ": val" in message
    assert "| val | 15 |" in md


def test_split_share_out_of_tolerance_fails(tmp_path: Path) -> None:
    df = _good_split()
    df.loc[df["group"].isin(["person17", "person18"]), "split"] = "train"  # test 15 -> 5 rows
    message, _, _ = _fails(tmp_path, df)
    assert "split share within 0.05" in message and "test" in message


def test_missing_column_fails(tmp_path: Path) -> None:
    message, _, md = _fails(tmp_path, _good_split().drop(columns=["dup_group"]))
    assert "columns are exactly the split manifest schema" in message
    assert "every row has a dup_group" in message  # the expectations that raised count as failures
    assert "raised" in md


def test_bad_label_fails(tmp_path: Path) -> None:
    df = _good_split()
    df.loc[7, "label"] = 2
    message, _, _ = _fails(tmp_path, df)
    assert "labels are 0 or 1" in message and df.loc[7, "path"] in message


def test_keep_source_test_uses_the_source_test_share() -> None:
    df = _good_split()
    df["split"] = ["test"] * 40 + ["train"] * 51 + ["val"] * 9
    shares = target_shares(df["split"], _cfg(keep_source_test=True))
    assert shares["test"] == pytest.approx(0.40)
    assert shares["train"] == pytest.approx(0.60 * 0.70 / 0.85)
    table = split_table(df, _cfg(keep_source_test=True)).set_index("split")
    assert (table["share_deviation"].abs() <= 0.05).all()
    # auto: the source's share where split.csv says the source had a test folder, else the ratios
    assert target_shares(df["split"], _cfg(), pd.Series(["test"] * 40 + ["train"] * 60)) == shares
    assert target_shares(df["split"], _cfg(), pd.Series(["train"] * 100))["test"] == pytest.approx(0.15)


def test_missing_inputs_name_the_file(tmp_path: Path) -> None:
    paths = _files(tmp_path, _good_split())
    with pytest.raises(StepError, match="images.missing/index.json: image store index not found"):
        run(_cfg(), **{**paths, "images": tmp_path / "images.missing"})
    with pytest.raises(StepError, match="split.csv"):
        run(_cfg(), **{**paths, "split": tmp_path / "split.csv.missing"})
    (paths["images"] / "index.json").write_bytes(b"not an index")
    with pytest.raises(StepError, match="index.json: not a readable image store index"):
        run(_cfg(), **paths)


# ----------------------------------------------------------------------------------- real data
def _kermany_rows(folder: Path, cfg: Config) -> pd.DataFrame:
    rows = []
    for cls, label in cfg.dataset.labels.items():
        for f in sorted((folder / cls).iterdir()):
            m = cfg.dataset.group_pattern.search(f.name)
            assert m, f.name
            path = str(f)
            sha = hashlib.sha256(path.encode()).hexdigest()
            rows.append({"path": path, "relpath": f"{cls}/{f.name}", "root": str(folder), "class_name": cls,
                         "label": label, "group": m.group(1), "source_split": "train", "sha256": sha,
                         "bytes": 1, "width": 1, "height": 1, "mode": "L", "format": "JPEG",
                         "phash": "0" * 16, "dup_group": sha})
    return pd.DataFrame(rows)


@pytest.mark.integration
def test_real_kermany_names_split_without_leaks_and_validate(tmp_path: Path) -> None:
    folder = SHARED_DATA / "chest_xray"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    cfg = _cfg()
    assert cfg.dataset.group_pattern.pattern == GROUP_RULES["kermany"]
    split = assign_splits(_kermany_rows(folder, cfg), cfg.split)
    per_patient = split.groupby("group")["split"].nunique()
    assert per_patient.max() == 1 and per_patient.size < len(split)  # patients repeat, never across splits
    paths = _files(tmp_path, split)
    start = time.perf_counter()
    summary = run(cfg, **paths)
    elapsed = time.perf_counter() - start
    print(f"\nkermany split {summary['splits']}; {per_patient.size} patients; "
          f"validate {elapsed:.2f} s (GX {summary['seconds']:.2f} s)")
    assert summary["failed"] == 0
    assert re.search(r"# Validation PASSED", paths["summary"].read_text())
    assert read_csv(paths["split"])["row"].tolist() == list(range(len(split)))


# ------------------------------------------------------------------------------------ shortcut check
def _metadata_split(n: int = 200, seed: int = 3, leak: str | None = None) -> pd.DataFrame:
    """A good split whose file metadata is drawn independently of the label, as in a well-made dataset;
    ``leak`` names a column made to follow the label (format: positives PNG, negatives JPEG)."""
    rng = np.random.default_rng(seed)
    df = _good_split(n)
    df["format"] = rng.choice(["PNG", "JPEG"], n)
    df["mode"] = rng.choice(["L", "RGB", "RGBA"], n)
    df["width"] = rng.integers(200, 900, n)
    df["height"] = rng.integers(200, 900, n)
    df["bytes"] = rng.integers(20_000, 400_000, n)
    df["root"] = rng.choice(["data/inbox/t/a", "data/inbox/t/b"], n)
    if leak == "format":
        df["format"] = np.where(df["label"] == 1, "PNG", "JPEG")
    return df


def test_mode_facts_give_channels_and_bit_depth() -> None:
    assert mode_facts("L") == (1, 8) and mode_facts("RGB") == (3, 8) and mode_facts("RGBA") == (4, 8)
    assert mode_facts("I;16") == (1, 16) and mode_facts("1") == (1, 1) and mode_facts("LA") == (2, 8)
    assert all(np.isnan(mode_facts(m)).all() for m in (None, "", "XYZ", float("nan")))


def test_balanced_metadata_is_not_flagged(tmp_path: Path) -> None:
    paths = _files(tmp_path, _metadata_split())
    summary = run(_cfg(), **paths)
    shortcut = summary["shortcut"]
    assert shortcut["auc"] is not None and shortcut["auc"] < 0.62 and not shortcut["flagged"], shortcut
    assert max(shortcut["feature_auc"].values()) < 0.62 and shortcut["folds"] == 5
    md = paths["summary"].read_text()
    assert md.startswith("# Validation PASSED") and "WARNING" not in md and "## Shortcut check" in md
    result = json.loads(paths["result"].read_text())
    assert result["success"] is True and result["shortcut"]["auc"] == shortcut["auc"]


def test_a_label_that_follows_the_format_is_flagged_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = _files(tmp_path, _metadata_split(leak="format"))
    with caplog.at_level("WARNING"):
        summary = run(_cfg(), **paths)  # fail_on_shortcut defaults to false: a warning
    shortcut = summary["shortcut"]
    assert shortcut["flagged"] and not shortcut["failed"] and shortcut["auc"] > 0.95
    assert shortcut["carriers"] == ["format"] and shortcut["feature_auc"]["format"] == 1.0
    assert "SHORTCUT" in caplog.text and "format 1.00" in caplog.text
    lines = paths["summary"].read_text().splitlines()
    assert lines[0] == "# Validation PASSED" and lines[2].startswith("> **WARNING: shortcut in the data.**")
    assert json.loads(paths["result"].read_text())["success"] is True


def test_fail_on_shortcut_fails_naming_the_features(tmp_path: Path) -> None:
    cfg = parse_config({**_cfg().model_dump(by_alias=True), "validate": {"fail_on_shortcut": True}})
    message, result, md = _fails(tmp_path, _metadata_split(leak="format"), cfg=cfg)
    assert "metadata alone predicts the label" in message and "features that carry it: format" in message
    assert result["shortcut"]["failed"] and any(f.startswith("shortcut check:") for f in result["failed"])
    assert md.startswith("# Validation FAILED (shortcut check)") and "validation FAILS" in md
    off = parse_config({**cfg.model_dump(by_alias=True), "validate": {"fail_on_shortcut": True,
                                                                      "shortcut_auc_max": 1.0}})
    (tmp_path / "off").mkdir()
    assert not run(off, **_files(tmp_path / "off", _metadata_split(leak="format")))["shortcut"]["flagged"]


def test_above_fit_max_the_classifier_sees_a_sample_of_whole_patients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FIT_MAX images the classifier is cross-validated on whole split units drawn at random, at most
    FIT_MAX images and one unit more; each feature's own AUC still sees every image, and a shortcut is still found."""
    df = _metadata_split(n=600, leak="format")
    full = check_shortcuts(df)
    monkeypatch.setattr(shortcuts, "FIT_MAX", 150)
    sampled = check_shortcuts(df)
    unit = df["split_group"].value_counts().max()
    assert full.fitted == 600 and 150 <= sampled.fitted <= 150 + unit and sampled.n == 600
    assert sampled.flagged and sampled.auc > 0.95 and sampled.feature_auc == full.feature_auc
    assert "on a sample of" in sampled.describe() and "on a sample of" not in full.describe()
    rows = shortcuts._fit_rows(df["split_group"].to_numpy(), df["label"].to_numpy(), 42)
    picked = df.iloc[rows]["split_group"].unique()
    assert len(rows) == sampled.fitted and df["split_group"].isin(picked).sum() == len(rows)  # whole units
    assert not check_shortcuts(_metadata_split(n=600)).flagged


def test_shortcut_check_is_skipped_without_enough_groups() -> None:
    df = _good_split(20).assign(split_group=lambda d: np.where(d["label"] == 1, "pos", d["split_group"]))
    check = check_shortcuts(df)
    assert check.auc is None and not check.flagged and "two groups per class" in check.skipped


def test_real_covid_ct_metadata_predicts_the_label(tmp_path: Path) -> None:
    """COVID-CT: 96 of 98 COVID images are PNG against 52 of 105 non-COVID (headers read, nothing decoded)."""
    folder = shared_dataset("covid_ct")
    cfg = parse_config({"dataset": {"name": "covid_ct", "labels": {"CT_NonCOVID": 0, "CT_COVID": 1},
                                    "group_rule": "covid_ct"}, "resize": {"size": SIZE}})
    manifest, _ = build_manifest([folder], cfg.dataset.labels, cfg.dataset.group_pattern, workers=2)
    assert len(manifest) == 203
    split = assign_splits(manifest.assign(phash="0" * 16, dup_group=manifest["sha256"]), cfg.split)
    paths = _files(tmp_path, split)
    shortcut = run(cfg, **paths)["shortcut"]
    print(f"\ncovid_ct shortcut check: {shortcut['message']}; {shortcut['feature_auc']}")
    assert shortcut["flagged"] and shortcut["auc"] > 0.80
    assert {"format", "mode"} <= set(shortcut["carriers"]) and shortcut["feature_auc"]["format"] > 0.70
    assert "WARNING: shortcut in the data" in paths["summary"].read_text()

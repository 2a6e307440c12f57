"""Split step: grouping (patients, near-duplicate sets), stratification, determinism, source test, extension."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset
from PIL import Image

import medflow.io
from medflow.config import Config, parse_config
from medflow.data.manifest import build_manifest
from medflow.data.split import (
    LINKS_SPLITS,
    QUARANTINE_COLUMNS,
    assign_splits,
    check_none_moved,
    extend_split,
    read_quarantine,
    source_test_summary,
    split_units,
)
from medflow.errors import StepError
from medflow.evaluation import report
from medflow.evaluation.pseudonym import pseudonymizer
from medflow.evaluation.results import Evaluation, Scores
from medflow.imaging import quality, verdict
from medflow.imaging.store import save_array
from medflow.io import read_csv, table_parts, write_csv, write_table
from medflow.patients import RUN_GAP, join_runs
from medflow.schema import CLEAN_COLUMNS, SPLIT_COLUMNS, SPLITS
from tasks import manifest, validate
from tasks.split import run

CLASSES = {0: "NORMAL", 1: "PNEUMONIA"}


def _cfg(**split: object) -> Config:
    return parse_config({"dataset": {"name": "t", "labels": {"NORMAL": 0, "PNEUMONIA": 1},
                                     "group_rule": "kermany"}, "split": split})


def _row(group: str, i: int, label: int, source_split: str = "", dup_group: str | None = None) -> dict:
    path = f"data/raw/t/{CLASSES[label]}/{group}_img_{i}.jpeg"
    sha = hashlib.sha256(path.encode()).hexdigest()
    return {"path": path, "relpath": path.split("/", 3)[-1], "root": "data/raw/t",
            "class_name": CLASSES[label], "label": label, "group": group, "source_split": source_split,
            "sha256": sha, "bytes": 1000, "width": 64, "height": 64, "mode": "L", "format": "JPEG",
            "phash": "0" * 16, "dup_group": dup_group or sha}


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=CLEAN_COLUMNS)


def _skewed(n_rows: int = 600, seed: int = 0, tail: float = 1.8) -> pd.DataFrame:
    """Patients with 1..40 images (Zipf, heavier tail for smaller ``tail``), one class each, about 1:3."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    p = 0
    while len(rows) < n_rows:
        size = int(min(40, rng.zipf(tail)))
        n_pos = sum(r["label"] for r in rows)
        label = int(n_pos + size / 2 < 0.25 * (len(rows) + size) or rng.random() < 0.05)
        rows += [_row(f"person{p}", i, label) for i in range(size)]
        p += 1
    return _frame(rows[:n_rows])


def _leaks(split: pd.DataFrame, col: str) -> list[str]:
    per = split.groupby(col)["split"].nunique()
    return per[per > 1].index.tolist()


# ------------------------------------------------------------------------------------------ grouping
def test_no_patient_in_two_splits() -> None:
    df = _frame([_row(f"person{p}", i, p % 2) for p in range(40) for i in range(1 + p % 5)])
    split = assign_splits(df, _cfg().split)
    assert list(split.columns) == SPLIT_COLUMNS
    assert _leaks(split, "group") == []
    assert set(split["split"]) == set(SPLITS)
    assert split["row"].tolist() == list(range(len(df)))
    assert split["path"].tolist() == df["path"].tolist()  # same order as clean.csv: row = position


def test_near_duplicates_join_patients_into_one_unit() -> None:
    rows = [_row("person1", 0, 1), _row("person1", 1, 1, dup_group="d1"),
            _row("person2", 0, 1, dup_group="d1"), _row("person2", 1, 1, dup_group="d2"),
            _row("person3", 0, 1, dup_group="d2"),  # chained: 1 -d1- 2 -d2- 3
            _row("person4", 0, 0)]
    df = _frame(rows)
    units = split_units(df["group"], df["dup_group"])
    assert units.tolist() == ["person1"] * 5 + ["person4"]
    # many seeds: the joined unit never straddles splits
    for seed in range(20):
        split = assign_splits(df, _cfg(seed=seed).split)
        assert _leaks(split, "dup_group") == [] and _leaks(split, "group") == []
        assert split.loc[split["group"].isin(["person1", "person2", "person3"]), "split"].nunique() == 1
        assert split["split_group"].tolist() == units.tolist()


def test_union_find_is_order_independent() -> None:
    df = _frame([_row(f"p{k}", 0, 0, dup_group=f"d{k // 2}") for k in range(10)])
    forward = split_units(df["group"], df["dup_group"])
    rev = df.iloc[::-1]
    assert split_units(rev["group"], rev["dup_group"]).sort_index().tolist() == forward.tolist()
    assert forward.tolist() == ["p0", "p0", "p2", "p2", "p4", "p4", "p6", "p6", "p8", "p8"]


def test_units_need_every_id() -> None:
    groups = pd.Series(["p0", None, "p2"], dtype=object)
    with pytest.raises(ValueError, match="group and a dup_group"):
        split_units(groups, pd.Series(["d0", "d1", "d2"]))


# ---------------------------------------------------------------------------------------- proportions
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_shares_close_to_target_with_skewed_groups_and_imbalance(seed: int) -> None:
    df = _skewed(600, seed=seed)
    cfg = _cfg(seed=seed)
    split = assign_splits(df, cfg.split)
    assert _leaks(split, "group") == []
    overall_pos = df["label"].mean()
    assert 0.2 < overall_pos < 0.35  # the fixture really is imbalanced about 1:3
    for name, target in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        part = split[split["split"] == name]
        assert abs(len(part) / len(split) - target) <= 0.02, (name, len(part))
        assert abs(part["label"].mean() - overall_pos) <= 0.03, (name, part["label"].mean())


def test_deterministic_under_shuffled_input() -> None:
    df = _skewed(300)
    first = assign_splits(df, _cfg(seed=7).split)
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    second = assign_splits(shuffled, _cfg(seed=7).split)
    a = first.set_index("path")[["split", "split_group"]]
    b = second.set_index("path")[["split", "split_group"]].loc[a.index]
    pd.testing.assert_frame_equal(a, b)
    assert second["row"].tolist() == list(range(len(df)))
    assert second["path"].tolist() == shuffled["path"].tolist()


def test_different_seeds_differ() -> None:
    df = _skewed(300, tail=3.0)  # mostly 1-2 images per patient, as in Kermany
    a = assign_splits(df, _cfg(seed=1).split)["split"]
    b = assign_splits(df, _cfg(seed=2).split)["split"]
    # two independent 70/15/15 draws disagree on about 46% of the images
    assert (a != b).mean() > 0.25


# ----------------------------------------------------------------------------------- source test split
def _with_source_test(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    groups = sorted(out["group"].unique())
    test_groups = set(groups[::5])
    out["source_split"] = np.where(out["group"].isin(test_groups), "test", "train")
    return out


def test_keep_source_test_keeps_every_source_test_row_in_test() -> None:
    df = _with_source_test(_skewed(400))
    split = assign_splits(df, _cfg(keep_source_test=True).split)
    src_test = split["source_split"] == "test"
    assert (split.loc[src_test, "split"] == "test").all()
    assert (split.loc[~src_test, "split"] != "test").all()
    rest = split[~src_test]
    val_share = (rest["split"] == "val").mean()
    assert abs(val_share - 0.15 / 0.85) <= 0.03
    assert _leaks(split, "group") == []


def test_keep_source_test_pulls_whole_unit_into_test_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    df = _frame([_row("person1", 0, 1, "test"), _row("person1", 1, 1, "train"),
                 _row("person2", 0, 1, "train", dup_group="d"), _row("person3", 0, 1, "test", dup_group="d")]
                + [_row(f"person{p}", 0, p % 2, "train") for p in range(10, 30)])
    with caplog.at_level(logging.WARNING, logger="medflow.data.split"):
        split = assign_splits(df, _cfg(keep_source_test=True).split)
    by_group = split.groupby("group")["split"].first()
    assert by_group[["person1", "person2", "person3"]].tolist() == ["test"] * 3
    assert "2 rows outside the source test set" in caplog.text


def test_auto_keeps_a_source_test_split_where_there_is_one_and_says_so() -> None:
    df = _with_source_test(_skewed(400))
    kept = assign_splits(df, _cfg().split)  # the default, keep_source_test: auto
    assert _cfg().split.keep_source_test == "auto"
    pd.testing.assert_frame_equal(kept, assign_splits(df, _cfg(keep_source_test=True).split))
    summary = source_test_summary(kept, _cfg().split)
    assert summary["kept"] is True and summary["source_test_images"] == int((df["source_split"] == "test").sum())
    ignored = assign_splits(df, _cfg(keep_source_test=False).split)
    assert (ignored.loc[ignored["source_split"] == "test", "split"] != "test").any()
    assert "ignores the source's test folder" in source_test_summary(ignored, _cfg(keep_source_test=False).split)["how"]
    plain = _skewed(400)  # no test folder: carved by the ratios
    pd.testing.assert_frame_equal(assign_splits(plain, _cfg().split),
                                  assign_splits(plain, _cfg(keep_source_test=False).split))
    assert source_test_summary(assign_splits(plain, _cfg().split), _cfg().split) == {
        "kept": False, "source_test_images": 0, "moved_into_test": 0,
        "how": "carved by split.test (the source has no test folder)"}


def test_keep_source_test_without_source_test_rows_fails() -> None:
    df = _skewed(50)
    with pytest.raises(StepError, match=r"split\.keep_source_test"):
        assign_splits(df, _cfg(keep_source_test=True).split)


# ------------------------------------------------------------------------------------------ extension
def test_extend_split_keeps_old_assignments_and_places_new_units() -> None:
    old_df = _skewed(300, seed=5)
    previous = assign_splits(old_df, _cfg(seed=5).split)
    new_rows = _frame([_row(f"new{p}", i, p % 4 == 0) for p in range(60) for i in range(2)]
                      + [_row("person0", 99, int(old_df.loc[0, "label"]))])  # a new image of an old patient
    combined = pd.concat([old_df, new_rows], ignore_index=True)
    extended, quarantined = extend_split(previous, combined, _cfg(seed=5).split)
    assert quarantined.empty and list(quarantined.columns) == QUARANTINE_COLUMNS
    assert extended["row"].tolist() == list(range(len(combined)))
    old_paths = previous.set_index("path")["split"]
    assert (extended.set_index("path").loc[old_paths.index, "split"] == old_paths).all()
    person0 = extended[extended["group"] == "person0"]["split"]
    assert person0.nunique() == 1 and person0.iloc[0] == old_paths.iloc[0]
    new = extended[extended["group"].str.startswith("new")]
    assert set(new["split"]) == set(SPLITS)  # new units fill every split
    assert _leaks(extended, "group") == []
    shares = extended["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.70) <= 0.03


def _bridged(n: int = 30) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str, str]:
    """An old split of ``n`` one-image patients and two new images, one of a train and one of a test patient,
    near-duplicates of each other (one shared dup_group): the unit they form spans two previous splits."""
    df = _frame([_row(f"person{p}", 0, p % 2) for p in range(n)])
    previous = assign_splits(df, _cfg().split)
    by_split = previous.groupby("split")["group"].first()
    train_patient, test_patient = by_split["train"], by_split["test"]
    bridge = _frame([_row(train_patient, 1, 0, dup_group="bridge"),
                     _row(test_patient, 1, 0, dup_group="bridge")])
    return df, previous, bridge, train_patient, test_patient


def test_extend_split_quarantines_new_images_linking_units_of_different_splits() -> None:
    df, previous, bridge, train_patient, test_patient = _bridged()
    extended, quarantined = extend_split(previous, pd.concat([df, bridge], ignore_index=True), _cfg().split)
    assert extended.drop(columns="split_group").equals(previous.drop(columns="split_group"))  # nothing moved
    assert quarantined["path"].tolist() == bridge["path"].tolist()
    assert (quarantined["reason"] == LINKS_SPLITS).all()
    assert quarantined["row"].tolist() == [len(df), len(df) + 1]  # their rows in the image store, in no split
    old_train, old_test = (previous.loc[previous["group"] == g, "path"].item() for g in (train_patient, test_patient))
    for detail, links in zip(quarantined["detail"], quarantined["links"], strict=True):
        assert f"test: {old_test}" in detail and f"train: {old_train}" in detail  # the images it links, per split
        assert set(links.split(";")) == {old_train, old_test}
    assert _leaks(extended, "group") == [] and _leaks(extended, "dup_group") == []


def test_extend_split_keeps_old_ids_when_a_new_image_chains_near_duplicate_sets_of_two_splits() -> None:
    """The filter's near-duplicate groups are transitive: a new image close to a train image and to a test
    image puts both old images in its group. Quarantining it leaves them their previous group."""
    df, previous, _, train_patient, test_patient = _bridged()
    grown = pd.concat([df, _frame([_row("newcomer", 0, 1, dup_group="chain")])], ignore_index=True)
    grown.loc[grown["group"].isin([train_patient, test_patient]), "dup_group"] = "chain"
    extended, quarantined = extend_split(previous, grown, _cfg().split)
    assert quarantined["path"].tolist() == grown["path"].tail(1).tolist()
    assert "newcomer" not in set(extended["group"])
    assert extended.drop(columns="split_group").equals(previous.drop(columns="split_group"))  # old dup_groups back
    assert _leaks(extended, "dup_group") == []


def test_extend_split_rejects_a_leaking_previous_split() -> None:
    df = _frame([_row("person1", i, 0) for i in range(2)] + [_row("person2", 0, 1)])
    previous = df.assign(row=range(3), split_group="x", split=["train", "test", "val"])
    with pytest.raises(StepError, match="person1"):
        extend_split(previous, df, _cfg().split)


# ---------------------------------------------------------------------------------------- bad inputs
def test_missing_column_fails() -> None:
    with pytest.raises(StepError, match="dup_group"):
        assign_splits(_skewed(20).drop(columns=["dup_group"]), _cfg().split)


def test_bad_label_fails() -> None:
    df = _skewed(20)
    df.loc[3, "label"] = 2
    with pytest.raises(StepError, match="label must be 0 or 1"):
        assign_splits(df, _cfg().split)


def test_missing_group_fails() -> None:
    df = _skewed(20)
    df["group"] = df["group"].astype(object)
    df.loc[4, "group"] = None
    with pytest.raises(StepError, match="no 'group'"):
        assign_splits(df, _cfg().split)


def test_empty_manifest_fails() -> None:
    with pytest.raises(StepError, match="no rows"):
        assign_splits(_frame([]), _cfg().split)


# ---------------------------------------------------------------------------------------------- run
def test_run_writes_split_csv(tmp_path: Path) -> None:
    clean, out = tmp_path / "clean.csv", tmp_path / "split.csv"
    write_csv(clean, _skewed(120))
    summary = run(_cfg(), clean=clean, out=out, summary=tmp_path / "split.json")
    split = read_csv(out)
    assert list(split.columns) == SPLIT_COLUMNS
    assert summary["images"] == 120 == len(split)
    assert sum(summary["splits"][s]["images"] for s in SPLITS) == 120
    assert summary["splits"]["train"]["patients"] == split.loc[split["split"] == "train", "group"].nunique()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_run_missing_clean_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(StepError, match="clean.csv"):
        run(_cfg(), clean=tmp_path / "clean.csv", out=tmp_path / "split.csv", summary=tmp_path / "split.json")


def test_run_error_names_the_file(tmp_path: Path) -> None:
    clean = tmp_path / "clean.csv"
    write_csv(clean, _skewed(20))
    with pytest.raises(StepError, match=r"clean\.csv: .*keep_source_test"):
        run(_cfg(keep_source_test=True), clean=clean, out=tmp_path / "split.csv", summary=tmp_path / "split.json")
    assert not (tmp_path / "split.csv").exists()


def test_run_extends_its_previous_split_when_new_data_lands(tmp_path: Path) -> None:
    """Re-running on a grown manifest keeps every earlier assignment (a patient in test stays in test)."""
    clean, out, summary = tmp_path / "clean.csv", tmp_path / "split.csv", tmp_path / "split.json"
    full = _skewed(400, seed=3)
    old_groups = full["group"].unique()[: len(full["group"].unique()) * 3 // 4]
    write_csv(clean, full[full["group"].isin(old_groups)])
    run(_cfg(), clean=clean, out=out, summary=summary)
    before = read_csv(out).set_index("path")["split"]
    write_csv(clean, full)
    run(_cfg(), clean=clean, out=out, summary=summary)
    after = read_csv(out).set_index("path")["split"]
    assert (after.loc[before.index] == before).all()
    assert len(after) == len(full)
    record = json.loads(summary.read_text())
    assert record["extended"] and record["kept"] == len(before)
    # from scratch, the same grown manifest would have moved some of the old images
    scratch = assign_splits(full, _cfg().split).set_index("path")["split"]
    assert (scratch.loc[before.index] != before).any()


def _odd_clean(n: int) -> pd.DataFrame:
    """A clean table over three roots whose carried columns hold text a parse would change: commas and quotes in
    relpath, a blank mode, widths written as floats, pHashes with leading zeros."""
    df = _skewed(n, seed=5)
    df["root"] = [f"data/inbox/t/batch{i % 3}" for i in range(n)]
    df = df.sort_values("root", kind="stable", ignore_index=True)  # a table is its parts in order
    df["relpath"] = [f'{c}/a, "b" {i}.jpeg' for i, c in enumerate(df["class_name"])]
    df["width"] = [f"{64 + i % 5}.0" for i in range(n)]
    df["mode"] = ["" if i % 7 == 0 else "L" for i in range(n)]
    df["phash"] = [f"{i:016x}" for i in range(n)]
    return df


def _same_tables(got: Path, want: Path) -> None:
    assert [p.name for p in table_parts(got)] == [p.name for p in table_parts(want)]
    for a, b in zip(table_parts(got), table_parts(want), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_run_writes_the_columns_it_carries_as_they_were(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split step reads the clean table's carried columns again, a chunk at a time, as it writes: its split table
    is byte for byte the split of the whole table (from scratch, with rows resize could not decode left out, and
    extended, with new images quarantined), the carried text unchanged."""
    monkeypatch.setattr(medflow.io, "_READ_CHUNK_ROWS", 7)
    clean, out, summary, rejects, late = (tmp_path / n for n in ("clean", "split", "split.json", "q.csv", "late.csv"))
    full = _odd_clean(120)
    write_table(clean, full)
    lost = [0, 8, 9, 50, 119]  # across chunk edges, first and last
    write_csv(late, full.iloc[lost][["path", "sha256", "bytes"]].assign(
        reason="resize_decode_error", detail="x", row=lost).loc[:, [c for c in QUARANTINE_COLUMNS if c != "links"]])
    run(_cfg(), clean=clean, out=out, summary=summary, rejects=rejects, resize_rejects=late)
    whole = read_csv(clean)
    expected = assign_splits(whole.assign(row=np.arange(len(whole))).drop(index=lost), _cfg().split)
    write_table(tmp_path / "want", expected)
    _same_tables(out, tmp_path / "want")
    assert read_csv(out)["relpath"].str.contains(', "b" ').all() and read_csv(out)["mode"].isna().any()
    assert table_parts(out)[0].read_text().count(".0,") >= 7  # widths kept as written

    previous = read_csv(out)
    by_split = previous.groupby("split")["group"].first()
    bridge = _frame([_row(by_split[s], 90, 0, dup_group="bridge") for s in ("train", "test")])
    bridge["root"] = "data/inbox/t/batch9"
    grown = pd.concat([full, bridge], ignore_index=True)
    write_table(clean, grown)
    assert run(_cfg(), clean=clean, out=out, summary=summary, rejects=rejects)["quarantined"] == 2
    extended = extend_split(previous, read_csv(clean), _cfg().split)
    write_table(tmp_path / "want2", extended.split)
    _same_tables(out, tmp_path / "want2")


def test_a_clean_table_replaced_while_the_split_runs_is_named_and_nothing_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The carried columns are read again at the write: a clean table another run replaced in between (its rows in
    another order) stops the step naming the table, and the previous split table stays as it was."""
    import tasks.split as step

    clean, out, summary = tmp_path / "clean", tmp_path / "split", tmp_path / "split.json"
    full = _odd_clean(60)
    write_table(clean, full)
    run(_cfg(), clean=clean, out=out, summary=summary)
    before = {p.name: p.read_bytes() for p in table_parts(out)}
    real = step.extend_split

    def replaced_meanwhile(*args: object, **kwargs: object) -> object:
        write_table(clean, full.iloc[::-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "extend_split", replaced_meanwhile)
    with pytest.raises(StepError, match=r"clean: the clean table changed while the split step ran"):
        run(_cfg(), clean=clean, out=out, summary=summary)
    assert {p.name: p.read_bytes() for p in table_parts(out)} == before


def test_run_holds_the_carried_columns_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long relpaths cost the split step a chunk of them, not the table's: its peak of Python allocations
    (tracemalloc) with 600-character relpaths is within a third of their text of the peak with short ones. Fails
    with the whole table read (about their whole text more)."""
    import tracemalloc

    monkeypatch.setattr(medflow.io, "_READ_CHUNK_ROWS", 256)
    df = _skewed(6000, seed=2)
    peaks = []
    for pad in (0, 600):
        clean = tmp_path / f"clean{pad}.csv"
        write_csv(clean, df.assign(relpath=df["relpath"] + "x" * pad))
        tracemalloc.start()
        run(_cfg(), clean=clean, out=tmp_path / f"split{pad}", summary=tmp_path / f"split{pad}.json")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    text = 600 * len(df)
    assert peaks[1] - peaks[0] < text / 3, (peaks, text)


def test_an_upgrade_extends_the_one_csv_split_an_earlier_medflow_wrote(tmp_path: Path) -> None:
    """split.csv (one CSV, before tables were folders) beside a missing split table is the previous split."""
    clean, legacy, summary = tmp_path / "clean.csv", tmp_path / "split.csv", tmp_path / "split.json"
    full = _skewed(400, seed=3)
    old_groups = full["group"].unique()[: len(full["group"].unique()) * 3 // 4]
    write_csv(clean, full[full["group"].isin(old_groups)])
    run(_cfg(), clean=clean, out=tmp_path / "made", summary=summary)
    write_csv(legacy, read_csv(tmp_path / "made"))  # what the earlier medflow left
    before = read_csv(legacy).set_index("path")["split"]
    write_csv(clean, full)
    run(_cfg(), clean=clean, out=tmp_path / "split", summary=summary)
    after = read_csv(tmp_path / "split").set_index("path")["split"]
    assert (after.loc[before.index] == before).all() and len(after) == len(full)
    assert json.loads(summary.read_text())["extended"]


def test_run_quarantines_linking_images_and_goes_on(tmp_path: Path) -> None:
    """An increment that links a train and a test patient: the run goes on, the two new images are in
    split_rejects.csv and split.json, in no split; GX passes on the result; the artifact's and the report's
    readers list them beside the filter's rejects, and the report names (and pseudonymizes) what they link."""
    clean, out, summary, rejects = (tmp_path / n for n in ("clean.csv", "split.csv", "split.json", "split_rejects.csv"))
    full = _skewed(400, seed=3)
    write_csv(clean, full)
    run(_cfg(), clean=clean, out=out, summary=summary, rejects=rejects)
    assert read_csv(rejects).empty and json.loads(summary.read_text())["quarantined"]["images"] == 0
    before = read_csv(out)
    by_split = before.groupby("split")["group"].first()
    bridge = _frame([_row(by_split[s], 90, 0, dup_group="bridge") for s in ("train", "test")])
    write_csv(clean, pd.concat([full, bridge], ignore_index=True))
    for _ in range(2):  # and again on the next run: stable, nothing moves
        assert run(_cfg(), clean=clean, out=out, summary=summary, rejects=rejects)["quarantined"] == 2
        pd.testing.assert_frame_equal(read_csv(out), before)
    listed = read_csv(rejects)
    assert listed["path"].tolist() == bridge["path"].tolist() and set(listed["reason"]) == {LINKS_SPLITS}
    record = json.loads(summary.read_text())
    assert record["quarantined"] == {"images": 2, "by_reason": {LINKS_SPLITS: 2}, "file": str(rejects),
                                     "examples": bridge["path"].tolist()}
    assert record["images"] == len(full) and record["extended"]
    # GX: the image store holds every clean row; the quarantined ones are in it, in no split
    images = save_array(tmp_path / "images", np.zeros((len(full) + 2, 8, 8, 1), np.uint8))
    vcfg = parse_config({"dataset": {"name": "t", "labels": {"NORMAL": 0, "PNEUMONIA": 1}, "group_rule": "kermany"},
                         "resize": {"size": 8}})
    files = {"split": out, "images": images, "result": tmp_path / "v.json", "summary": tmp_path / "v.md"}
    assert validate.run(vcfg, **files, split_rejects=rejects)["failed"] == 0  # n == split.csv rows + quarantined
    # the Prefect artifact and the report read both quarantines (filter first)
    filter_rejects = tmp_path / "rejects.csv"
    write_csv(filter_rejects, pd.DataFrame([{"path": "data/raw/t/NORMAL/bad.jpeg", "reason": "truncated",
                                             "detail": "cut", "sha256": "", "bytes": 3}]))
    both = read_quarantine(filter_rejects, rejects, tmp_path / "absent.csv")
    assert both is not None and both["reason"].tolist() == ["truncated", LINKS_SPLITS, LINKS_SPLITS]
    assert read_quarantine(None, tmp_path / "absent.csv") is None
    ev = Evaluation("t", "t", "test", {}, {}, Scores(*(np.zeros(0) for _ in range(4))), {}, {}, {}, [],
                    pd.DataFrame(), {"confidence": 0.95}, {"rejects": both})
    assert "Quarantined files (listed, never deleted): 3 (2 links_splits, 1 truncated)." in report._data_markdown(ev)
    linked = before.loc[before["group"] == by_split["test"], "path"].iloc[0]
    assert linked in both["detail"].iloc[1]
    hidden = report.pseudonymized(ev, pseudonymizer(True, tmp_path)).data["rejects"]
    text = hidden.to_csv()
    assert Path(linked).name not in text and Path(bridge["path"].iloc[0]).name not in text


def test_a_moved_image_is_named() -> None:
    previous = pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "split": ["train", "test", "val"]})
    check_none_moved(previous, previous.iloc[:2])  # dropped rows are fine
    moved = previous.assign(split=["train", "train", "val"])
    with pytest.raises(StepError, match=r"move 1 images: \['b.png \(test -> train\)'\]"):
        check_none_moved(previous, moved)


def test_run_splits_from_scratch_when_split_params_change(tmp_path: Path) -> None:
    clean, out, summary = tmp_path / "clean.csv", tmp_path / "split.csv", tmp_path / "split.json"
    write_csv(clean, _skewed(300, seed=4))
    run(_cfg(), clean=clean, out=out, summary=summary)
    run(_cfg(seed=7), clean=clean, out=out, summary=summary)
    assert not json.loads(summary.read_text())["extended"]
    expected = assign_splits(read_csv(clean), _cfg(seed=7).split)
    assert (read_csv(out)["split"] == expected["split"]).all()


# ------------------------------------------------------------------------------------------ COVID-CT cases
def test_join_runs_joins_running_numbers_of_one_folder() -> None:
    names = ["1497.png", "1498.png", "1500.png", "1504.png", "7.jpg", "8.jpg", "1%0.jpg", "1499.png", "30.png"]
    folders = ["N"] * 7 + ["C", "N"]  # 1499.png lies in another class folder
    groups = ["1497", "1498", "1500", "1504", "7", "8", "1", "1499", "30"]
    assert RUN_GAP == 2
    assert join_runs(names, folders, groups, "covid_ct") == [
        "1497-1500", "1497-1500", "1497-1500",  # 1498 -> 1500 is a step of 2: one missing slice
        "1504",  # a step of 4 ends the run
        "7", "8", "1",  # case numbers (JPEG, '%'): never joined
        "1499",  # runs never cross folders
        "30"]
    assert join_runs(names, folders, groups, "kermany") == groups  # a rule without runs
    assert join_runs(names, folders, groups, r"^(\d+)") == groups  # a custom regex


def test_manifest_step_joins_the_runs_of_its_rule(tmp_path: Path) -> None:
    for rel in ("CT_NonCOVID/10.png", "CT_NonCOVID/11.png", "CT_NonCOVID/20.png", "CT_COVID/12.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 40), len(rel)).save(tmp_path / rel)
    (tmp_path / "roots.json").write_text(json.dumps([{"root": str(tmp_path)}]))
    cfg = parse_config({"dataset": {"name": "covid_ct", "labels": {"CT_NonCOVID": 0, "CT_COVID": 1},
                                    "group_rule": "covid_ct"}})
    summary = manifest.run(cfg, roots_json=tmp_path / "roots.json", out=tmp_path / "manifest.csv")
    groups = dict(zip(*read_csv(tmp_path / "manifest.csv")[["relpath", "group"]].T.to_numpy(), strict=True))
    assert groups == {"CT_NonCOVID/10.png": "10-11", "CT_NonCOVID/11.png": "10-11", "CT_NonCOVID/20.png": "20",
                      "CT_COVID/12.png": "12"}  # 12.png is in the other class folder
    assert summary["patients"] == 3


# Real COVID-CT NonCOVID slices: adjacent ones of one scan (checked by eye), and unrelated ones: other
# patients 7-20 numbers apart, and bare-number JPEGs, which are case numbers. Their pHashes cannot tell
# them apart: the adjacent pairs are 4-26 bits apart, slices of the two classes come as close as 6.
_ADJACENT = [("1497.png", "1498.png"), ("996.png", "997.png"), ("1212.png", "1213.png"), ("658.png", "660.png"),
             ("1046.png", "1050.png")]
_UNRELATED = [("166.png", "176.png"), ("1218.png", "1238.png"), ("969.png", "996.png"), ("583.png", "590.png"),
              ("7.jpg", "8.jpg"), ("12.jpg", "13.jpg")]


@pytest.fixture(scope="module")
def covid_clean() -> pd.DataFrame:
    """The real COVID-CT folder as the pipeline's clean table: manifest (covid_ct rule, runs joined), the
    filter's pHashes and near-duplicate groups at the default distance."""
    root = shared_dataset("covid_ct")
    cfg = parse_config({"dataset": {"name": "covid_ct", "labels": {"CT_NonCOVID": 0, "CT_COVID": 1},
                                    "group_rule": "covid_ct"}})
    df, _ = build_manifest([root], cfg.dataset.labels, cfg.dataset.group_pattern, workers=2, rule="covid_ct")
    limits = verdict.Limits(max_pixels=cfg.filter.max_pixels, min_side=cfg.filter.min_side)
    df["phash"] = [verdict.verdict((root / rel).read_bytes(), limits).phash for rel in df["relpath"]]
    df["dup_group"] = quality.near_duplicate_groups(df["sha256"], df["phash"], cfg.filter.near_duplicate_distance)
    return df[CLEAN_COLUMNS].assign(name=df["relpath"].str.rsplit("/", n=1).str[-1])


def _group(clean: pd.DataFrame, name: str) -> str:
    return str(clean.loc[clean["name"] == name, "group"].item())


def test_covid_ct_adjacent_slices_are_one_case_and_unrelated_slices_are_not(covid_clean: pd.DataFrame) -> None:
    assert all(_group(covid_clean, a) == _group(covid_clean, b) for a, b in _ADJACENT)
    assert all(_group(covid_clean, a) != _group(covid_clean, b) for a, b in _UNRELATED)
    assert _group(covid_clean, "1497.png") == "1497-1501"
    assert (covid_clean.groupby("group")["label"].nunique() == 1).all()  # no case of both classes
    assert (covid_clean.groupby("dup_group")["label"].nunique() == 1).all()  # the hash joins none either
    assert covid_clean.groupby("class_name")["group"].nunique().to_dict() == {"CT_COVID": 20, "CT_NonCOVID": 42}


def test_covid_ct_figures_of_one_paper_are_one_case(covid_clean: pd.DataFrame) -> None:
    piis = covid_clean.loc[covid_clean["name"].str.startswith("PIIS0140673620302117"), "group"]
    assert len(piis) == 2 and set(piis) == {"PIIS0140673620302117"}  # _1 and _2: one paper
    assert {_group(covid_clean, n) for n in ("PIIS0140673620301549_0%0.png", "PIIS0140673620301549_1.png",
                                             "PIIS0140673620301549_2.png")} == {"PIIS0140673620301549"}


def test_covid_ct_cases_never_straddle_splits(covid_clean: pd.DataFrame) -> None:
    frame = covid_clean[CLEAN_COLUMNS]
    for seed in range(10):
        split = assign_splits(frame, _cfg(seed=seed).split).assign(name=covid_clean["name"].to_numpy())
        assert _leaks(split, "group") == [] and _leaks(split, "dup_group") == []
        where = dict(zip(split["name"], split["split"], strict=True))
        assert all(where[a] == where[b] for a, b in _ADJACENT), seed

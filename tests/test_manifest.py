"""Manifest step and patient rules: rows from folders, the rules' examples, full coverage of the real names."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset

from medflow.config import Config, parse_config
from medflow.data.manifest import build_manifest, class_of, iter_images, source_split_of
from medflow.errors import StepError
from medflow.io import display_path, is_outside, read_csv, readable_path, sha256_file, source_roots, write_json
from medflow.patients import GROUP_RULES, RULES, group_of
from medflow.schema import MANIFEST_COLUMNS
from tasks.manifest import run

# the real folders of ../shared/data each catalog rule is for
RULE_FOLDERS = {"kermany": ("chest_xray", "chest_xray_external", "chest_xray_fullres"),
                "nih_malaria": ("malaria_cells",), "isic": ("skin_lesions",), "covid_ct": ("covid_ct",)}
MALARIA_LABELS = {"Uninfected": 0, "Parasitized": 1}


# ------------------------------------------------------------------------------------------ patient rules
@pytest.mark.parametrize(("rule", "name", "expected"),
                         [(r, n, i) for r, rule in RULES.items() for n, i in rule.examples])
def test_rule_examples(rule: str, name: str, expected: str) -> None:
    assert group_of(name, re.compile(GROUP_RULES[rule])) == expected


def test_a_name_outside_the_rule_has_no_id() -> None:
    assert group_of("scan_0001.png", re.compile(GROUP_RULES["nih_malaria"])) is None
    assert group_of("scan_0001.png", re.compile(GROUP_RULES["kermany"])) is None


def test_every_catalog_rule_has_its_real_folders() -> None:
    assert set(RULE_FOLDERS) == set(RULES) - {"filename", "dicom"}  # dicom reads tags, not names (test_dicom)


@pytest.mark.parametrize(("rule", "folder"), [(r, f) for r, fs in RULE_FOLDERS.items() for f in fs])
def test_rule_covers_every_real_name(rule: str, folder: str) -> None:
    """Every file name of the rule's real folder gets an id: none falls back to a group of its own."""
    names = [p.name for p in iter_images(shared_dataset(folder))]
    pattern = re.compile(GROUP_RULES[rule])
    missed = [n for n in names if group_of(n, pattern) is None]
    assert names and missed == [], f"{len(missed)} of {len(names)} names unmatched, e.g. {missed[:5]}"


def _malaria_ids() -> pd.DataFrame:
    """Per real malaria file: the slide (C<N>, letter dropped), the patient P<N> if named, the rule's id."""
    names = pd.Series([p.name for p in iter_images(shared_dataset("malaria_cells"))])
    parts = names.str.extract(r"^(?P<slide>C\d+)(?:[A-Z]?(?P<patient>P\d+))?")
    pattern = re.compile(GROUP_RULES["nih_malaria"])
    return parts.assign(id=[group_of(n, pattern) for n in names])


def test_malaria_patients_and_slides_are_one_to_one() -> None:
    """The rule's premise: ids are patients where named, else slides, and neither joins two of the other."""
    ids = _malaria_ids()
    assert ids["slide"].notna().all()
    named = ids.dropna(subset=["patient"])
    assert (named.groupby("patient")["slide"].nunique() == 1).all()  # no patient on two slides
    assert (ids.groupby("slide")["patient"].nunique(dropna=False) == 1).all()  # no slide of two patients
    assert (ids.groupby("slide")["id"].nunique() == 1).all() and (ids.groupby("id")["slide"].nunique() == 1).all()
    assert (named["id"] == named["patient"]).all()
    assert ids["patient"].isna().sum() == 157 and ids["id"].nunique() == ids["slide"].nunique() == 195


def test_class_and_split_from_folders() -> None:
    labels = {"NORMAL": 0, "PNEUMONIA": 1}
    assert class_of(("chest_xray", "train", "PNEUMONIA"), labels) == "PNEUMONIA"
    assert class_of(("x", "normal"), labels) == "NORMAL"
    assert class_of(("x", "other"), labels) is None
    assert source_split_of(("chest_xray", "test", "NORMAL")) == "test"
    assert source_split_of(("ISIC-2017_Validation_Data", "nevus")) == ""
    assert source_split_of(("valid", "nevus")) == "val"


def _cfg(root: Path) -> Config:
    return parse_config({"dataset": {"name": "t", "labels": {"NORMAL": 0, "PNEUMONIA": 1},
                                     "group_rule": "kermany"}})


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((40, 50), value, np.uint8))


def test_manifest_rows(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _img(root / "train" / "NORMAL" / "IM-0001-0001.jpeg", 10)
    _img(root / "train" / "PNEUMONIA" / "person3_virus_7.jpeg", 200)
    _img(root / "test" / "PNEUMONIA" / "person3_virus_8.jpeg", 100)
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "__MACOSX").mkdir()
    _img(root / "__MACOSX" / "NORMAL" / "IM-0001-0001.jpeg", 1)
    (root / "train" / "NORMAL" / "._IM-0001-0001.jpeg").write_bytes(b"\x00junk")
    (root / "train" / "NORMAL" / "broken.jpeg").write_text("text behind an image name")
    _img(root / "unlabelled" / "x.jpeg", 5)
    roots = tmp_path / "roots.json"
    write_json(roots, [{"root": str(root), "source": "test", "kind": "folder"}])
    before = {p: sha256_file(p) for p in root.rglob("*") if p.is_file()}

    summary = run(_cfg(root), roots_json=roots, out=tmp_path / "m.csv")

    df = read_csv(tmp_path / "m.csv")
    assert list(df.columns) == MANIFEST_COLUMNS
    assert summary["images"] == 4 and summary["no_class_folder"] == 1
    by_name = df.set_index(df["relpath"].str.split("/").str[-1])
    assert by_name.loc["person3_virus_7.jpeg", "group"] == "person3"
    assert by_name.loc["person3_virus_7.jpeg", "label"] == 1
    assert by_name.loc["person3_virus_8.jpeg", "source_split"] == "test"
    assert by_name.loc["IM-0001-0001.jpeg", "width"] == 50
    assert by_name.loc["IM-0001-0001.jpeg", "format"] == "JPEG"
    assert by_name.loc["IM-0001-0001.jpeg", "mode"] == "L"
    assert by_name.loc["IM-0001-0001.jpeg", "sha256"] == sha256_file(root / "train/NORMAL/IM-0001-0001.jpeg")
    assert by_name.loc["broken.jpeg", "format"] != by_name.loc["broken.jpeg", "format"]  # NaN: no header
    assert before == {p: sha256_file(p) for p in root.rglob("*") if p.is_file()}


def test_no_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write_json(tmp_path / "r.json", [{"root": str(tmp_path / "empty"), "source": "x", "kind": "folder"}])
    with pytest.raises(StepError, match="dataset.labels"):
        run(_cfg(tmp_path), roots_json=tmp_path / "r.json", out=tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_class_folders_dropped_straight_into_the_inbox_are_named(tmp_path: Path) -> None:
    """Each inbox entry is a source with class folders inside; class folders dropped loose become roots of
    their own, with nothing to index: the error says which one, and where it should go."""
    inbox = tmp_path / "inbox"
    _img(inbox / "NORMAL" / "IM-0001-0001.jpeg", 10)
    _img(inbox / "PNEUMONIA" / "person1_bacteria_1.jpeg", 200)
    roots = [{"root": str(inbox / c), "source": str(inbox / c), "kind": "folder"} for c in ("NORMAL", "PNEUMONIA")]
    write_json(tmp_path / "r.json", roots)
    with pytest.raises(StepError, match=re.escape(f"{inbox / 'NORMAL'} is itself a class folder")):
        run(_cfg(tmp_path), roots_json=tmp_path / "r.json", out=tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_missing_roots_file(tmp_path: Path) -> None:
    with pytest.raises(StepError, match="r.json: not found"):
        run(_cfg(tmp_path), roots_json=tmp_path / "r.json", out=tmp_path / "m.csv")


@pytest.mark.integration
def test_manifest_on_shared_chest_xray(tmp_path: Path) -> None:
    src = shared_dataset("chest_xray")
    write_json(tmp_path / "r.json", [{"root": str(src), "source": "shared", "kind": "folder"}])
    summary = run(_cfg(src), roots_json=tmp_path / "r.json", out=tmp_path / "m.csv")
    df = read_csv(tmp_path / "m.csv")
    assert summary["images"] == 1566 and summary["group_rule_fallback"] == 0
    assert df.groupby("class_name").size().to_dict() == {"NORMAL": 403, "PNEUMONIA": 1163}
    assert df["group"].nunique() < len(df)  # several images per patient
    assert df["width"].notna().all()


@pytest.mark.integration
def test_manifest_of_shared_malaria_has_one_group_per_slide() -> None:
    df, skipped = build_manifest([shared_dataset("malaria_cells")], MALARIA_LABELS,
                                 re.compile(GROUP_RULES["nih_malaria"]), workers=2)
    assert len(df) == 1200 and skipped == {"no_class_folder": 0, "group_rule_fallback": 0}
    assert df["group"].nunique() == 195
    assert df.loc[df["relpath"].str.contains("/C213ThinF_"), "group"].unique().tolist() == ["C213"]


# ------------------------------------------------------------------------------------------ shared paths
def test_display_path_keeps_links_and_climbs_out_without_absolute_paths(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "MARKER_home_x"
    project, outside = home / "project", home / "hospital" / "chest_xray"
    (project / "data/inbox/pneumonia").mkdir(parents=True)
    outside.mkdir(parents=True)
    (project / "data/inbox/pneumonia/chest_xray").symlink_to(outside)
    monkeypatch.chdir(project)
    assert display_path(project / "data/inbox/pneumonia/chest_xray/a.jpeg") == "data/inbox/pneumonia/chest_xray/a.jpeg"
    assert display_path("data/x/../y.png") == "data/y.png"
    assert display_path(outside / "a.jpeg") == "../hospital/chest_xray/a.jpeg"  # the home folder never shows
    assert display_path(outside, root=home) == "hospital/chest_xray"
    assert is_outside("../hospital") and not is_outside("data/inbox")


def test_outside_roots_are_labelled_and_read_back_through_roots_json(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "MARKER_home_x" / "project"
    linked, far, twin = tmp_path / "linked", tmp_path / "a" / "chest_xray", tmp_path / "b" / "chest_xray"
    for root in (linked, far, twin):
        _img(root / "train" / "NORMAL" / "IM-0001-0001.jpeg", 10)
    (project / "data/inbox").mkdir(parents=True)
    (project / "data/inbox/linked").symlink_to(linked)
    monkeypatch.chdir(project)
    roots = ["data/inbox/linked", display_path(far), str(twin)]  # inbox link, relative outside, absolute outside
    write_json("roots.json", [{"root": r, "source": r, "kind": "folder"} for r in roots])
    run(_cfg(far), roots_json=Path("roots.json"), out=Path("m.csv"))
    df = read_csv("m.csv")

    shown = sorted(set(df["root"]))
    assert len(shown) == 3 and shown[2] == "data/inbox/linked"
    assert all(re.fullmatch(r"@chest_xray-[0-9a-f]{8}", s) for s in shown[:2])  # one name twice: hashed apart
    assert "data/inbox/linked/train/NORMAL/IM-0001-0001.jpeg" in set(df["path"])
    assert not df["path"].str.contains("MARKER|^/|\\.\\./", regex=True).any(), df["path"].tolist()
    found = source_roots("roots.json")
    assert sorted(found.values()) == sorted([Path(display_path(far)), twin])
    for path, sha in zip(df["path"], df["sha256"], strict=True):
        assert sha256_file(readable_path(path, found)) == sha  # every row opens where it was indexed
    with pytest.raises(StepError, match="source root 'gone' is not in roots.json"):
        readable_path("@gone/x.png", found)


def test_a_class_folder_the_labels_do_not_know_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "src"
    _img(root / "train" / "NORMAL" / "IM-0001-0001.jpeg", 10)
    for i in range(3):
        _img(root / "train" / "COVID19" / f"covid_{i}.jpeg", 20 + i)
    _img(root / "stray.jpeg", 40)
    with caplog.at_level("WARNING", logger="medflow.data.manifest"):
        df, skipped = build_manifest([root], {"NORMAL": 0, "PNEUMONIA": 1}, re.compile(r"^(.*)$"))
    assert len(df) == 1 and skipped["no_class_folder"] == 4
    (msg,) = [r.getMessage() for r in caplog.records if "under no class folder" in r.getMessage()]
    assert "4 image file(s)" in msg and "train/COVID19/ (3)" in msg and "(top level) (1)" in msg
    assert "(NORMAL, PNEUMONIA)" in msg

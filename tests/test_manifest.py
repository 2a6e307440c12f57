import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from medflow.config import GROUP_RULES, parse_config
from medflow.data.manifest import class_of, group_of, run, source_split_of
from medflow.errors import StepError
from medflow.io import read_csv, sha256_file, write_json
from medflow.schema import MANIFEST_COLUMNS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(("name", "patient"), [
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0373-0001.jpeg", "NORMAL2-IM-0373"),
])
def test_kermany_rule(name: str, patient: str) -> None:
    assert group_of(name, re.compile(GROUP_RULES["kermany"])) == patient


def test_nih_rule() -> None:
    assert group_of("C100P61ThinF_IMG_20150918_144104_cell_162.png",
                    re.compile(GROUP_RULES["nih_malaria"])) == "P61"


def test_class_and_split_from_folders() -> None:
    labels = {"NORMAL": 0, "PNEUMONIA": 1}
    assert class_of(("chest_xray", "train", "PNEUMONIA"), labels) == "PNEUMONIA"
    assert class_of(("x", "normal"), labels) == "NORMAL"
    assert class_of(("x", "other"), labels) is None
    assert source_split_of(("chest_xray", "test", "NORMAL")) == "test"
    assert source_split_of(("ISIC-2017_Validation_Data", "nevus")) == ""
    assert source_split_of(("valid", "nevus")) == "val"


def _cfg(root: Path):
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


def test_missing_roots_file(tmp_path: Path) -> None:
    with pytest.raises(StepError, match="r.json: not found"):
        run(_cfg(tmp_path), roots_json=tmp_path / "r.json", out=tmp_path / "m.csv")


@pytest.mark.integration
def test_manifest_on_shared_chest_xray(tmp_path: Path) -> None:
    src = SHARED / "chest_xray"
    if not src.is_dir():
        pytest.skip("../shared/data/chest_xray is absent")
    write_json(tmp_path / "r.json", [{"root": str(src), "source": "shared", "kind": "folder"}])
    summary = run(_cfg(src), roots_json=tmp_path / "r.json", out=tmp_path / "m.csv")
    df = read_csv(tmp_path / "m.csv")
    assert summary["images"] == 1566 and summary["group_rule_fallback"] == 0
    assert df.groupby("class_name").size().to_dict() == {"NORMAL": 403, "PNEUMONIA": 1163}
    assert df["group"].nunique() < len(df)  # several images per patient
    assert df["width"].notna().all()


@pytest.mark.parametrize(("name", "group"), [("1%0.jpg", "1"), ("1%12.jpg", "1"), ("1046.png", "1046"),
                                             ("2020.03.12.20034686-p17-91-1.png", "2020.03.12.20034686"),
                                             ("kjr-21-e25-p1-1.png", "kjr-21-e25")])
def test_covid_ct_rule(name: str, group: str) -> None:
    assert group_of(name, re.compile(GROUP_RULES["covid_ct"])) == group

"""Tests for the resize step (tasks/resize.py): the image store output, incremental runs, the error paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset
from PIL import Image
from resize_helpers import (
    POOL,
    assert_no_output,
    config_for,
    image_set,
    load_images,
    run_step,
    save_image,
    texture,
    write_clean,
    write_clean_unknown,
)

from medflow.errors import StepError
from medflow.imaging import decode, parallel
from medflow.io import ImageStore, read_csv, write_csv
from medflow.schema import CLEAN_COLUMNS, IMAGE_EXTENSIONS
from tasks import resize


@pytest.fixture(autouse=True)
def _small_pool_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "POOL_MIN_IMAGES", POOL)


def test_run_writes_rows_in_clean_csv_order(tmp_path: Path) -> None:
    files = image_set(tmp_path, 5)[::-1]  # reversed: row order must follow clean.csv, not names
    images, summary = run_step(tmp_path, files, config_for(size=24, channels=3))
    assert images.dtype == np.uint8 and images.shape == (5, 24, 24, 3)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=24, channels=3))
    assert summary["images"] == 5 and summary["decoded"] == 5 and summary["cached"] == 0
    assert summary["shape"] == [5, 24, 24, 3] and summary["rejected"] == 0
    assert summary["reduced_decodes"] == 3  # the three JPEGs (short side >= 60): decoded at 4/8
    # no temporary files left beside the outputs; the rejects file holds its header alone
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images", "resize_rejects.csv", "stats.json"]
    assert (tmp_path / "out" / "resize_rejects.csv").read_text().strip() == ",".join(resize.RESIZE_REJECT_COLUMNS)
    store = ImageStore(tmp_path / "out" / "images")  # how training reads it: each shard memory-mapped
    assert np.array_equal(store[3], images[3]) and np.array_equal(store[np.array([4, 0, 3])], images[[4, 0, 3]])
    assert (store.shape, store.dtype, len(store)) == ((5, 24, 24, 3), np.uint8, 5)


def test_run_grayscale_has_one_channel(tmp_path: Path) -> None:
    images, _ = run_step(tmp_path, image_set(tmp_path, 2), config_for(size=16, channels=1))
    assert images.shape == (2, 16, 16, 1)


def test_incremental_run_decodes_only_new_images(tmp_path: Path) -> None:
    files = image_set(tmp_path, 4)
    cfg = config_for(size=20, channels=1)
    _, first = run_step(tmp_path, files[:3], cfg)
    assert (first["decoded"], first["cached"]) == (3, 0)
    images, second = run_step(tmp_path, files, cfg)
    assert (second["decoded"], second["cached"], second["images"]) == (1, 3, 4)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=20, channels=1))
    _, third = run_step(tmp_path, files, cfg)
    assert (third["decoded"], third["cached"]) == (0, 4)
    _, bigger = run_step(tmp_path, files, config_for(size=21, channels=1))  # new geometry: new keys
    assert bigger["decoded"] == 4


def test_duplicate_content_decoded_once(tmp_path: Path) -> None:
    f = image_set(tmp_path, 1)[0]
    images, summary = run_step(tmp_path, [f, f], config_for(size=16))
    assert (summary["decoded"], summary["cached"]) == (1, 1)
    assert np.array_equal(images[0], images[1])


def test_reduced_decodes_counted(tmp_path: Path) -> None:
    big = save_image(tmp_path / "big.jpg", texture(400, 600), quality=90)  # decoded at 2/8: 150 x 100
    _, summary = run_step(tmp_path, [big, image_set(tmp_path, 1)[0]], config_for(size=64, channels=1))
    assert summary["reduced_decodes"] == 1 and summary["decoded"] == 2

# ---------------------------------------------------------------------------------------------------------
# error paths: each names the file or column, and leaves no output behind
# ---------------------------------------------------------------------------------------------------------


def test_missing_file_is_a_reject_row(tmp_path: Path) -> None:
    files = image_set(tmp_path, 2)
    clean = write_clean(tmp_path / "clean.csv", files)
    files[0].unlink()
    summary = resize.run(config_for(size=16), clean=clean, out=tmp_path / "out" / "images",
                         stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache")
    rejects = read_csv(tmp_path / "out" / "resize_rejects.csv")  # the default: beside the array
    assert summary["rejected"] == 1 and rejects["path"].tolist() == [str(files[0])]
    assert rejects["detail"][0].startswith("cannot read: No such file") and rejects["row"].tolist() == [0]


def test_every_image_failing_stops_and_keeps_previous_output(tmp_path: Path) -> None:
    files = image_set(tmp_path, 2)
    before, _ = run_step(tmp_path, files, config_for(size=16))
    for f in files:
        f.write_bytes(b"broken")
    clean = write_clean_unknown(tmp_path / "clean2.csv", files, sha="f" * 64)
    with pytest.raises(StepError, match=r"none of the 2 image\(s\).*Nothing was written"):
        resize.run(config_for(size=16), clean=clean, out=tmp_path / "out" / "images",
                   stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache")
    assert np.array_equal(load_images(tmp_path / "out" / "images"), before)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images", "resize_rejects.csv", "stats.json"]


def test_missing_column_and_empty_table(tmp_path: Path) -> None:
    no_sha = tmp_path / "no_sha.csv"
    write_csv(no_sha, pd.DataFrame({"path": ["a.png"], "width": [1]}))
    kw = {"out": tmp_path / "out" / "images", "stats": tmp_path / "out" / "s.json",
          "cache": tmp_path / "c"}
    with pytest.raises(StepError, match="no_sha.csv: missing column.*sha256"):
        resize.run(config_for(), clean=no_sha, **kw)
    empty = tmp_path / "empty.csv"
    write_csv(empty, pd.DataFrame(columns=CLEAN_COLUMNS))
    with pytest.raises(StepError, match="empty.csv: no images"):
        resize.run(config_for(), clean=empty, **kw)
    with pytest.raises(StepError, match="absent.csv"):
        resize.run(config_for(), clean=tmp_path / "absent.csv", **kw)
    assert_no_output(tmp_path)

# ---------------------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_covid_ct_mixed_formats_all_load(tmp_path: Path) -> None:
    root = shared_dataset("covid_ct")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert any("%" in f.name for f in files)
    with_alpha = [i for i, f in enumerate(files) if Image.open(f).mode == "RGBA"]
    assert with_alpha
    for channels in (1, 3):
        images, summary = run_step(tmp_path, files, config_for(size=64, channels=channels, workers=0),
                               name=f"clean{channels}.csv")
        assert images.shape == (len(files), 64, 64, channels) and summary["decoded"] == len(files)
        assert (images.reshape(len(files), -1).std(axis=1) > 5).all()  # every slice has content

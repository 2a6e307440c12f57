"""Tests for the filter step (tasks/filter.py over medflow.imaging.quality: corrupt-image quarantine,
duplicates, the packed verdict index) and medflow.imaging.phash."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import run_caller_script, shared_dataset
from PIL import Image

from medflow.config import Config, parse_config
from medflow.errors import StepError
from medflow.imaging import phash, quality, verdict
from medflow.imaging.verdict_store import VerdictStore
from medflow.io import read_csv, read_json, sha256_file, table_parts, write_csv
from medflow.schema import CLEAN_COLUMNS, MANIFEST_COLUMNS, REJECT_COLUMNS
from tasks import filter as step

# ------------------------------------------------------------------------------------------------
# Fixture helpers


def _image(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A grayscale image with structure (gradient + blobs) and noise, so pHashes of seeds differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    img = 120 + 60 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) / rng.uniform(6, 20))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 25)
        img += rng.uniform(-80, 80) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img += rng.normal(0, 6, size=(h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(path: Path, arr: np.ndarray, *params: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr, list(params))
    return path


def _jpeg_bytes(seed: int, jpeg_quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpeg", _image(seed), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    assert ok
    return buf.tobytes()


def _header(path: Path) -> tuple[Any, Any, Any, Any]:
    try:
        with Image.open(path) as im:
            return im.size[0], im.size[1], im.mode, im.format
    except Exception:
        return None, None, None, None


def _manifest(paths: list[Path], root: Path) -> pd.DataFrame:
    """Manifest rows built by hand (schema.MANIFEST_COLUMNS), as the manifest step would write them."""
    rows = []
    for p in paths:
        w, h, mode, fmt = _header(p)
        rows.append({"path": str(p), "relpath": str(p.relative_to(root)), "root": str(root),
                     "class_name": p.parent.name, "label": int(p.parent.name == "B"), "group": p.stem,
                     "source_split": None, "sha256": sha256_file(p), "bytes": p.stat().st_size,
                     "width": w, "height": h, "mode": mode, "format": fmt})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _cfg(**filter_params: Any) -> Config:
    return parse_config({"dataset": {"name": "t", "sources": ["x"], "labels": {"A": 0, "B": 1}},
                         "filter": {"workers": 1, **filter_params}})


def _outputs(out: Path) -> dict[str, Path]:
    return {"manifest": out / "manifest.csv", "clean": out / "clean", "rejects": out / "rejects.csv",
            "summary": out / "summary.json", "cache": out / "cache"}


def _run(df: pd.DataFrame, out: Path, cfg: Config) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    paths = _outputs(out)
    write_csv(paths["manifest"], df)
    summary = step.run(cfg, **paths)
    return summary, read_csv(paths["clean"]), read_csv(paths["rejects"])


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# One realistic mixed folder, filtered once with two worker processes (the parallel path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("mixed")
    raw = base / "raw"
    a, b = raw / "A", raw / "B"
    files: dict[str, Path] = {}
    files["good_png"] = _write(a / "good_1.png", _image(1))
    files["good_jpg"] = _write(a / "good_2.jpeg", _image(2), cv2.IMWRITE_JPEG_QUALITY, 92)
    files["good_rgb"] = _write(b / "good_3.png", cv2.cvtColor(_image(3), cv2.COLOR_GRAY2BGR))
    files["good_rgba"] = _write(b / "good_4.png", cv2.cvtColor(_image(4), cv2.COLOR_GRAY2BGRA))
    files["good_16bit"] = _write(b / "good_5.png", _image(5).astype(np.uint16) * 257)
    files["cmyk"] = b / "good_6.jpeg"
    Image.fromarray(_image(6)).convert("CMYK").save(files["cmyk"], format="JPEG", quality=90)
    # near duplicate: the same pixels as good_1, re-encoded as JPEG quality 60, same class
    files["reencoded"] = _write(a / "good_1_reencoded.jpeg", _image(1), cv2.IMWRITE_JPEG_QUALITY, 60)
    # exact duplicate of good_2 under a later path, same class
    files["exact_dup"] = a / "zz_same_as_2.jpeg"
    shutil.copyfile(files["good_jpg"], files["exact_dup"])
    # label conflicts: one content under A and B (and a second copy under A); a near duplicate under both
    files["conflict_a"] = _write(a / "both_1.png", _image(11))
    files["conflict_a2"], files["conflict_b"] = a / "both_2.png", b / "both_3.png"
    for copy in (files["conflict_a2"], files["conflict_b"]):
        shutil.copyfile(files["conflict_a"], copy)
    files["near_a"] = _write(a / "near_1.png", _image(12))
    files["near_b"] = _write(b / "near_2.jpeg", _image(12), cv2.IMWRITE_JPEG_QUALITY, 60)
    files["near_b2"] = b / "near_3.jpeg"  # an exact copy of a near-duplicate member: quarantined with it
    shutil.copyfile(files["near_b"], files["near_b2"])
    full = _write(base / "full.jpeg", _image(7), cv2.IMWRITE_JPEG_QUALITY, 92).read_bytes()
    files["truncated"] = a / "cut_60.jpeg"
    files["truncated"].write_bytes(full[: int(len(full) * 0.6)])
    files["no_eoi"] = a / "cut_end.jpeg"  # only the EOI marker is missing: Pillow decodes it silently
    files["no_eoi"].write_bytes(_jpeg_bytes(8, 92)[:-2])
    files["padded"] = a / "padded.jpeg"  # complete JPEG followed by padding: fine
    files["padded"].write_bytes(full + b"\x00" * 64)
    png = _write(base / "full.png", _image(8)).read_bytes()
    files["broken_png"] = a / "broken.png"
    idat = png.find(b"IDAT") + 40
    files["broken_png"].write_bytes(png[:idat] + b"\x00" * 30 + png[idat + 30:])
    files["zero"] = a / "empty.jpeg"
    files["zero"].write_bytes(b"")
    files["text"] = a / "notes.jpeg"
    files["text"].write_text("this is a radiology report, not an image\n")
    files["small"] = _write(a / "tiny.png", _image(9, 16, 40))
    files["float"] = b / "float.tiff"
    Image.fromarray(_image(10).astype(np.float32) / 255).save(files["float"], format="TIFF")

    order = sorted(files.values())
    df = _manifest(order, raw)
    before = _tree_digest(raw)
    out = base / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quality, "_INLINE_MAX", 0)  # use the process pool even for these few files
        summary, clean, rejects = _run(df, out, _cfg(workers=2, min_side=32))
    return {"files": files, "manifest": df, "summary": summary, "clean": clean, "rejects": rejects,
            "raw": raw, "before": before, "out": out}


def _reason(mixed: dict[str, Any], key: str) -> str:
    rej = mixed["rejects"].set_index("path")
    path = str(mixed["files"][key])
    return str(rej.at[path, "reason"]) if path in rej.index else ""


def test_cv2_imread_accepts_a_truncated_jpeg_that_the_filter_rejects(mixed: dict[str, Any]) -> None:
    arr = cv2.imread(str(mixed["files"]["truncated"]), cv2.IMREAD_UNCHANGED)
    assert arr is not None and arr.shape == (96, 128)  # why a real check is needed
    assert _reason(mixed, "truncated") == "truncated"
    assert _reason(mixed, "no_eoi") == "truncated"
    assert _reason(mixed, "padded") == ""


def test_pillow_decodes_a_jpeg_without_eoi_that_the_filter_rejects(mixed: dict[str, Any]) -> None:
    with Image.open(mixed["files"]["no_eoi"]) as im:
        im.load()  # no error: why the filter checks the end marker itself
    assert _reason(mixed, "no_eoi") == "truncated"
    assert "FFD9" in mixed["rejects"].set_index("path").at[str(mixed["files"]["no_eoi"]), "detail"]


def test_end_marker_check_ignores_an_embedded_thumbnail() -> None:
    thumb = b"\xff\xd8\xff\xe1" + b"exif" + b"\xff\xd8\xff\xda" + b"thumb scan" + b"\xff\xd9"
    main_scan = b"\xff\xda" + b"entropy coded, cut here"
    assert verdict.missing_end_marker(thumb + main_scan, "JPEG")
    assert not verdict.missing_end_marker(thumb + main_scan + b"\xff\xd9" + b"\x00" * 10, "JPEG")
    assert verdict.missing_end_marker(b"\x89PNG....IHDR....IDAT....", "PNG")
    assert not verdict.missing_end_marker(b"\x89PNG....IHDR....IDAT....IEND....", "PNG")
    assert not verdict.missing_end_marker(b"GIF89a", "GIF")


@pytest.mark.parametrize(("key", "reason"), [
    ("zero", "zero_bytes"), ("text", "not_an_image"), ("small", "too_small"),
    ("float", "unsupported_mode"), ("broken_png", "decode_error"), ("exact_dup", "duplicate")])
def test_each_bad_file_gets_its_reason(mixed: dict[str, Any], key: str, reason: str) -> None:
    assert _reason(mixed, key) == reason


def test_exact_duplicate_is_kept_once_and_names_the_kept_file(mixed: dict[str, Any]) -> None:
    files, clean, rejects = mixed["files"], mixed["clean"], mixed["rejects"]
    dup = rejects.set_index("path").loc[str(files["exact_dup"])]
    assert dup["detail"] == f"duplicate of {files['good_jpg']}"
    assert dup["sha256"] == sha256_file(files["good_jpg"])
    assert clean["sha256"].is_unique
    assert str(files["good_jpg"]) in set(clean["path"])


def test_one_content_under_two_labels_quarantines_every_copy(mixed: dict[str, Any]) -> None:
    files, rejects = mixed["files"], mixed["rejects"].set_index("path")
    for key in ("conflict_a", "conflict_a2", "conflict_b"):
        row = rejects.loc[str(files[key])]
        assert row["reason"] == "label_conflict", key
        others = [k for k in ("conflict_a", "conflict_a2", "conflict_b") if k != key]
        assert row["detail"].startswith("same content as ")
        for other in others:  # each copy names the others, with their labels
            assert f"{files[other]} labelled {files[other].parent.name}" in row["detail"]
    assert not set(map(str, (files["conflict_a"], files["conflict_b"]))) & set(mixed["clean"]["path"])


def test_near_duplicate_under_two_labels_quarantines_the_group(mixed: dict[str, Any]) -> None:
    files, rejects = mixed["files"], mixed["rejects"].set_index("path")
    assert rejects.at[str(files["near_a"]), "detail"] == f"near duplicate of {files['near_b']} labelled B"
    for key in ("near_b", "near_b2"):
        assert rejects.at[str(files[key]), "reason"] == "label_conflict"
        assert rejects.at[str(files[key]), "detail"] == f"near duplicate of {files['near_a']} labelled A"
    assert rejects.at[str(files["near_a"]), "reason"] == "label_conflict"
    # conflicts come first in rejects.csv, so the quarantine artifact and the report show them
    reasons = list(mixed["rejects"]["reason"])
    assert reasons[:6] == ["label_conflict"] * 6 and "label_conflict" not in reasons[6:]


def test_supported_modes_are_kept(mixed: dict[str, Any]) -> None:
    clean = mixed["clean"].set_index("path")
    modes = {k: clean.at[str(mixed["files"][k]), "mode"] for k in
             ("good_png", "good_rgb", "good_rgba", "good_16bit", "cmyk")}
    assert modes == {"good_png": "L", "good_rgb": "RGB", "good_rgba": "RGBA", "good_16bit": "I;16",
                     "cmyk": "CMYK"}


def test_reencoded_copy_shares_the_dup_group_and_others_do_not(mixed: dict[str, Any]) -> None:
    files, clean = mixed["files"], mixed["clean"].set_index("path")
    first, copy = clean.loc[str(files["good_png"])], clean.loc[str(files["reencoded"])]
    assert phash.hamming(first["phash"], copy["phash"]) <= 4
    # group id = sha256 of the first member by path (raw/A/good_1.png sorts before raw/A/good_1_reencoded.jpeg)
    assert first["dup_group"] == copy["dup_group"] == first["sha256"]
    others = clean.drop(index=[str(files["good_png"]), str(files["reencoded"])])
    assert (others["dup_group"] == others["sha256"]).all()
    assert mixed["summary"]["near_duplicate_groups"] == 1
    assert mixed["summary"]["images_in_near_dup_groups"] == 2


def test_outputs_follow_the_schema_and_manifest_order(mixed: dict[str, Any]) -> None:
    clean, rejects, manifest = mixed["clean"], mixed["rejects"], mixed["manifest"]
    assert list(clean.columns) == CLEAN_COLUMNS
    assert list(rejects.columns) == REJECT_COLUMNS
    kept = [p for p in manifest["path"] if p not in set(rejects["path"])]
    assert list(clean["path"]) == kept
    assert clean["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert set(rejects["reason"]) <= set(quality.REASONS)
    text = "".join(p.read_text() for p in table_parts(mixed["out"] / "clean"))
    assert ".0," not in text  # integers stay integers


def test_summary_counts_and_file(mixed: dict[str, Any]) -> None:
    s = mixed["summary"]
    assert s == read_json(mixed["out"] / "summary.json")
    assert s["in"] == len(mixed["manifest"]) == s["clean"] + s["rejected"]
    assert s["by_reason"] == {"zero_bytes": 1, "not_an_image": 1, "truncated": 2, "decode_error": 1,
                              "too_many_pixels": 0, "too_small": 1, "unsupported_mode": 1, "no_pixel_data": 0,
                              "multi_frame": 0, "unsupported_syntax": 0, "unreadable": 0, "duplicate": 1,
                              "label_conflict": 6}
    assert s["decoded"] == len(mixed["manifest"]) - 4  # each exact copy's content is decoded once
    assert s["cached"] == 0


def test_raw_files_are_never_changed(mixed: dict[str, Any]) -> None:
    assert _tree_digest(mixed["raw"]) == mixed["before"]


# ------------------------------------------------------------------------------------------------
# Pixel cap, cache, incremental runs


def test_pixel_cap_rejects_from_the_header(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "A"
    ok = _write(raw / "ok.png", _image(1, 30, 30))  # 900 pixels
    over = _write(raw / "over.png", _image(2, 40, 40))  # 1,600 > 1,000: Pillow only warns here
    bomb = _write(raw / "bomb.png", _image(3, 100, 100))  # > 2 x cap: Pillow raises at open
    summary, clean, rejects = _run(_manifest([ok, over, bomb], tmp_path / "raw"), tmp_path / "out",
                                   _cfg(max_pixels=1000, min_side=8))
    assert list(clean["path"]) == [str(ok)]
    assert dict(zip(rejects["path"], rejects["reason"], strict=True)) == {
        str(over): "too_many_pixels", str(bomb): "too_many_pixels"}
    assert summary["by_reason"]["too_many_pixels"] == 2


def _five(tmp_path: Path) -> tuple[list[Path], Path]:
    root = tmp_path / "raw"
    return [_write(root / "A" / f"img_{i}.png", _image(20 + i)) for i in range(5)], root


def _index_file(out: Path, cfg: Config) -> Path:
    return quality.index_path(out / "cache", cfg.filter)


def test_second_run_decodes_only_new_content(tmp_path: Path) -> None:
    paths, root = _five(tmp_path)
    cfg = _cfg()
    first, _, _ = _run(_manifest(paths, root), tmp_path / "out", cfg)
    assert (first["decoded"], first["cached"]) == (5, 0)
    assert sorted(p.name for p in (tmp_path / "out" / "cache").rglob("*") if p.is_file()) == sorted([
        _index_file(tmp_path / "out", cfg).name,  # one packed index, no per-image files
        quality.known_pairs(tmp_path / "out" / "cache", cfg.filter).path.name])  # and the near-duplicate links

    old_layout = tmp_path / "out" / "cache" / "filter-3-0123456789abcdef" / "ab"  # one JSON per image, never read
    old_layout.mkdir(parents=True)
    (old_layout / f"ab{'0' * 62}.json").write_text("{}")
    paths.append(_write(root / "B" / "new.png", _image(99)))
    second, clean, _ = _run(_manifest(paths, root), tmp_path / "out", cfg)
    assert (second["decoded"], second["cached"]) == (1, 5)
    assert len(clean) == 6
    assert not old_layout.parent.exists()  # dropped by the save

    # parameters that change verdicts change the cache key: a second index beside the first
    fourth, _, _ = _run(_manifest(paths, root), tmp_path / "out", _cfg(min_side=16))
    assert (fourth["decoded"], fourth["cached"]) == (6, 0)
    assert len(list((tmp_path / "out" / "cache").iterdir())) == 4  # an index and its links per key


def test_the_kept_links_are_read_by_the_next_run_and_keyed_by_the_grouping_params(tmp_path: Path) -> None:
    """The filter keeps the links it found (medflow.imaging.known_pairs) and the next run takes the links among
    contents it has seen from that file: one planted there joins two distinct images. Other grouping params
    read another file (none yet): the two are searched again, and apart."""
    paths, root = _five(tmp_path)
    out, cfg = tmp_path / "out", _cfg()
    _run(_manifest(paths, root), out, cfg)
    known = quality.known_pairs(out / "cache", cfg.filter)
    assert sorted(known.searched.astype(str)) == sorted(sha256_file(p) for p in paths)
    assert known.pairs.shape == (0, 2)  # five distinct images
    known.keep(np.array([sha256_file(p) for p in paths]), np.array([[0, 1]]))  # a link no search would find
    known.save()
    _, clean, _ = _run(_manifest(paths, root), out, cfg)
    group = dict(zip(clean["path"].map(lambda p: Path(p).name), clean["dup_group"], strict=True))
    assert group["img_0.png"] == group["img_1.png"] != group["img_2.png"]
    _, clean, _ = _run(_manifest(paths, root), out, _cfg(near_duplicate_min_correlation=0.95))
    assert clean["dup_group"].nunique() == 5


def test_index_round_trips_every_verdict(mixed: dict[str, Any]) -> None:
    cfg = _cfg(workers=2, min_side=32)
    index = quality.VerdictIndex.load(mixed["out"] / "cache", cfg.filter)
    expected = {sha256_file(p) for p in mixed["files"].values()}
    assert set(index.verdicts) == expected
    reasons = {v.reason for v in index.verdicts.values()}
    dicom_only = {"no_pixel_data", "multi_frame", "unsupported_syntax"}  # tests/test_dicom.py
    table_only = {"duplicate", "label_conflict", "unreadable"}  # decided over the rows, never cached
    assert reasons == set(quality.REASONS) - {*table_only, "too_many_pixels", *dicom_only} | {""}
    rejects = mixed["rejects"].set_index("sha256")
    for sha, v in index.verdicts.items():  # the cached verdicts are the ones the outputs were made from
        if not v.ok:
            assert rejects.loc[[sha], "reason"].iloc[0] == v.reason


def _resaved(data: bytes, header: dict[str, Any] | None = None, **columns: Any) -> bytes:
    """An index file's bytes saved again with another header or other columns (a well-formed .npz)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.npz"
        path.write_bytes(data)
        store, head = VerdictStore.load(path)
        VerdictStore(store.sha, {**store.columns, **columns}).save(path, {**head, **(header or {})})
        return path.read_bytes()


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],  # a torn write (cannot happen through the atomic save)
    lambda data: b"\x00\xff" + data,
    lambda data: b"[]",
    lambda data: _resaved(data, {"format": "medflow-filter-index-1"}),  # an older format
    lambda data: _resaved(data, {"key": {"version": "filter-4", "min_side": 8, "max_pixels": 1}}),  # another key
    lambda data: _resaved(data, width=np.zeros(5, dtype=np.float64)),  # a column of the wrong type
    lambda data: _resaved(data, reason=np.array(["duplicate"] * 5, dtype=object)),  # decided on the table only
])
def test_corrupt_index_warns_and_rebuilds_with_the_same_outputs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any) -> None:
    paths, root = _five(tmp_path)
    cfg, out = _cfg(), tmp_path / "out"
    _, clean_before, _ = _run(_manifest(paths, root), out, cfg)
    index = _index_file(out, cfg)
    good = index.read_bytes()
    index.write_bytes(damage(good))
    with caplog.at_level(logging.WARNING, logger="medflow.imaging.quality"):
        again, clean_after, _ = _run(_manifest(paths, root), out, cfg)
    assert (again["decoded"], again["cached"]) == (5, 0)
    assert f"{index}: corrupt filter cache index" in caplog.text and "rebuilding" in caplog.text
    pd.testing.assert_frame_equal(clean_after, clean_before)
    assert index.read_bytes() == good  # rebuilt to the same bytes


def test_json_index_of_format_1_is_ignored_and_removed(tmp_path: Path) -> None:
    paths, root = _five(tmp_path)
    cfg, out = _cfg(), tmp_path / "out"
    old = _index_file(out, cfg).with_suffix(".json")
    old.parent.mkdir(parents=True)
    sha = sha256_file(paths[0])  # a wrong verdict for the first file: it must not be used
    old.write_text(json.dumps({"format": "medflow-filter-index-1", "key": quality.cache_key(cfg.filter),
                               "fields": ["reason", "detail", "phash", "thumb", "mode", "format", "width", "height"],
                               "verdicts": {sha: ["decode_error", "old", "", "", "L", "PNG", 8, 8]}}))
    first, clean, _ = _run(_manifest(paths, root), out, cfg)
    assert (first["decoded"], first["cached"]) == (5, 0)
    assert len(clean) == 5
    assert not old.exists()


def test_failed_save_keeps_the_previous_index(tmp_path: Path) -> None:
    paths, root = _five(tmp_path)
    cfg, out = _cfg(), tmp_path / "out"
    _run(_manifest(paths, root), out, cfg)
    before = _index_file(out, cfg).read_bytes()
    index = quality.VerdictIndex.load(out / "cache", cfg.filter)
    index.add("f" * 64, verdict.Verdict("decode_error", detail=object()))  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match="encode"):
        index.save()  # fails before anything replaces the index
    assert _index_file(out, cfg).read_bytes() == before
    assert sorted(p.name for p in (out / "cache").iterdir()) == sorted(
        [_index_file(out, cfg).name, quality.known_pairs(out / "cache", cfg.filter).path.name])  # no temp file left


def test_verdicts_decoded_before_an_error_are_kept(tmp_path: Path) -> None:
    paths, root = _five(tmp_path)
    df = _manifest(paths, root)
    data = bytearray(paths[3].read_bytes())
    data[-20] ^= 0xFF  # same size, other content: the fourth file fails the sha256 check
    paths[3].write_bytes(bytes(data))
    with pytest.raises(StepError, match="img_3.png: content changed"):
        _run(df, tmp_path / "out", _cfg())
    index = quality.VerdictIndex.load(tmp_path / "out" / "cache", _cfg().filter)
    assert set(index.verdicts) == set(df["sha256"][:3])
    rerun, _, _ = _run(_manifest(paths, root), tmp_path / "out", _cfg())
    assert (rerun["decoded"], rerun["cached"]) == (2, 3)


def test_blank_sha256_is_computed(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    paths = [_write(root / "A" / "x.png", _image(1)), _write(root / "A" / "y.png", _image(2))]
    df = _manifest(paths, root)
    df.loc[0, "sha256"] = None
    _, clean, _ = _run(df, tmp_path / "out", _cfg())
    assert clean.at[0, "sha256"] == sha256_file(paths[0])


def test_empty_manifest_gives_empty_outputs(tmp_path: Path) -> None:
    summary, clean, rejects = _run(pd.DataFrame(columns=MANIFEST_COLUMNS), tmp_path / "out", _cfg())
    assert (summary["in"], summary["clean"], summary["rejected"]) == (0, 0, 0)
    assert list(clean.columns) == CLEAN_COLUMNS and clean.empty
    assert list(rejects.columns) == REJECT_COLUMNS and rejects.empty


# ------------------------------------------------------------------------------------------------
# Error paths: StepError naming the file or column


def test_missing_manifest(tmp_path: Path) -> None:
    paths = _outputs(tmp_path)
    with pytest.raises(StepError, match="manifest.csv: manifest not found"):
        step.run(_cfg(), **paths)
    assert not paths["clean"].exists()


def test_empty_manifest_file(tmp_path: Path) -> None:
    paths = _outputs(tmp_path)
    paths["manifest"].write_text("")
    with pytest.raises(StepError, match="manifest.csv: cannot read manifest"):
        step.run(_cfg(), **paths)


def test_missing_column(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    df = _manifest([_write(root / "A" / "x.png", _image(1))], root).drop(columns=["sha256", "bytes"])
    with pytest.raises(StepError, match="manifest.csv: missing column.*sha256, bytes"):
        _run(df, tmp_path / "out", _cfg())


def test_duplicate_and_empty_paths(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    df = _manifest([_write(root / "A" / "x.png", _image(1))], root)
    with pytest.raises(StepError, match="path listed twice: .*x.png"):
        _run(pd.concat([df, df]), tmp_path / "out", _cfg())
    blank = df.copy()
    blank.loc[0, "path"] = None
    with pytest.raises(StepError, match="empty 'path' in line\\(s\\) 2$"):
        _run(blank, tmp_path / "out", _cfg())
    bad_size = df.astype({"bytes": object})
    bad_size.loc[0, "bytes"] = "12 KB"
    with pytest.raises(StepError, match="'bytes' is not a number in line\\(s\\) 2$"):
        _run(bad_size, tmp_path / "out", _cfg())


def test_stale_manifest(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    x, y = _write(root / "A" / "x.png", _image(1)), _write(root / "A" / "y.png", _image(2))
    df = _manifest([x, y], root)
    x.rename(root / "A" / "moved.png")
    with pytest.raises(StepError, match="x.png: cannot read"):
        _run(df, tmp_path / "out", _cfg())
    (root / "A" / "moved.png").rename(x)
    y.write_bytes(y.read_bytes() + b"\x00")
    with pytest.raises(StepError, match="y.png: size changed"):
        _run(df, tmp_path / "out", _cfg())


def test_content_changed_with_same_size(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    x = _write(root / "A" / "x.png", _image(1))
    df = _manifest([x], root)
    data = bytearray(x.read_bytes())
    data[-20] ^= 0xFF
    x.write_bytes(bytes(data))
    with pytest.raises(StepError, match="x.png: content changed"):
        _run(df, tmp_path / "out", _cfg())


# ------------------------------------------------------------------------------------------------
# Perceptual hash


def test_phash_identical_reencoded_and_different() -> None:
    img = _image(1, 256, 256)
    ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 60])
    reencoded = cv2.imdecode(jpg, cv2.IMREAD_GRAYSCALE)
    assert ok and reencoded is not None
    resized = cv2.resize(img, (200, 200), interpolation=cv2.INTER_AREA)
    h = phash.phash(img)
    assert phash.hamming(h, phash.phash(img.copy())) == 0
    assert phash.hamming(h, phash.phash(reencoded)) <= 4
    assert phash.hamming(h, phash.phash(resized)) <= 4
    assert phash.hamming(h, phash.phash((img // 2 + 60).astype(np.uint8))) <= 2  # brightness/contrast
    others = [phash.hamming(h, phash.phash(_image(s, 256, 256))) for s in range(2, 12)]
    assert min(others) >= 12
    assert h < 2**63 and bin(h).count("1") == 31  # DC bit is 0; 31 of 63 AC bits above the median


def test_phash_scale_free_for_16_bit() -> None:
    img = _image(3)
    assert phash.phash(img) == phash.phash(img.astype(np.uint16) * 257)


def test_phash_hex_round_trip_and_errors() -> None:
    h = phash.phash(_image(4))
    text = phash.phash_hex(_image(4))
    assert len(text) == 16 and phash.from_hex(text) == h
    assert phash.hamming(text, h) == 0
    with pytest.raises(ValueError, match="64-bit hex"):
        phash.from_hex("0" * 17)
    with pytest.raises(ValueError, match="2-D"):
        phash.phash(np.zeros((8, 8, 3)))


def _brute_pairs(h: np.ndarray, d: int) -> set[tuple[int, int]]:
    return {(i, j) for i in range(len(h)) for j in range(i + 1, len(h))
            if (int(h[i]) ^ int(h[j])).bit_count() <= d}


def test_near_pairs_matches_brute_force_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**64 - 1, size=60, dtype=np.uint64, endpoint=True)
    flips = np.array([1 << int(b) for b in rng.integers(0, 64, size=60)], dtype=np.uint64)
    two_bits = flips[:10] ^ (flips[30:40] << np.uint64(1))
    h = np.concatenate([base, base[:30] ^ flips[:30], base[:10] ^ two_bits])
    expected = _brute_pairs(h, 2)
    assert len(expected) >= 40
    assert {tuple(p) for p in phash.near_pairs(h, 2).tolist()} == expected
    monkeypatch.setattr(phash, "_PAIR_BUDGET", 7)  # force many small chunks
    assert {tuple(p) for p in phash.near_pairs(h, 2).tolist()} == expected
    assert phash.near_pairs(h[:0], 2).shape == (0, 2)


def test_popcount_fallback_without_bitwise_count(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.array([0, 1, 2**64 - 1, 0xF0F0, 2**63], dtype=np.uint64)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert phash.popcount(x).tolist() == [0, 1, 64, 8, 1]


def test_components_are_transitive_and_rooted_at_the_smallest_index() -> None:
    labels = phash.components(6, [(4, 2), (2, 5), (0, 1)])
    assert labels.tolist() == [0, 0, 2, 3, 2, 2]
    assert phash.components(0, []).tolist() == []
    assert phash.components(3, []).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range for 3 items"):
        phash.components(3, [(0, 3)])


def _reference_components(n: int, pairs: np.ndarray) -> list[int]:
    """Smallest index per component by repeated relabelling: slow, obviously right."""
    label = list(range(n))
    changed = True
    while changed:
        changed = False
        for a, b in pairs.tolist():
            low = min(label[a], label[b])
            if label[a] != low or label[b] != low:
                label[a] = label[b] = low
                changed = True
    return label


def test_components_match_a_reference_on_random_graphs() -> None:
    rng = np.random.default_rng(1)
    for n, k in [(1, 0), (30, 10), (200, 150), (200, 400)]:
        pairs = rng.integers(0, n, size=(k, 2))
        assert phash.components(n, pairs).tolist() == _reference_components(n, pairs)


# ------------------------------------------------------------------------------------------------
# Real data


@pytest.mark.integration
@pytest.mark.slow
def test_real_chest_xrays_have_no_corrupt_files(tmp_path: Path) -> None:
    root = shared_dataset("chest_xray")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    assert len(paths) == 1566
    df = _manifest(paths, root)
    # params.yaml's distance: at 4 (the code default) one transitive pHash group joins six distinct NORMAL
    # X-rays and a PNEUMONIA one, all seven quarantined as label_conflict
    cfg = _cfg(workers=0, near_duplicate_distance=2)
    started = time.perf_counter()
    summary, clean, rejects = _run(df, tmp_path / "out", cfg)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    warm, _, _ = _run(df, tmp_path / "out", cfg)
    cached = time.perf_counter() - started
    print(f"filter on {len(paths)} chest X-rays: cold {cold:.1f} s, cached {cached:.2f} s")
    # The source holds byte-identical copies under two names; those are the only rejects.
    assert set(rejects["reason"]) <= {"duplicate"}
    for path, detail in zip(rejects["path"], rejects["detail"], strict=True):
        assert sha256_file(path) == sha256_file(detail.removeprefix("duplicate of "))
    assert len(clean) == df["sha256"].nunique() == summary["in"] - summary["rejected"]
    assert (warm["decoded"], warm["cached"]) == (0, len(clean))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["cached"] == len(clean)


def test_workers_do_not_rerun_the_callers_main_module(tmp_path: Path) -> None:
    """The caller's script runs once, also when the filter starts worker processes (medflow.imaging.workers)."""
    raw = tmp_path / "raw"
    paths = [_write(raw / "AB"[i % 2] / f"{i}.png", _image(40 + i)) for i in range(4)]
    out = _outputs(tmp_path / "out")
    write_csv(out["manifest"], _manifest(paths, raw))
    run_caller_script(tmp_path, f"""
from pathlib import Path
from tasks import filter as step
from medflow.config import parse_config
from medflow.imaging import quality
quality._INLINE_MAX = 0
cfg = parse_config({{"dataset": {{"name": "t", "sources": ["x"], "labels": {{"A": 0, "B": 1}}}},
                    "filter": {{"workers": 2, "min_side": 8}}}})
s = step.run(cfg, **{{k: Path(v) for k, v in {({k: str(v) for k, v in out.items()})!r}.items()}})
assert s["decoded"] == 4 and s["clean"] == 4, s
""")

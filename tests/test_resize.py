"""Tests for medflow.imaging.resize: preprocessing rules, the .npy output, the cache and the error paths."""

from __future__ import annotations

import mmap
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset
from PIL import Image, ImageOps

from medflow.config import Config, parse_config
from medflow.errors import StepError
from medflow.imaging import resize
from medflow.io import read_json, sha256_file, write_csv
from medflow.schema import CLEAN_COLUMNS, IMAGE_EXTENSIONS

# ---------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


def _cfg(size: int = 32, channels: int = 3, workers: int = 1) -> Config:
    return parse_config({"dataset": {"name": "t", "sources": ["x"], "labels": {"a": 0, "b": 1},
                                     "channels": channels},
                         "resize": {"size": size, "workers": workers}})


def _save(path: Path, arr: np.ndarray, mode: str | None = None, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, **kw) if mode else Image.fromarray(arr).save(path, **kw)
    return path


def _clean_csv(dest: Path, files: list[Path]) -> Path:
    """A clean.csv for ``files``, header facts read the way the manifest step reads them."""
    rows = []
    for f in files:
        with Image.open(f) as im:
            w, h, fmt, mode = im.width, im.height, im.format, im.mode
        rows.append({"path": str(f), "relpath": f.name, "root": str(f.parent), "class_name": "a", "label": 0,
                     "group": f.stem, "source_split": "", "sha256": sha256_file(f), "bytes": f.stat().st_size,
                     "width": w, "height": h, "mode": mode, "format": fmt, "phash": "0" * 16,
                     "dup_group": ""})
    write_csv(dest, pd.DataFrame(rows, columns=CLEAN_COLUMNS))
    return dest


POOL = 8  # the process-pool threshold these tests run with: a dozen tiny images exercise the pool


@pytest.fixture(autouse=True)
def _small_pool_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resize, "POOL_MIN_IMAGES", POOL)


def _run(tmp: Path, files: list[Path], cfg: Config,
         name: str = "clean.csv") -> tuple[np.ndarray, dict[str, Any]]:
    clean = _clean_csv(tmp / name, files)
    out, stats = tmp / "out" / "images.npy", tmp / "out" / "stats.json"
    summary = resize.run(cfg, clean=clean, out=out, stats=stats, cache=tmp / "cache")
    assert read_json(stats) == summary
    return np.load(out), summary


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, natural-looking RGB image (low-frequency noise + gradient), so JPEG behaves realistically."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += (np.linspace(0, 60, w, dtype=np.int16)[None, :, None])
    return np.clip(img, 0, 255).astype(np.uint8)


def _solid(rgb: tuple[int, int, int], h: int = 40, w: int = 50) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


# ---------------------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("w", "h", "size", "eighths"), [
    (2000, 1600, 224, 2),   # 1600 / 8 = 200 < 224, 1600 * 2 / 8 = 400
    (1792, 2000, 224, 1),   # exactly 224 on the short side at 1/8
    (1791, 2000, 224, 1),   # libjpeg rounds scaled sizes up: ceil(1791 / 8) = 224
    (1784, 2000, 224, 2),   # 1784 / 8 = 223
    (600, 1000, 224, 3),    # 225 x 375: OpenCV's 1/2, 1/4, 1/8 would decode 300 x 500
    (500, 448, 224, 4),     # both sides count: 448 * 3 / 8 = 168
    (100, 100, 224, 8),     # smaller than the output: full decode, then enlarged
])
def test_jpeg_scale(w: int, h: int, size: int, eighths: int) -> None:
    assert resize.jpeg_scale(w, h, size) == eighths


@pytest.mark.parametrize(("w", "h"), [(600, 1000), (1000, 600), (447, 900), (1791, 2000), (700, 90)])
def test_jpeg_decoded_at_the_documented_scale(w: int, h: int) -> None:
    """What libjpeg-turbo picks for a minimum output size is the scale jpeg_scale documents."""
    data = cv2.imencode(".jpg", _texture(h, w)[..., 0])[1].tobytes()
    m = resize.jpeg_scale(w, h, 224)
    assert resize._decode_jpeg(data, 1, 224, "x").shape == (-(-h * m // 8), -(-w * m // 8), 1)


def _exif(orientation: int, order: str, tag: int = 0x0112) -> bytes:
    """An APP1 EXIF payload: IFD0 with Make and the orientation ``tag``, little- or big-endian."""
    bo = "little" if order == "II" else "big"
    def u(v: int, n: int) -> bytes:
        return v.to_bytes(n, bo)  # type: ignore[arg-type]
    tiff = (order.encode() + u(42, 2) + u(8, 4) + u(2, 2)
            + u(0x010F, 2) + u(2, 2) + u(4, 4) + b"abc\0"  # Make = "abc", inline
            + u(tag, 2) + u(3, 2) + u(1, 4) + u(orientation, 2) + b"\0\0" + u(0, 4))
    return b"Exif\0\0" + tiff


@pytest.mark.parametrize("order", ["II", "MM"])
def test_jpeg_orientation_parsed_in_both_byte_orders(order: str) -> None:
    def app1(body: bytes) -> bytes:
        return b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body
    jfif = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    exif, sos = app1(_exif(7, order)), b"\xff\xda\x00\x02"
    assert resize.jpeg_orientation(b"\xff\xd8" + jfif + exif + sos) == 7
    assert resize.jpeg_orientation(b"\xff\xd8" + jfif + sos + exif) == 1  # after the scan: not the image's
    assert resize.jpeg_orientation(b"\xff\xd8" + exif[:30]) == 1  # cut short: no crash, upright
    assert resize.jpeg_orientation(b"\xff\xd8" + app1(_exif(7, order, tag=0x0113)) + sos) == 1
    assert resize.jpeg_orientation(b"\xff\xd8" + app1(_exif(9, order)) + sos) == 1  # not an orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    f = _save(tmp_path / "o.jpg", _texture(240, 400), quality=95, exif=exif.tobytes())
    assert resize.jpeg_orientation(f.read_bytes()) == orientation
    with Image.open(f) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    want = cv2.resize(upright, (64, 48), interpolation=cv2.INTER_AREA)
    got = cv2.resize(resize.load_resized(f, size=96, channels=3), (64, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(got.astype(int) - want).mean() < 3  # a mis-turned image is tens of levels off


def test_cache_key_depends_on_content_size_channels() -> None:
    base = resize.cache_key("ab" * 32, 224, 1)
    assert base == resize.cache_key("ab" * 32, 224, 1)
    assert len({base, resize.cache_key("cd" * 32, 224, 1), resize.cache_key("ab" * 32, 128, 1),
                resize.cache_key("ab" * 32, 224, 3)}) == 4


def test_rgb_order_and_grayscale(tmp_path: Path) -> None:
    red = _solid((255, 0, 0))
    for f in (_save(tmp_path / "red.png", red), _save(tmp_path / "red.jpg", red, quality=100)):
        rgb = resize.load_resized(f, size=16, channels=3)
        assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
        assert rgb[..., 0].min() >= 250 and rgb[..., 1:].max() <= 5, f
        gray = resize.load_resized(f, size=16, channels=1)
        assert gray.shape == (16, 16, 1)
        assert abs(int(gray.mean()) - 76) <= 2, f  # ITU-R 601 luma of pure red


def test_grayscale_source_replicated_to_three_channels(tmp_path: Path) -> None:
    f = _save(tmp_path / "g.png", np.full((20, 30), 77, np.uint8))
    assert (resize.load_resized(f, size=8, channels=3) == 77).all()


def test_gray_jpeg_in_three_channels_is_the_replicated_one_channel_result(tmp_path: Path) -> None:
    f = _save(tmp_path / "xray.jpg", _texture(500, 400)[..., 0], quality=90)  # mode L, factor 2 at 96
    one = resize.load_resized(f, size=96, channels=1)
    three = resize.load_resized(f, size=96, channels=3)
    assert three.shape == (96, 96, 3) and all(np.array_equal(three[..., c:c + 1], one) for c in range(3))


def test_colour_jpeg_to_one_channel_is_luma(tmp_path: Path) -> None:
    f = _save(tmp_path / "c.jpg", _texture(300, 300), quality=95)
    rgb = resize.load_resized(f, size=64, channels=3)
    gray = resize.load_resized(f, size=64, channels=1)[..., 0]
    assert np.abs(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int) - gray).mean() < 1.5


def test_jpeg_with_trailing_bytes_after_the_end_marker_decodes(tmp_path: Path) -> None:
    f = _save(tmp_path / "tail.jpg", _texture(100, 120), quality=90)
    clean = resize.load_resized(f, size=32, channels=3)
    f.write_bytes(f.read_bytes() + b"\x00" * 500)  # padding some cameras and editors append
    assert np.array_equal(resize.load_resized(f, size=32, channels=3), clean)


def test_32bit_and_float_modes_scaled_by_their_own_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(-5.0, 20.0, 32, dtype=np.float32), (32, 1))
    f = tmp_path / "f.tif"
    Image.fromarray(ramp, "F").save(f)
    i = tmp_path / "i.tif"
    Image.fromarray((ramp * 1000).astype(np.int32), "I").save(i)
    for path in (f, i):
        got = resize.load_resized(path, size=32, channels=1)[..., 0]
        assert got[:, 0].max() == 0 and got[:, -1].min() == 255, path


def test_bilevel_png(tmp_path: Path) -> None:
    f = tmp_path / "b.png"
    Image.fromarray(np.eye(16, dtype=bool)).save(f)
    got = resize.load_resized(f, size=16, channels=1)[..., 0]
    assert np.array_equal(got, np.eye(16, dtype=np.uint8) * 255)


def _oriented_pair(tmp_path: Path, ext: str) -> tuple[Path, np.ndarray]:
    """A 240x400 image tagged with EXIF orientation 6 (display = rotate 90 degrees clockwise)."""
    arr = _texture(240, 400)
    arr[:40] = (255, 0, 0)  # a red band along the stored top edge: displayed on the right
    exif = Image.Exif()
    exif[0x0112] = 6
    extra: dict[str, Any] = {"quality": 95} if ext == ".jpg" else {}
    f = _save(tmp_path / f"rot{ext}", arr, exif=exif.tobytes(), **extra)
    return f, np.rot90(arr, k=-1)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_exif_rotated_image_comes_out_upright(tmp_path: Path, ext: str) -> None:
    f, upright = _oriented_pair(tmp_path, ext)
    with Image.open(f) as im:
        assert im.getexif()[0x0112] == 6
    got = resize.load_resized(f, size=64, channels=3)  # JPEG: factor 2 (240 / 2 >= 64), a reduced decode
    want = cv2.resize(upright, (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(got.astype(int) - want).mean() < 4
    assert got[:, -4:, 0].min() > 200 and got[:, :8, 0].mean() < 200  # red band on the right


def test_16bit_png_scaled_by_its_own_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(100, 4095, 64).astype(np.uint16), (64, 1))  # 12-bit data in 16 bits
    f = _save(tmp_path / "ramp16.png", ramp)
    with Image.open(f) as im:
        assert im.mode.startswith("I")
    got = resize.load_resized(f, size=64, channels=1)[..., 0]
    assert got[:, 0].tolist() == [0] * 64 and got[:, -1].tolist() == [255] * 64
    assert np.all(np.diff(got[0].astype(int)) >= 0)  # monotonic: no wrap-around
    flat = _save(tmp_path / "flat16.png", np.full((20, 20), 3000, np.uint16))
    assert (resize.load_resized(flat, size=8, channels=1) == 0).all()


def test_palette_png_to_rgb_and_transparent_index_to_black(tmp_path: Path) -> None:
    im = Image.new("P", (20, 10))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    im.paste(1, (10, 0, 20, 10))  # right half: index 1 (blue)
    opaque, clear = tmp_path / "pal.png", tmp_path / "pal_t.png"
    im.save(opaque)
    im.save(clear, transparency=1)
    got = resize.load_resized(opaque, size=10, channels=3)
    assert tuple(got[5, 1]) == (255, 0, 0) and tuple(got[5, 8]) == (0, 0, 255)
    got_t = resize.load_resized(clear, size=10, channels=3)
    assert tuple(got_t[5, 1]) == (255, 0, 0) and tuple(got_t[5, 8]) == (0, 0, 0)


def test_rgba_png_composited_over_black(tmp_path: Path) -> None:
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :10, 3] = 255  # left opaque
    rgba[:, 10:, 3] = 128  # right half-transparent
    f = _save(tmp_path / "a.png", rgba, "RGBA")
    got = resize.load_resized(f, size=10, channels=3)  # 20x10 -> 10x10 stretches columns 2:1
    assert tuple(got[5, 1]) == (200, 0, 0)
    assert abs(int(got[5, 8, 0]) - 100) <= 1 and got[5, 8, 1:].max() == 0
    la_arr = np.dstack([np.full((8, 8), 200, np.uint8), np.zeros((8, 8), np.uint8)])  # fully transparent
    la = _save(tmp_path / "la.png", la_arr, "LA")
    assert (resize.load_resized(la, size=8, channels=1) == 0).all()


def test_cmyk_jpeg_to_rgb(tmp_path: Path) -> None:
    f = tmp_path / "cmyk.jpg"
    Image.fromarray(_solid((0, 0, 255))).convert("CMYK").save(f, quality=100)
    got = resize.load_resized(f, size=8, channels=3)
    assert got[..., 2].min() > 240 and got[..., :2].max() < 15


def test_reduced_decode_close_to_full_decode_reference(tmp_path: Path) -> None:
    f = _save(tmp_path / "big.jpg", _texture(1200, 1600, seed=3), quality=90)
    assert resize.jpeg_scale(1600, 1200, 100) == 1  # decoded at 1/8: 200 x 150
    got = resize.load_resized(f, size=100, channels=3)
    full = np.asarray(Image.open(f).convert("RGB"))
    want = cv2.resize(full, (100, 100), interpolation=cv2.INTER_AREA)
    # DCT-domain scaling is a slightly different low-pass than a box average: about 1 grey level apart
    assert np.abs(got.astype(int) - want).mean() < 2.5


def test_decode_resized_bytes_equals_load_resized(tmp_path: Path) -> None:
    f = _save(tmp_path / "t.jpg", _texture(300, 500), quality=90)
    got = resize.decode_resized(f.read_bytes(), size=48, channels=1, name="upload")
    assert np.array_equal(got, resize.load_resized(f, size=48, channels=1))


# ---------------------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------------------


def _dataset(tmp_path: Path, n: int) -> list[Path]:
    """``n`` distinct images of mixed formats and sizes; image i has mean brightness rising with i."""
    files = []
    for i in range(n):
        arr = np.clip(_texture(60 + 7 * i, 90 - 3 * i, seed=i) // 4 + 20 * i, 0, 255).astype(np.uint8)
        ext = ".png" if i % 2 else ".jpg"
        files.append(_save(tmp_path / "img" / f"im{i:02d}{ext}", arr))
    return files


def test_run_writes_rows_in_clean_csv_order(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 5)[::-1]  # reversed: row order must follow clean.csv, not names
    images, summary = _run(tmp_path, files, _cfg(size=24, channels=3))
    assert images.dtype == np.uint8 and images.shape == (5, 24, 24, 3)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, resize.load_resized(f, size=24, channels=3))
    assert summary["images"] == 5 and summary["decoded"] == 5 and summary["cached"] == 0
    assert summary["shape"] == [5, 24, 24, 3]
    assert summary["reduced_decodes"] == 3  # the three JPEGs (short side >= 60): decoded at 4/8
    # no temporary files left beside the outputs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images.npy", "stats.json"]
    mm = np.load(tmp_path / "out" / "images.npy", mmap_mode="r")  # how training reads it
    assert np.array_equal(mm[3], images[3])


def test_run_grayscale_has_one_channel(tmp_path: Path) -> None:
    images, _ = _run(tmp_path, _dataset(tmp_path, 2), _cfg(size=16, channels=1))
    assert images.shape == (2, 16, 16, 1)


def test_incremental_run_decodes_only_new_images(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 4)
    cfg = _cfg(size=20, channels=1)
    _, first = _run(tmp_path, files[:3], cfg)
    assert (first["decoded"], first["cached"]) == (3, 0)
    images, second = _run(tmp_path, files, cfg)
    assert (second["decoded"], second["cached"], second["images"]) == (1, 3, 4)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, resize.load_resized(f, size=20, channels=1))
    _, third = _run(tmp_path, files, cfg)
    assert (third["decoded"], third["cached"]) == (0, 4)
    _, bigger = _run(tmp_path, files, _cfg(size=21, channels=1))  # new geometry: new keys
    assert bigger["decoded"] == 4


def test_copy_from_an_unaligned_offset_across_pages(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 3 * mmap.ALLOCATIONGRANULARITY, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(data)
    (tmp_path / "dst").write_bytes(b"\0" * 10_000)
    src_pos, nbytes = mmap.ALLOCATIONGRANULARITY - 100, mmap.ALLOCATIONGRANULARITY + 300
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "r+b") as dst:
        resize._copy(dst.fileno(), src.fileno(), nbytes, src_pos, 7)
    assert (tmp_path / "dst").read_bytes()[7:7 + nbytes] == data[src_pos:src_pos + nbytes]


def test_copy_from_a_shard_cut_short_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x" * 100)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst, \
            pytest.raises(StepError, match="shard shrank"):
        resize._copy(dst.fileno(), src.fileno(), 64, 50, 0)


def test_duplicate_content_decoded_once(tmp_path: Path) -> None:
    f = _dataset(tmp_path, 1)[0]
    images, summary = _run(tmp_path, [f, f], _cfg(size=16))
    assert (summary["decoded"], summary["cached"]) == (1, 1)
    assert np.array_equal(images[0], images[1])


def _key(f: Path, size: int = 16, channels: int = 3) -> str:
    return resize.cache_key(sha256_file(f), size, channels)


def test_cut_shard_tail_is_decoded_again(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 3)
    cfg = _cfg(size=16)
    _run(tmp_path, files, cfg)
    entries = resize.cache_lookup(tmp_path / "cache", [_key(f) for f in files])
    last = max(entries.values(), key=lambda e: e.offset)
    with open(last.shard, "r+b") as shard:  # the disk lost the end of the shard
        shard.truncate(last.offset + 5)
    images, summary = _run(tmp_path, files, cfg)
    assert (summary["decoded"], summary["cached"]) == (1, 2)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, resize.load_resized(f, size=16, channels=3))
    assert len(resize.cache_lookup(tmp_path / "cache", [_key(f) for f in files])) == 3


def test_bytes_without_index_records_at_a_shard_end_are_harmless(tmp_path: Path) -> None:
    """A crash between writing an entry and committing its record leaves a tail nobody reads."""
    files = _dataset(tmp_path, 3)
    cfg = _cfg(size=16)
    first, _ = _run(tmp_path, files[:2], cfg)
    for shard in (tmp_path / "cache" / resize.SHARDS_DIR).iterdir():  # one per worker thread
        with open(shard, "ab") as f:
            f.write(b"\xff" * 1000)  # half an entry
    images, summary = _run(tmp_path, files, cfg)
    assert (summary["decoded"], summary["cached"]) == (1, 2)
    assert np.array_equal(images[:2], first)
    assert np.array_equal(images[2], resize.load_resized(files[2], size=16, channels=3))


@pytest.mark.parametrize("n", [4, pytest.param(POOL + 4, marks=pytest.mark.slow)])
def test_cache_layout_one_shard_per_worker_of_a_run_that_decodes(tmp_path: Path, n: int) -> None:
    files = _dataset(tmp_path, n)
    cfg = _cfg(size=16, channels=1, workers=2)  # threads for 4 images, processes for 12
    shards = tmp_path / "cache" / resize.SHARDS_DIR
    _run(tmp_path, files[:-1], cfg)
    first = {p.name for p in shards.iterdir()}
    assert 1 <= len(first) <= 2 and len({name.split("-")[0] for name in first}) == 1  # one run
    assert (tmp_path / "cache" / resize.INDEX_NAME).is_file()
    _run(tmp_path, files[:-1], cfg)  # everything cached: no new shard
    assert {p.name for p in shards.iterdir()} == first
    _, summary = _run(tmp_path, files, cfg)
    assert summary["decoded"] == 1 and len(list(shards.iterdir())) == len(first) + 1
    entries = resize.cache_lookup(tmp_path / "cache", [_key(f, 16, 1) for f in files])
    assert len(entries) == n and {e.nbytes for e in entries.values()} == {16 * 16}
    # leftovers of the sqlite journal are gone once the run closed the index
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [resize.INDEX_NAME, resize.SHARDS_DIR]


def test_cache_forget_makes_the_next_run_decode_those(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 3)
    _run(tmp_path, files, _cfg(size=16))
    assert resize.cache_forget(tmp_path / "cache", [_key(files[0]), _key(files[0]), "nope"]) == 1
    _, summary = _run(tmp_path, files, _cfg(size=16))
    assert (summary["decoded"], summary["cached"]) == (1, 2)
    assert resize.cache_lookup(tmp_path / "nothing", [_key(files[0])]) == {}


_CRASHING_CALLER = """
import multiprocessing, os, sys
sys.path[:0] = {paths!r}
from medflow.imaging import resize
from medflow.config import parse_config
resize._COMMIT_EVERY = 2
resize.POOL_MIN_IMAGES = {pool}
record = resize._IndexWriter.record
calls = []
def crash_on_fourth(self, *entry):
    calls.append(entry)
    if len(calls) == 4:
        for worker in multiprocessing.active_children():  # orphaned workers would wait forever
            worker.kill()
        os._exit(3)  # a hard crash of the step: no finally block, no commit
    record(self, *entry)
resize._IndexWriter.record = crash_on_fourth
cfg = parse_config({{"dataset": {{"name": "t", "sources": ["x"], "labels": {{"a": 0, "b": 1}}}},
                    "resize": {{"size": 16, "workers": {workers}}}}})
resize.run(cfg, clean={clean!r}, out={out!r}, stats={stats!r}, cache={cache!r})
"""


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: about 5 s
def test_hard_crash_keeps_only_committed_entries(tmp_path: Path, workers: int) -> None:
    files = _dataset(tmp_path, POOL + 1)
    clean = _clean_csv(tmp_path / "clean.csv", files)
    script = tmp_path / "crash.py"
    script.write_text(_CRASHING_CALLER.format(
        paths=[str(Path(resize.__file__).parents[1]), str(Path(__file__).parent)], workers=workers, pool=POOL,
        clean=str(clean), out=str(tmp_path / "out" / "images.npy"), stats=str(tmp_path / "out" / "s.json"),
        cache=str(tmp_path / "cache")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "images.npy").exists()  # (its temporary file stays: nobody removed it)
    # 3 or more entries written, records committed after the 2nd: exactly 2 count
    assert len(resize.cache_lookup(tmp_path / "cache", [_key(f, 16, 1) for f in files])) == 2
    images, summary = _run(tmp_path, files, _cfg(size=16, channels=1, workers=workers))
    assert (summary["decoded"], summary["cached"]) == (len(files) - 2, 2)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, resize.load_resized(f, size=16, channels=1))


def test_error_mid_run_keeps_what_was_decoded(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 6)
    clean = _clean_csv(tmp_path / "clean.csv", files)
    good = files[3].read_bytes()
    files[3].write_bytes(b"broken")
    with pytest.raises(StepError, match=files[3].name):  # one thread: rows decoded in order, 0-2 done
        resize.run(_cfg(size=16), clean=clean, out=tmp_path / "out" / "images.npy",
                   stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache")
    files[3].write_bytes(good)
    _, summary = _run(tmp_path, files, _cfg(size=16))
    assert (summary["decoded"], summary["cached"]) == (3, 3)


def test_damaged_index_starts_a_new_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _dataset(tmp_path, 2)
    first, _ = _run(tmp_path, files, _cfg(size=16))
    index = tmp_path / "cache" / resize.INDEX_NAME
    index.write_bytes(b"this is not an SQLite database" * 200)  # what a power loss can leave
    images, summary = _run(tmp_path, files, _cfg(size=16))
    assert summary["decoded"] == 2 and np.array_equal(images, first)
    assert "damaged resize cache index" in caplog.text and str(index) in caplog.text
    assert len(list((tmp_path / "cache" / resize.SHARDS_DIR).iterdir())) == 1  # the old shard is gone
    _, again = _run(tmp_path, files, _cfg(size=16))
    assert again["cached"] == 2


def test_locked_index_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _dataset(tmp_path, 1)
    _run(tmp_path, files, _cfg(size=16))
    monkeypatch.setattr(resize, "_INDEX_TIMEOUT_S", 0.05)
    holder = sqlite3.connect(tmp_path / "cache" / resize.INDEX_NAME)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing to the same cache, for too long
    try:
        with pytest.raises(StepError, match=f"{resize.INDEX_NAME}: cannot use the resize cache index.*locked"):
            _run(tmp_path, files, _cfg(size=16))
    finally:
        holder.close()
    assert (tmp_path / "cache" / resize.INDEX_NAME).is_file()  # a busy index is never taken for damaged


def test_runs_coalesce_rows_contiguous_in_output_and_shard() -> None:
    e = resize.CacheEntry
    rows = [(0, e("a", 0, 10)), (1, e("a", 10, 10)), (2, e("a", 20, 10)),  # one run
            (3, e("b", 30, 10)),  # other shard
            (4, e("b", 50, 10)),  # gap in the shard
            (6, e("b", 60, 10))]  # gap in the output
    assert [(r, x.shard, x.offset, n) for r, x, n in resize._runs(rows)] == [
        (0, "a", 0, 3), (3, "b", 30, 1), (4, "b", 50, 1), (6, "b", 60, 1)]
    assert list(resize._runs([])) == []


def test_chunks_in_row_order_and_shrinking() -> None:
    jobs = [resize._Job(f"k{i}", f"p{i}", None) for i in range(100)]
    chunks = resize._chunks(jobs, workers=2)
    sizes = [len(c) for c in chunks]
    assert sizes[0] == 100 // (4 * 2) and sizes[-4:] == [1, 1, 1, 1] and sizes == sorted(sizes, reverse=True)
    assert [j for c in chunks for j in c] == jobs
    assert resize._chunks([], workers=2) == []


def test_chunks_sized_by_cost() -> None:
    """Ten costly images first (a class of large X-rays sorted first): they do not all go in one chunk."""
    costs = [10.0] * 10 + [1.0] * 90
    chunks = resize._chunks(list(range(100)), workers=2, cost=lambda i: costs[i])
    spent = [sum(costs[i] for i in c) for c in chunks]
    assert len(chunks[0]) == 2 and spent[0] <= sum(costs) / 8  # 190 / 8: two costly images
    assert [i for c in chunks for i in c] == list(range(100)) and len(chunks[-1]) == 1
    assert resize._chunks([7], workers=4, cost=lambda _: 1e12) == [[7]]  # one item over budget: alone


def test_pool_incremental_run_decodes_exactly_the_new_images(tmp_path: Path) -> None:
    files = _dataset(tmp_path, POOL + 3)
    cfg = _cfg(size=16, channels=1, workers=2)
    _, first = _run(tmp_path, files[:-1] + [files[0]], cfg)  # a duplicate row too
    assert (first["decoded"], first["cached"], first["workers"]) == (len(files) - 1, 1, 2)
    images, second = _run(tmp_path, files, cfg)
    assert (second["decoded"], second["cached"]) == (1, len(files) - 1)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, resize.load_resized(f, size=16, channels=1))


def test_process_pool_matches_in_process_decoding(tmp_path: Path) -> None:
    files = _dataset(tmp_path, POOL + 2)
    images, summary = _run(tmp_path, files, _cfg(size=16, channels=3, workers=2))
    assert summary["workers"] == 2 and summary["decoded"] == len(files)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, resize.load_resized(f, size=16, channels=3))


def test_a_handful_of_new_images_decoded_by_threads(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 3)
    images, summary = _run(tmp_path, files, _cfg(size=16, workers=2))
    assert summary["workers"] == 2 and summary["decoded"] == 3
    assert np.array_equal(images[2], resize.load_resized(files[2], size=16, channels=3))


def test_workers_do_not_rerun_the_callers_main_module(tmp_path: Path) -> None:
    """The caller's script runs once, even without a __main__ guard (see medflow.imaging.workers.main_hidden)."""
    files = _dataset(tmp_path, POOL)
    clean = _clean_csv(tmp_path / "clean.csv", files)
    marker = tmp_path / "imported.txt"
    script = tmp_path / "caller.py"
    script.write_text(f"""
import sys
sys.path[:0] = {[str(Path(resize.__file__).parents[1])]!r}
with open({str(marker)!r}, "a") as f:
    f.write("x")
from medflow.imaging import resize
from medflow.config import parse_config
resize.POOL_MIN_IMAGES = {POOL}
cfg = parse_config({{"dataset": {{"name": "t", "sources": ["x"], "labels": {{"a": 0, "b": 1}}}},
                    "resize": {{"size": 16, "workers": 2}}}})
s = resize.run(cfg, clean={str(clean)!r}, out={str(tmp_path / "o.npy")!r}, stats={str(tmp_path / "s.json")!r},
               cache={str(tmp_path / "cache")!r})
assert s["workers"] == 2 and s["decoded"] == {len(files)}, s
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "x"
    assert np.load(tmp_path / "o.npy").shape == (len(files), 16, 16, 1)


def test_reduced_decodes_counted(tmp_path: Path) -> None:
    big = _save(tmp_path / "big.jpg", _texture(400, 600), quality=90)  # decoded at 2/8: 150 x 100
    _, summary = _run(tmp_path, [big, _dataset(tmp_path, 1)[0]], _cfg(size=64, channels=1))
    assert summary["reduced_decodes"] == 1 and summary["decoded"] == 2


def test_workers_start_without_pandas() -> None:
    """Worker processes import this module: it must not drag pandas in (about 1 s per process)."""
    code = "import sys, medflow.imaging.resize; sys.exit('pandas' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------------------
# error paths: each names the file or column, and leaves no output behind
# ---------------------------------------------------------------------------------------------------------


def _assert_no_output(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize(("workers", "bad_row"), [(1, 3), (2, 0), (2, POOL - 1)])  # row 0: this process
def test_undecodable_file_names_it_and_leaves_no_output(tmp_path: Path, workers: int, bad_row: int) -> None:
    files = _dataset(tmp_path, POOL)
    bad = files[bad_row]
    clean = _clean_csv(tmp_path / "clean.csv", files)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # broken after the manifest was made
    with pytest.raises(StepError, match=bad.name):
        resize.run(_cfg(size=16, workers=workers), clean=clean, out=tmp_path / "out" / "images.npy",
                   stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache")
    _assert_no_output(tmp_path)


def test_truncated_jpeg_is_an_error(tmp_path: Path) -> None:
    f = _save(tmp_path / "t.jpg", _texture(200, 300), quality=90)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(StepError, match="t.jpg.*truncated"):
        resize.load_resized(f, size=32, channels=1)


def test_not_an_image_without_header_facts(tmp_path: Path) -> None:
    f = tmp_path / "notes.jpg"
    f.write_text("not an image")
    with pytest.raises(StepError, match="notes.jpg"):
        resize.load_resized(f, size=32, channels=1)


def test_missing_file_names_it(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 2)
    clean = _clean_csv(tmp_path / "clean.csv", files)
    files[0].unlink()
    with pytest.raises(StepError, match=files[0].name):
        resize.run(_cfg(size=16), clean=clean, out=tmp_path / "out" / "images.npy",
                   stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache")
    _assert_no_output(tmp_path)


def test_failed_run_keeps_previous_output(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 2)
    before, _ = _run(tmp_path, files, _cfg(size=16))
    files[1].write_bytes(b"broken")
    clean = _clean_csv_raw(tmp_path / "clean2.csv", files, sha="f" * 64)
    with pytest.raises(StepError):
        resize.run(_cfg(size=16), clean=clean, out=tmp_path / "out" / "images.npy",
                   stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache")
    assert np.array_equal(np.load(tmp_path / "out" / "images.npy"), before)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images.npy", "stats.json"]


def _clean_csv_raw(dest: Path, files: list[Path], sha: str) -> Path:
    """A clean.csv with unknown header facts and one fixed digest (forces a decode of every row)."""
    df = pd.DataFrame({c: [""] * len(files) for c in CLEAN_COLUMNS})
    df["path"] = [str(f) for f in files]
    df["sha256"] = [sha[:-2] + f"{i:02d}" for i in range(len(files))]
    write_csv(dest, df)
    return dest


def test_dead_worker_becomes_a_step_error() -> None:
    def results() -> Iterator[resize._Decoded]:
        yield resize._Decoded("k", True, "s.bin", 0)
        raise BrokenProcessPool("a worker was killed")

    got = resize._unbroken(results())
    assert next(got) == ("k", True, "s.bin", 0)
    with pytest.raises(StepError, match=r"worker process died.*resize.workers: 1"):
        next(got)


def test_unwritable_cache_names_it(tmp_path: Path) -> None:
    files = _dataset(tmp_path, 1)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(StepError, match="cache.*cannot write to the resize cache"):
        _run(tmp_path, files, _cfg(size=16))
    _assert_no_output(tmp_path)


def test_missing_column_and_empty_table(tmp_path: Path) -> None:
    no_sha = tmp_path / "no_sha.csv"
    write_csv(no_sha, pd.DataFrame({"path": ["a.png"], "width": [1]}))
    kw = {"out": tmp_path / "out" / "images.npy", "stats": tmp_path / "out" / "s.json",
          "cache": tmp_path / "c"}
    with pytest.raises(StepError, match="no_sha.csv: missing column.*sha256"):
        resize.run(_cfg(), clean=no_sha, **kw)
    empty = tmp_path / "empty.csv"
    write_csv(empty, pd.DataFrame(columns=CLEAN_COLUMNS))
    with pytest.raises(StepError, match="empty.csv: no images"):
        resize.run(_cfg(), clean=empty, **kw)
    with pytest.raises(StepError, match="absent.csv"):
        resize.run(_cfg(), clean=tmp_path / "absent.csv", **kw)
    _assert_no_output(tmp_path)


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
        images, summary = _run(tmp_path, files, _cfg(size=64, channels=channels, workers=0),
                               name=f"clean{channels}.csv")
        assert images.shape == (len(files), 64, 64, channels) and summary["decoded"] == len(files)
        assert (images.reshape(len(files), -1).std(axis=1) > 5).all()  # every slice has content

"""Tests for medflow.imaging.decode: the one preprocessing (formats, modes, orientation, scale, errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import shared_dataset
from PIL import Image, ImageOps
from resize_helpers import save_image, solid, texture

from medflow.errors import StepError
from medflow.imaging import decode

# ---------------------------------------------------------------------------------------------------------
# formats, modes, orientation, scale
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
    assert decode.jpeg_scale(w, h, size) == eighths


@pytest.mark.parametrize(("w", "h"), [(600, 1000), (1000, 600), (447, 900), (1791, 2000), (700, 90)])
def test_jpeg_decoded_at_the_documented_scale(w: int, h: int) -> None:
    """What libjpeg-turbo picks for a minimum output size is the scale jpeg_scale documents."""
    data = cv2.imencode(".jpg", texture(h, w)[..., 0])[1].tobytes()
    m = decode.jpeg_scale(w, h, 224)
    assert decode._decode_jpeg(data, 1, 224, "x").shape == (-(-h * m // 8), -(-w * m // 8), 1)


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
    assert decode.jpeg_orientation(b"\xff\xd8" + jfif + exif + sos) == 7
    assert decode.jpeg_orientation(b"\xff\xd8" + jfif + sos + exif) == 1  # after the scan: not the image's
    assert decode.jpeg_orientation(b"\xff\xd8" + exif[:30]) == 1  # cut short: no crash, upright
    assert decode.jpeg_orientation(b"\xff\xd8" + app1(_exif(7, order, tag=0x0113)) + sos) == 1
    assert decode.jpeg_orientation(b"\xff\xd8" + app1(_exif(9, order)) + sos) == 1  # not an orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    f = save_image(tmp_path / "o.jpg", texture(240, 400), quality=95, exif=exif.tobytes())
    assert decode.jpeg_orientation(f.read_bytes()) == orientation
    with Image.open(f) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    want = cv2.resize(upright, (64, 48), interpolation=cv2.INTER_AREA)
    got = cv2.resize(decode.load_resized(f, size=96, channels=3), (64, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(got.astype(int) - want).mean() < 3  # a mis-turned image is tens of levels off


def test_rgb_order_and_grayscale(tmp_path: Path) -> None:
    red = solid((255, 0, 0))
    for f in (save_image(tmp_path / "red.png", red), save_image(tmp_path / "red.jpg", red, quality=100)):
        rgb = decode.load_resized(f, size=16, channels=3)
        assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
        assert rgb[..., 0].min() >= 250 and rgb[..., 1:].max() <= 5, f
        gray = decode.load_resized(f, size=16, channels=1)
        assert gray.shape == (16, 16, 1)
        assert abs(int(gray.mean()) - 76) <= 2, f  # ITU-R 601 luma of pure red


def test_grayscale_source_replicated_to_three_channels(tmp_path: Path) -> None:
    f = save_image(tmp_path / "g.png", np.full((20, 30), 77, np.uint8))
    assert (decode.load_resized(f, size=8, channels=3) == 77).all()


def test_gray_jpeg_in_three_channels_is_the_replicated_one_channel_result(tmp_path: Path) -> None:
    f = save_image(tmp_path / "xray.jpg", texture(500, 400)[..., 0], quality=90)  # mode L, factor 2 at 96
    one = decode.load_resized(f, size=96, channels=1)
    three = decode.load_resized(f, size=96, channels=3)
    assert three.shape == (96, 96, 3) and all(np.array_equal(three[..., c:c + 1], one) for c in range(3))


def test_colour_jpeg_to_one_channel_is_luma(tmp_path: Path) -> None:
    f = save_image(tmp_path / "c.jpg", texture(300, 300), quality=95)
    rgb = decode.load_resized(f, size=64, channels=3)
    gray = decode.load_resized(f, size=64, channels=1)[..., 0]
    assert np.abs(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int) - gray).mean() < 1.5


def test_jpeg_with_trailing_bytes_after_the_end_marker_decodes(tmp_path: Path) -> None:
    f = save_image(tmp_path / "tail.jpg", texture(100, 120), quality=90)
    clean = decode.load_resized(f, size=32, channels=3)
    f.write_bytes(f.read_bytes() + b"\x00" * 500)  # padding some cameras and editors append
    assert np.array_equal(decode.load_resized(f, size=32, channels=3), clean)


def test_32bit_and_float_modes_scaled_by_their_own_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(-5.0, 20.0, 32, dtype=np.float32), (32, 1))
    f = tmp_path / "f.tif"
    Image.fromarray(ramp, "F").save(f)
    i = tmp_path / "i.tif"
    Image.fromarray((ramp * 1000).astype(np.int32), "I").save(i)
    for path in (f, i):
        got = decode.load_resized(path, size=32, channels=1)[..., 0]
        assert got[:, 0].max() == 0 and got[:, -1].min() == 255, path


def test_bilevel_png(tmp_path: Path) -> None:
    f = tmp_path / "b.png"
    Image.fromarray(np.eye(16, dtype=bool)).save(f)
    got = decode.load_resized(f, size=16, channels=1)[..., 0]
    assert np.array_equal(got, np.eye(16, dtype=np.uint8) * 255)


def _oriented_pair(tmp_path: Path, ext: str) -> tuple[Path, np.ndarray]:
    """A 240x400 image tagged with EXIF orientation 6 (display = rotate 90 degrees clockwise)."""
    arr = texture(240, 400)
    arr[:40] = (255, 0, 0)  # a red band along the stored top edge: displayed on the right
    exif = Image.Exif()
    exif[0x0112] = 6
    extra: dict[str, Any] = {"quality": 95} if ext == ".jpg" else {}
    f = save_image(tmp_path / f"rot{ext}", arr, exif=exif.tobytes(), **extra)
    return f, np.rot90(arr, k=-1)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_exif_rotated_image_comes_out_upright(tmp_path: Path, ext: str) -> None:
    f, upright = _oriented_pair(tmp_path, ext)
    with Image.open(f) as im:
        assert im.getexif()[0x0112] == 6
    got = decode.load_resized(f, size=64, channels=3)  # JPEG: factor 2 (240 / 2 >= 64), a reduced decode
    want = cv2.resize(upright, (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(got.astype(int) - want).mean() < 4
    assert got[:, -4:, 0].min() > 200 and got[:, :8, 0].mean() < 200  # red band on the right


def test_16bit_png_scaled_by_its_own_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(100, 4095, 64).astype(np.uint16), (64, 1))  # 12-bit data in 16 bits
    f = save_image(tmp_path / "ramp16.png", ramp)
    with Image.open(f) as im:
        assert im.mode.startswith("I")
    got = decode.load_resized(f, size=64, channels=1)[..., 0]
    assert got[:, 0].tolist() == [0] * 64 and got[:, -1].tolist() == [255] * 64
    assert np.all(np.diff(got[0].astype(int)) >= 0)  # monotonic: no wrap-around
    flat = save_image(tmp_path / "flat16.png", np.full((20, 20), 3000, np.uint16))
    assert (decode.load_resized(flat, size=8, channels=1) == 0).all()


def test_palette_png_to_rgb_and_transparent_index_to_black(tmp_path: Path) -> None:
    im = Image.new("P", (20, 10))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    im.paste(1, (10, 0, 20, 10))  # right half: index 1 (blue)
    opaque, clear = tmp_path / "pal.png", tmp_path / "pal_t.png"
    im.save(opaque)
    im.save(clear, transparency=1)
    got = decode.load_resized(opaque, size=10, channels=3)
    assert tuple(got[5, 1]) == (255, 0, 0) and tuple(got[5, 8]) == (0, 0, 255)
    got_t = decode.load_resized(clear, size=10, channels=3)
    assert tuple(got_t[5, 1]) == (255, 0, 0) and tuple(got_t[5, 8]) == (0, 0, 0)


def test_rgba_png_composited_over_black(tmp_path: Path) -> None:
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :10, 3] = 255  # left opaque
    rgba[:, 10:, 3] = 128  # right half-transparent
    f = save_image(tmp_path / "a.png", rgba, "RGBA")
    got = decode.load_resized(f, size=10, channels=3)  # 20x10 -> 10x10 stretches columns 2:1
    assert tuple(got[5, 1]) == (200, 0, 0)
    assert abs(int(got[5, 8, 0]) - 100) <= 1 and got[5, 8, 1:].max() == 0
    la_arr = np.dstack([np.full((8, 8), 200, np.uint8), np.zeros((8, 8), np.uint8)])  # fully transparent
    la = save_image(tmp_path / "la.png", la_arr, "LA")
    assert (decode.load_resized(la, size=8, channels=1) == 0).all()


def test_cmyk_jpeg_to_rgb(tmp_path: Path) -> None:
    f = tmp_path / "cmyk.jpg"
    Image.fromarray(solid((0, 0, 255))).convert("CMYK").save(f, quality=100)
    got = decode.load_resized(f, size=8, channels=3)
    assert got[..., 2].min() > 240 and got[..., :2].max() < 15


def test_reduced_decode_close_to_full_decode_reference(tmp_path: Path) -> None:
    f = save_image(tmp_path / "big.jpg", texture(1200, 1600, seed=3), quality=90)
    assert decode.jpeg_scale(1600, 1200, 100) == 1  # decoded at 1/8: 200 x 150
    got = decode.load_resized(f, size=100, channels=3)
    full = np.asarray(Image.open(f).convert("RGB"))
    want = cv2.resize(full, (100, 100), interpolation=cv2.INTER_AREA)
    # DCT-domain scaling is a slightly different low-pass than a box average: about 1 grey level apart
    assert np.abs(got.astype(int) - want).mean() < 2.5


def test_decode_resized_bytes_equals_load_resized(tmp_path: Path) -> None:
    f = save_image(tmp_path / "t.jpg", texture(300, 500), quality=90)
    got = decode.decode_resized(f.read_bytes(), size=48, channels=1, name="upload")
    assert np.array_equal(got, decode.load_resized(f, size=48, channels=1))

# ---------------------------------------------------------------------------------------------------------
# error paths: each names the file
# ---------------------------------------------------------------------------------------------------------


def test_truncated_jpeg_is_an_error(tmp_path: Path) -> None:
    f = save_image(tmp_path / "t.jpg", texture(200, 300), quality=90)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(StepError, match="t.jpg.*truncated"):
        decode.load_resized(f, size=32, channels=1)


def test_not_an_image_without_header_facts(tmp_path: Path) -> None:
    f = tmp_path / "notes.jpg"
    f.write_text("not an image")
    with pytest.raises(StepError, match="notes.jpg"):
        decode.load_resized(f, size=32, channels=1)

# ---------------------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------------------


def _covid_ct_slice(short_sides: range) -> Image.Image:
    """A real COVID-CT slice stored as RGBA (opaque, grey content), short side in ``short_sides``."""
    for f in sorted(shared_dataset("covid_ct").rglob("*.png")):
        with Image.open(f) as im:
            if im.mode == "RGBA" and min(im.size) in short_sides:
                rgba = np.asarray(im)
                if rgba[..., 3].min() == 255 and (rgba[..., :3] == rgba[..., :1]).all():
                    return im.copy()
    pytest.skip(f"no opaque grey RGBA COVID-CT slice with a short side in {short_sides}")


def _stored_as(tmp_path: Path, rgba: Image.Image) -> dict[str, Path]:
    """The same slice as RGBA, RGB and L PNGs (lossless) and as RGB and L JPEGs at quality 95."""
    files = {}
    for mode in ("RGBA", "RGB", "L"):
        files[f"PNG {mode}"] = tmp_path / f"{mode}.png"
        rgba.convert(mode).save(files[f"PNG {mode}"])
    for mode in ("RGB", "L"):
        files[f"JPEG {mode}"] = tmp_path / f"{mode}.jpg"
        rgba.convert(mode).save(files[f"JPEG {mode}"], quality=95)
    return files


def _gaps(files: dict[str, Path], channels: int) -> dict[str, tuple[float, int]]:
    """Mean and largest absolute difference of each file's model input from the RGBA PNG's."""
    ref = decode.load_resized(files["PNG RGBA"], size=224, channels=channels).astype(int)
    gaps = {}
    for name, f in files.items():
        diff = np.abs(decode.load_resized(f, size=224, channels=channels).astype(int) - ref)
        gaps[name] = float(diff.mean()), int(diff.max())
    return gaps


# JPEG at quality 95 moves a pixel of these slices by a few grey levels once area-resized to 224 (measured
# on the COVID-CT RGBA slices: mean 0.5-0.9, largest 4-7); these bounds leave room for other libjpeg builds,
# while a mode mix-up (BGR order, alpha not composited, grey not replicated) is tens of levels off.
_JPEG_MEAN, _JPEG_MAX = 1.0, 12


@pytest.mark.integration
@pytest.mark.parametrize("channels", [1, 3])
def test_covid_ct_format_and_mode_do_not_change_the_model_input(tmp_path: Path, channels: int) -> None:
    """COVID-CT mixes PNG and JPEG, L, RGB and RGBA, and format and mode are confounded with the label
    (nearly all JPEGs are non-COVID, all RGBA PNGs COVID): if they changed the model input, a model could
    learn the file format. The same slice stored each way must give the same input: bit for bit when
    lossless, within JPEG quantisation otherwise. A slice whose JPEG is decoded in full at 224 (short side
    224-255); the reduced-DCT path is the test below."""
    files = _stored_as(tmp_path, _covid_ct_slice(range(224, 256)))
    gaps = _gaps(files, channels)
    assert all(gaps[name] == (0.0, 0) for name in ("PNG RGB", "PNG L")), gaps
    assert all(gaps[name][0] <= _JPEG_MEAN and gaps[name][1] <= _JPEG_MAX for name in ("JPEG RGB", "JPEG L")), gaps


@pytest.mark.integration
@pytest.mark.xfail(strict=True, reason="a JPEG decoded at a reduced DCT scale is low-passed differently from a "
                   "PNG's area resize: on the 124 COVID-CT slices with a short side >= 256, 2.7 grey levels "
                   "from it on average (worst slice 7.9, pixels up to 191) vs 0.3 for a DCT decode to at least "
                   "2 x size; fixing it changes the preprocessing (RESIZE_VERSION)")
def test_covid_ct_reduced_jpeg_decode_matches_the_png_input(tmp_path: Path) -> None:
    files = _stored_as(tmp_path, _covid_ct_slice(range(256, 10_000)))
    gaps = _gaps(files, channels=1)
    assert all(gaps[name][0] <= _JPEG_MEAN and gaps[name][1] <= _JPEG_MAX for name in ("JPEG RGB", "JPEG L")), gaps

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
    (600, 1000, 224, 4),    # 3/8 (225 x 375) would do, but is no block mean: 4/8, 300 x 500
    (500, 448, 224, 4),     # both sides count: 448 * 2 / 8 = 112
    (447, 900, 224, 4),     # ceil(447 / 2) = 224
    (446, 900, 224, 8),     # 223 at 4/8: no reduction (the old 5/8 scale is gone)
    (100, 100, 224, 8),     # smaller than the output: full decode, then enlarged
])
def test_jpeg_scale(w: int, h: int, size: int, eighths: int) -> None:
    assert decode.jpeg_scale(w, h, size) == eighths


@pytest.mark.parametrize(("w", "h"), [(600, 1000), (1000, 600), (447, 900), (1791, 2000), (700, 90)])
def test_jpeg_decoded_at_the_documented_scale(w: int, h: int) -> None:
    """What libjpeg-turbo picks for a minimum output size is the scale jpeg_scale documents."""
    data = cv2.imencode(".jpg", texture(h, w)[..., 0])[1].tobytes()
    m = decode.jpeg_scale(w, h, 224)
    img, reduced = decode._decode_jpeg(data, 1, 224, "x")
    assert img.shape == (-(-h * m // 8), -(-w * m // 8), 1) and reduced == (m < 8)


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


def test_block_reduce_is_the_mean_of_edge_padded_blocks() -> None:
    img = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7) * 7
    got = decode.block_reduce(img, 4)
    padded = np.pad(img.astype(float), ((0, 3), (0, 1)), mode="edge")
    want = padded.reshape(2, 4, 2, 4).mean(axis=(1, 3))
    assert got.shape == (2, 2) and np.abs(got - want).max() <= 0.5
    assert decode.block_reduce(img[:, :, None], 2).shape == (3, 4, 1)  # a channel axis is kept
    assert decode.block_reduce(img, 1) is img


def _with_text(arr: np.ndarray) -> np.ndarray:
    """``arr`` with burned-in white and black text lines, as on X-rays: edges where low-passes differ."""
    out = arr.copy()
    for row in range(40, out.shape[0] - 20, 90):
        cv2.putText(out, "R 12 AP PORTABLE", (15, row), cv2.FONT_HERSHEY_SIMPLEX, 1.1, (255, 255, 255), 2)
        cv2.putText(out, "L", (out.shape[1] // 2, row + 40), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (0, 0, 0), 3)
    return out


# The same image stored as PNG and as JPEG must give the same model input up to JPEG quantisation. JPEG at
# quality 95 alone (full decodes) moves the 224 px input of the COVID-CT slices by 0.27 grey levels on
# average (worst slice 0.87, single pixels 5 in gray; up to 12 in colour, where 4:2:0 chroma subsampling
# blurs the red arrows of paper figures); these bounds leave room for other libjpeg builds, while a
# preprocessing that depends on the format (a non-block-mean DCT scale: 2.7 on average, pixels up to 191;
# BGR order, alpha not composited) is tens of levels off.
_JPEG_MEAN, _JPEG_MAX = 1.0, 12
# A gray JPEG decoded at scale 1/k against the PNG of the very pixels its full decode gives: only the
# rounding and clamping of the DCT-domain block mean differ (0.10 grey levels on average on the 120
# full-resolution Kermany X-rays, worst image 0.17, single pixels on burned-in text up to 8).
_SAME_PIXELS_MEAN, _SAME_PIXELS_MAX = 0.3, 10
# Sizes for each reduction at 224 px, none a multiple of the block: the partial blocks count too.
_SCALES = [(1900, 1801, 1), (1203, 901, 2), (803, 611, 4), (440, 600, 8)]


def _gap(a: Path, b: Path, channels: int) -> tuple[float, int]:
    """Mean and largest absolute difference between two files' model inputs at 224 px."""
    diff = np.abs(decode.load_resized(a, size=224, channels=channels).astype(int)
                  - decode.load_resized(b, size=224, channels=channels))
    return float(diff.mean()), int(diff.max())


@pytest.mark.parametrize(("w", "h", "eighths"), _SCALES)
@pytest.mark.parametrize("kind", ["L text", "RGB 4:4:4 text", "RGB 4:2:0"])
def test_png_and_jpeg_of_one_image_give_the_same_input_at_every_scale(tmp_path: Path, w: int, h: int,
                                                                        eighths: int, kind: str) -> None:
    """Burned-in text is where low-passes differ; not with 4:2:0 chroma, whose subsampling alone moves
    white text on saturated colours by tens of levels in a full decode too."""
    arr = texture(h, w, seed=3)
    arr = _with_text(arr) if "text" in kind else arr
    arr = arr[..., 0] if kind.startswith("L") else arr
    png = save_image(tmp_path / "a.png", arr)
    jpg = save_image(tmp_path / "a.jpg", arr, quality=95, subsampling="4:4:4" if "4:4:4" in kind else "4:2:0")
    assert decode.jpeg_scale(w, h, 224) == eighths
    for channels in (1, 3):
        mean, worst = _gap(jpg, png, channels)
        assert mean <= _JPEG_MEAN and worst <= _JPEG_MAX, (channels, mean, worst)


@pytest.mark.parametrize(("w", "h", "eighths"), _SCALES)
def test_reduced_gray_jpeg_is_the_png_of_its_own_pixels(tmp_path: Path, w: int, h: int, eighths: int) -> None:
    f = save_image(tmp_path / "x.jpg", _with_text(texture(h, w, seed=4))[..., 0], quality=90)
    png = save_image(tmp_path / "x.png", np.asarray(Image.open(f)))  # the JPEG's own pixels, lossless
    mean, worst = _gap(f, png, channels=1)
    assert mean <= _SAME_PIXELS_MEAN and worst <= _SAME_PIXELS_MAX, (eighths, mean, worst)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_reduced_jpeg_blocks_align_with_the_png_blocks_under_exif_rotation(tmp_path: Path,
                                                                         orientation: int) -> None:
    """Both decoders reduce in the stored orientation, then turn upright, so their blocks coincide."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    arr = _with_text(texture(901, 1203, seed=5))[..., 0]  # 1203 x 901 stored: 2/8, partial blocks
    f = save_image(tmp_path / "r.jpg", arr, quality=95, exif=exif.tobytes())
    png = save_image(tmp_path / "r.png", np.asarray(Image.open(f)), exif=exif.tobytes())
    mean, worst = _gap(f, png, channels=1)
    assert mean <= _SAME_PIXELS_MEAN and worst <= _SAME_PIXELS_MAX, (mean, worst)


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
        rgba.convert(mode).save(files[f"PNG {mode}"], compress_level=1)  # lossless at any level; fast
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


@pytest.mark.integration
@pytest.mark.parametrize("channels", [1, 3])
def test_covid_ct_format_and_mode_do_not_change_the_model_input(tmp_path: Path, channels: int) -> None:
    """COVID-CT mixes PNG and JPEG, L, RGB and RGBA, and format and mode are confounded with the label
    (nearly all JPEGs are non-COVID, all RGBA PNGs COVID): if they changed the model input, a model could
    learn the file format. The same slice stored each way must give the same input: bit for bit when
    lossless, within JPEG quantisation otherwise. One slice of short side 224-255 in each mode; every grey
    slice, the reduced DCT decode included, in the test below."""
    files = _stored_as(tmp_path, _covid_ct_slice(range(224, 256)))
    gaps = _gaps(files, channels)
    assert all(gaps[name] == (0.0, 0) for name in ("PNG RGB", "PNG L")), gaps
    assert all(gaps[name][0] <= _JPEG_MEAN and gaps[name][1] <= _JPEG_MAX for name in ("JPEG RGB", "JPEG L")), gaps


def _covid_ct_gray_slices(min_short_side: int) -> list[tuple[str, Image.Image]]:
    """Every real COVID-CT slice, whatever its format and mode, whose content is grey (R = G = B, opaque)
    and whose short side is at least ``min_short_side``: (name, the slice as RGBA)."""
    found = []
    for f in sorted(p for p in shared_dataset("covid_ct").rglob("*") if p.is_file()):
        with Image.open(f) as im:
            if min(im.size) < min_short_side:
                continue
            rgba = im.convert("RGBA")
        a = np.asarray(rgba)
        if a[..., 3].min() == 255 and (a[..., :3] == a[..., :1]).all():
            found.append((f.name, rgba))
    return found


@pytest.mark.integration
def test_covid_ct_reduced_jpeg_decode_matches_the_png_input(tmp_path: Path) -> None:
    """Grey COVID-CT slices with a short side >= 256: every one that takes the reduced DCT decode at 4/8
    (>= 448 px; 17 of 113) and a quarter of the others (a full decode at 224): the JPEG-stored input is
    within quantisation of the PNG's.
    (Before RESIZE_VERSION 3, a JPEG at any scale m/8 was 2.7 grey levels from the PNG on average, worst
    slice 7.9, pixels up to 191.)"""
    slices = _covid_ct_gray_slices(256)
    if not slices:
        pytest.skip("no grey COVID-CT slice with a short side >= 256")
    full = [s for s in slices if decode.jpeg_scale(*s[1].size, 224) == 8]
    reduced = len(slices) - len(full)
    assert reduced > 0, "no slice takes the reduced DCT path"
    in_full = {name for name, _ in full}
    slices = [s for s in slices if s[0] not in in_full] + full[::4]  # every reduced one; a sample of the rest
    bad = {}
    for i, (name, rgba) in enumerate(slices):
        folder = tmp_path / str(i)
        folder.mkdir()
        files = _stored_as(folder, rgba)
        for channels in (1, 3):
            gaps = _gaps(files, channels)
            lossless = all(gaps[k] == (0.0, 0) for k in ("PNG RGB", "PNG L"))
            lossy = all(gaps[k][0] <= _JPEG_MEAN and gaps[k][1] <= _JPEG_MAX for k in ("JPEG RGB", "JPEG L"))
            if not (lossless and lossy):
                bad[f"{name} ({channels} ch)"] = gaps
    assert not bad, f"{len(bad)} of {len(slices)} slices ({reduced} reduced): {bad}"

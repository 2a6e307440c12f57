"""DICOM support (issue 12): detection by the DICM marker, the LUTs, reject reasons, hashed patients, no PHI.

The DICOMs are written here with pydicom from real Kermany X-rays (../shared/data/chest_xray, skipped when
absent), plus the small files pydicom's wheel ships (skipped when a file is not in the wheel). Compressed:
RLE (pydicom's encoder), JPEG 2000 (pylibjpeg-openjpeg's encoder), JPEG lossless process 14 SV1 (encoded
here, :func:`lossless_jpeg`: no installed package encodes it), JPEG-LS and 12-bit JPEG extended (pydicom's files).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from conftest import shared_dataset
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medflow.config import parse_config
from medflow.data.manifest import file_groups, iter_images
from medflow.errors import StepError
from medflow.imaging import decode, dicom, quality
from medflow.imaging.limits import Decoder, InputLimits, file_item
from medflow.imaging.verdict import Limits, verdict
from medflow.io import ImageStore, read_csv, write_json
from medflow.patients import SALT_FILE, project_salt

PHI = ("Doe^Jane", "19450203", "PID-SECRET-0001", "PID-SECRET-0002")  # must never leave the DICOM files
LIMITS = Limits(max_pixels=10_000_000, min_side=16)


def xray(i: int, size: tuple[int, int] = (160, 200)) -> np.ndarray:
    """The i-th real Kermany X-ray (sorted names), grey uint8, resized to ``size`` (h, w)."""
    files = sorted(shared_dataset("chest_xray").rglob("*.jpeg"))
    img = cv2.imread(str(files[i]), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(img, size[::-1], interpolation=cv2.INTER_AREA)


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 0,
                patient_id: str | None = "PID-SECRET-0001", study: str = "", window: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None, frames: int = 1, syntax: str = ExplicitVRLittleEndian,
                with_pixels: bool = True) -> Path:
    """A single-sample DICOM file of ``pixels`` (uint8 or uint16; (frames, H, W) when frames > 1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientBirthDate, ds.Modality = PHI[0], PHI[1], "CR"
    if patient_id:
        ds.PatientID = patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    if frames > 1:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if with_pixels and syntax == JPEGLosslessSV1:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([lossless_jpeg(pixels, int(ds.BitsStored))])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    elif with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def lossless_jpeg(img: np.ndarray, precision: int) -> bytes:
    """A JPEG lossless codestream of a grey image (ITU T.81 process 14, selection value 1: each sample
    predicted by its left neighbour, the first column by the sample above, the first sample by 2^(P-1)).
    The 17 difference categories get 5-bit Huffman codes 0..16 (valid, if not optimal)."""
    h, w = img.shape
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:], pred[1:, 0], pred[1:, 1:] = x[0, :-1], x[:-1, 0], x[1:, :-1]
    diffs = ((x - pred + 32767) % 65536 - 32767).ravel()  # modulo 2^16, in -32767..32768 (T.81 H.1.2.1)
    bits = []
    for d in diffs.tolist():
        ssss = abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:  # category 16 (a difference of 32768) has no extra bits
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # padded with 1-bits
    scan = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof3 = bytes([precision]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00, 0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))  # table 0: 17 codes of 5 bits
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0; Ss = predictor 1, Se = 0, Ah/Al = 0
    return b"\xff\xd8" + segment(0xC3, sof3) + segment(0xC4, dht) + segment(0xDA, sos) + scan + b"\xff\xd9"


def relabelled(path: Path, source: Path, syntax: str) -> Path:
    """``source`` with its transfer syntax changed to ``syntax`` (pixel data untouched)."""
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def shipped(name: str) -> Path:
    """One of the test files in pydicom's wheel; skip when it is not there (pydicom downloads the others)."""
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"{name} is not in pydicom's wheel")
    return path


def twelve_bit(i: int) -> np.ndarray:
    return xray(i).astype(np.uint16) * 16 + 7  # 7 .. 4087: 12 bits


# ----------------------------------------------------------------------------------------- detection


def test_found_by_the_marker_whatever_the_name(tmp_path: Path) -> None:
    img = xray(0)
    named = [write_dicom(tmp_path / n, img) for n in ("IM0001", "1.2.840.113619.2.55", "scan.dcm")]
    (tmp_path / "README").write_text("not an image, no extension")
    (tmp_path / "notes.txt").write_text("x" * 200)
    os.mkfifo(tmp_path / "fifo")  # never opened for a blocking read while looking for the marker
    (tmp_path / "zero").symlink_to("/dev/zero")
    assert list(iter_images(tmp_path)) == sorted(named)
    assert all(dicom.is_dicom(p.read_bytes()) for p in named)
    bare = tmp_path / "bare" / "nopreamble.dcm"  # a data set without preamble and DICM: not read, and said so
    bare.parent.mkdir()
    bare.write_bytes(named[0].read_bytes()[132:])
    v = verdict(bare.read_bytes(), LIMITS)
    assert v.reason == "not_an_image" and "DICM" in v.detail


# ----------------------------------------------------------------------------------------- pixels


def test_monochrome1_is_monochrome2_inverted(tmp_path: Path) -> None:
    raw = twelve_bit(1)
    m2 = write_dicom(tmp_path / "m2.dcm", raw, bits_stored=12)
    m1 = write_dicom(tmp_path / "m1.dcm", raw, bits_stored=12, photometric="MONOCHROME1")
    a2, a1 = dicom.decode_pixels(m2.read_bytes()), dicom.decode_pixels(m1.read_bytes())
    assert a2.dtype == np.uint8 and a2.shape == raw.shape and a2.min() == 0 and a2.max() == 255
    assert np.array_equal(a1, 255 - a2)
    r2 = decode.load_resized(m2, size=64, channels=1).astype(int)
    r1 = decode.load_resized(m1, size=64, channels=1).astype(int)
    assert np.abs(r1 - (255 - r2)).max() <= 1  # the area resize rounds each alike, up to one grey level


def test_window_after_rescale_as_the_standard_says(tmp_path: Path) -> None:
    raw = twelve_bit(2)
    rescale, window = (1.0, -1024.0), (900.0, 1600.0)  # the window is in rescaled units (HU-like)
    path = write_dicom(tmp_path / "w.dcm", raw, bits_stored=12, rescale=rescale, window=window)
    out = dicom.decode_pixels(path.read_bytes())
    ds = pydicom.dcmread(path)
    ref = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)  # pydicom's own, onto its y range
    lo, hi = np.array([0, 4095]) * rescale[0] + rescale[1]
    assert np.array_equal(out, np.rint((ref - lo) / (hi - lo) * 255).astype(np.uint8))
    assert (out == 0).mean() > 0.01 and (out == 255).mean() > 0.01  # the window clips both ends here
    plain = dicom.decode_pixels(write_dicom(tmp_path / "p.dcm", raw, bits_stored=12).read_bytes())
    assert not np.array_equal(out, plain)


def test_voi_lut_sequence_maps_the_samples(tmp_path: Path) -> None:
    """A VOI LUT (a non-linear curve over the 12-bit range, 12-bit output) wins over the window and maps each
    sample to its entry, onto 0..255 by the LUT's bit depth; without it the same samples are windowed."""
    raw = twelve_bit(12)
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", raw, bits_stored=12, window=(2048, 4096))
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    out = dicom.decode_pixels(path.read_bytes())
    assert np.array_equal(out, np.rint(lut[raw] / 4095 * 255).astype(np.uint8))
    windowed = write_dicom(tmp_path / "w.dcm", raw, bits_stored=12, window=(2048, 4096))
    assert not np.array_equal(out, dicom.decode_pixels(windowed.read_bytes()))


def test_bits_stored_and_16_bit_like_a_16_bit_png(tmp_path: Path) -> None:
    raw = twelve_bit(3)
    dirty = raw | np.where(np.arange(raw.size).reshape(raw.shape) % 3 == 0, 0xF000, 0).astype(np.uint16)
    clean12 = dicom.decode_pixels(write_dicom(tmp_path / "c.dcm", raw, bits_stored=12).read_bytes())
    assert np.array_equal(dicom.decode_pixels(write_dicom(tmp_path / "d.dcm", dirty, bits_stored=12).read_bytes()),
                          clean12)  # bits above BitsStored (overlays, garbage) are masked
    sixteen = raw * 16
    png = tmp_path / "sixteen.png"
    assert cv2.imwrite(str(png), sixteen)
    dcm16 = write_dicom(tmp_path / "sixteen.dcm", sixteen)
    assert np.array_equal(decode.load_resized(dcm16, size=96, channels=3),
                          decode.load_resized(png, size=96, channels=3))
    eight = xray(3)
    assert np.array_equal(dicom.decode_pixels(write_dicom(tmp_path / "e.dcm", eight).read_bytes()), eight)


def test_compressed_syntaxes_decode_like_uncompressed(tmp_path: Path) -> None:
    raw = twelve_bit(4)
    plain = dicom.decode_pixels(write_dicom(tmp_path / "plain.dcm", raw, bits_stored=12).read_bytes())
    for syntax in (RLELossless, JPEG2000Lossless, JPEGLosslessSV1):  # pydicom; pylibjpeg-openjpeg; -libjpeg
        path = write_dicom(tmp_path / f"{syntax.name}.dcm", raw, bits_stored=12, syntax=syntax)
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        assert dicom.read_header(path.read_bytes()).problem is None, syntax.name
        assert np.array_equal(dicom.decode_pixels(path.read_bytes()), plain), syntax.name
    sixteen = raw * 16 + 15  # all 16 bits, JPEG lossless at precision 16
    sv1 = write_dicom(tmp_path / "sv1_16.dcm", sixteen, syntax=JPEGLosslessSV1)
    assert np.array_equal(dicom.decode_pixels(sv1.read_bytes()),
                          dicom.decode_pixels(write_dicom(tmp_path / "p16.dcm", sixteen).read_bytes()))
    mr = dicom.decode_pixels(shipped("MR_small.dcm").read_bytes())  # has a window: VOI applied
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(dicom.decode_pixels(shipped(name).read_bytes()), mr), name  # RLE, JPEG 2000, JPEG-LS
    assert decode.probe_header(shipped("693_J2KI.dcm").read_bytes()) == (512, 512, "DICOM", "I;16")
    ds = pydicom.dcmread(shipped("SC_rgb_jpeg.dcm"))  # JPEG baseline: Pillow's pixels (libjpeg's differ by 1)
    ds.pixel_array_options(decoding_plugin="pillow")
    assert np.array_equal(dicom.decode_pixels(shipped("SC_rgb_jpeg.dcm").read_bytes()), ds.pixel_array)
    for name, shape in (("JPEGLSNearLossless_16.dcm", (50, 10)), ("JPGExtended.dcm", (1024, 256))):  # 12-bit JPEG
        v = verdict(shipped(name).read_bytes(), Limits(max_pixels=10_000_000, min_side=8))
        assert not v.reason and dicom.decode_pixels(shipped(name).read_bytes()).shape == shape, (name, v)


def test_without_the_plugins_the_syntax_is_named(tmp_path: Path) -> None:
    """The control: with pylibjpeg hidden (as before it was a dependency), JPEG-LS and 12-bit JPEG extended
    are unsupported_syntax, the syntax named; JPEG 2000 still decodes (Pillow)."""
    code = ("import sys\n"
            "for m in ('pylibjpeg', 'libjpeg', 'openjpeg', 'rle'): sys.modules[m] = None\n"
            "from medflow.imaging import dicom\n"
            "for p in sys.argv[1:]: print(dicom.read_header(open(p, 'rb').read()).problem)\n")
    names = ("MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm", "MR_small_jp2klossless.dcm")
    out = subprocess.run([sys.executable, "-c", code, *(str(shipped(n)) for n in names)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert "unsupported_syntax" in out[0] and "JPEG-LS Lossless" in out[0] and "pylibjpeg" in out[0]
    assert "unsupported_syntax" in out[1] and "JPEG Extended" in out[1] and "12-bit" in out[1]
    assert out[2] == "None"


# ----------------------------------------------------------------------------------------- rejects


def _rejects(tmp_path: Path) -> dict[str, Path]:
    img = xray(5, (64, 64))
    return {"multi_frame": write_dicom(tmp_path / "multi.dcm", np.stack([img, img]), frames=2),
            "no_pixel_data": write_dicom(tmp_path / "nopix.dcm", img, with_pixels=False),
            "unsupported_syntax": relabelled(tmp_path / "mc.dcm", shipped("MR_small_jp2klossless.dcm"),
                                             JPEG2000MCLossless)}


def test_reject_reasons_name_the_problem(tmp_path: Path) -> None:
    files = _rejects(tmp_path)
    report = shipped("test-SR.dcm")  # a structured report: no Rows, no pixels
    for reason, path in [*files.items(), ("no_pixel_data", report)]:
        v = verdict(path.read_bytes(), LIMITS)
        assert v.reason == reason and reason in quality.REASONS, (path.name, v)
        assert v.format == "DICOM"
    detail = verdict(files["unsupported_syntax"].read_bytes(), LIMITS).detail  # JPEG 2000 Part 2: no plugin
    assert "JPEG 2000 Part 2 Multi-component Image Compression (Lossless Only)" in detail
    assert JPEG2000MCLossless in detail
    assert "2 frames" in verdict(files["multi_frame"].read_bytes(), LIMITS).detail
    # predict and evaluate --images: one error row each, naming the file and the reason
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        rows = Decoder(32, 1, InputLimits(), pool).decode([file_item(p) for p in files.values()])
    for (reason, path), (pixels, error) in zip(files.items(), rows, strict=True):
        assert pixels is None and str(path) in str(error) and reason in str(error)  # the filter's verdict, named
    with pytest.raises(StepError, match="multi frame"):
        decode.load_resized(files["multi_frame"], size=32, channels=1)


# ----------------------------------------------------------------------------------------- steps


def _project(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Patient A (a1, an extensionless a2, the multi-frame m, nopix without pixels), patient B, one file
    without PatientID, pydicom's JPEG-LS file (a patient of its own, decoded by pylibjpeg-libjpeg) and its
    JPEG 2000 file relabelled as JPEG 2000 Part 2 multi-component (no plugin decodes that syntax)."""
    root = tmp_path / "inbox" / "src"
    study = generate_uid()
    files = {
        "a1": write_dicom(root / "NORMAL" / "a1.dcm", twelve_bit(6), bits_stored=12, window=(2000, 3000)),
        "a2": write_dicom(root / "PNEUMONIA" / "IM0002", xray(7), photometric="MONOCHROME1"),
        "b1": write_dicom(root / "NORMAL" / "b1.dcm", twelve_bit(8) * 16, patient_id="PID-SECRET-0002",
                          syntax=RLELossless),
        "s1": write_dicom(root / "PNEUMONIA" / "s1.dcm", xray(9), patient_id=None, study=study),
        "m": write_dicom(root / "PNEUMONIA" / "m.dcm", np.stack([xray(10)] * 3), frames=3),
        "nopix": write_dicom(root / "NORMAL" / "nopix.dcm", xray(11), with_pixels=False),
        "jls": root / "NORMAL" / "jls.dcm",
        "mc": relabelled(root / "NORMAL" / "mc.dcm", shipped("MR_small_jp2klossless.dcm"), JPEG2000MCLossless),
    }
    files["jls"].write_bytes(shipped("MR_small_jpeg_ls_lossless.dcm").read_bytes())
    return root, files


REJECTED = {"m": "multi_frame", "nopix": "no_pixel_data", "mc": "unsupported_syntax"}


def _no_phi(*texts: str) -> None:
    for text in texts:
        leaked = [p for p in PHI if p in text]
        assert not leaked, f"PHI {leaked} in {text[:200]}"


def test_manifest_filter_resize_on_dicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from tasks import filter as filter_step
    from tasks import manifest as manifest_step
    from tasks import resize as resize_step

    root, files = _project(tmp_path)
    monkeypatch.chdir(tmp_path)  # the project root: the salt lives under it
    cfg = parse_config({"dataset": {"name": "t", "labels": {"NORMAL": 0, "PNEUMONIA": 1}, "group_rule": "dicom",
                                    "channels": 1},
                        "filter": {"min_side": 16, "workers": 1}, "resize": {"size": 32, "workers": 1}})
    write_json(tmp_path / "roots.json", [{"root": str(root), "source": "src", "kind": "folder"}])
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        summary = manifest_step.run(cfg, roots_json=tmp_path / "roots.json", out=out / "manifest")
        filt = filter_step.run(cfg, manifest=out / "manifest", clean=out / "clean",
                               rejects=out / "rejects.csv", summary=out / "filter.json", cache=tmp_path / "cache")
        resized = resize_step.run(cfg, clean=out / "clean", out=out / "images", stats=out / "resize.json",
                                  cache=tmp_path / "rcache")

    salt = project_salt(tmp_path)
    assert len(salt) == 64 and stat.S_IMODE((tmp_path / SALT_FILE).stat().st_mode) == 0o600
    df = read_csv(out / "manifest").set_index("relpath")
    assert summary["images"] == 8 and summary["patients"] == 4 and summary["dicom_patient_from_study"] == 1
    assert set(df["format"]) == {"DICOM"}
    group = {k: df.loc[p.relative_to(root).as_posix(), "group"] for k, p in files.items()}
    assert group["a1"] == group["a2"] == group["m"] == dicom.hashed("PatientID", PHI[2], salt) != group["b1"]
    ds = pydicom.dcmread(files["s1"], stop_before_pixels=True)
    assert group["s1"] == dicom.hashed("StudyInstanceUID", str(ds.StudyInstanceUID), salt)
    assert dicom.hashed("PatientID", PHI[2], b"another project") != group["a1"]
    # evaluate --images and external sets give an image the id the manifest gave it
    assert file_groups(list(files.values()), cfg.dataset.group_pattern, "dicom", salt) == list(group.values())
    assert any("no PatientID" in r.getMessage() and "StudyInstanceUID" in r.getMessage() for r in caplog.records)

    assert filt["clean"] == 5 and all(filt["by_reason"][r] == 1 for r in REJECTED.values())
    rejects = read_csv(out / "rejects.csv").set_index("path")
    listed = {k: df.loc[files[k].relative_to(root).as_posix(), "path"] for k in REJECTED}
    assert {k: rejects.loc[path, "reason"] for k, path in listed.items()} == REJECTED
    again = filter_step.run(cfg, manifest=out / "manifest", clean=out / "clean", rejects=out / "rejects.csv",
                            summary=out / "filter2.json", cache=tmp_path / "cache")  # verdicts from the index
    assert (again["decoded"], again["cached"]) == (0, 8) and again["by_reason"] == filt["by_reason"]
    images = ImageStore(out / "images")[:]
    clean = read_csv(out / "clean")
    assert resized["images"] == len(clean) == images.shape[0] == 5 and images.shape[1:] == (32, 32, 1)
    for i, path in enumerate(clean["path"]):
        assert np.array_equal(images[i], decode.load_resized(path, size=32, channels=1))
    texts = [p.read_text() for p in out.rglob("*") if p.suffix in (".csv", ".json")]
    _no_phi(*texts, *(r.getMessage() for r in caplog.records), json.dumps(summary), json.dumps(filt))


def test_predict_and_evaluate_images_read_dicom(tmp_path: Path) -> None:
    import keras

    from medflow import inference
    from medflow.evaluation.assess import decode_files, labelled_files

    root, files = _project(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    keras.Sequential([keras.Input((16, 16, 1)), keras.layers.GlobalAveragePooling2D(),
                      keras.layers.Dense(1, activation="sigmoid")]).save(model / "model.keras")
    (model / "metadata.json").write_text(json.dumps({"preprocessing": {"size": 16, "channels": 1},
                                                     "class_names": {"0": "NORMAL", "1": "PNEUMONIA"}}))
    summary = inference.run([str(root / "PNEUMONIA")], model=model, out=tmp_path / "preds.csv", threshold=0.5,
                            progress=False)
    rows = read_csv(tmp_path / "preds.csv").set_index("path")
    assert summary["images"] == 3 and summary["errors"] == 1  # IM0002 (no extension) found by its marker
    shown = {k: inference.shown_name(str(f), root / "PNEUMONIA") for k, f in files.items()}
    assert rows.loc[shown["a2"], "probability"] == rows.loc[shown["a2"], "probability"]  # scored
    assert "multi_frame" in rows.loc[shown["m"], "error"]
    _no_phi((tmp_path / "preds.csv").read_text())
    labelled = labelled_files(root, {"NORMAL": 0, "PNEUMONIA": 1}, "--images")
    paths = [p for p, _ in labelled]
    assert sorted(paths) == sorted(files.values())
    pixels, errors = decode_files(paths, 16, 1)
    ok = [p for p, e in zip(paths, errors, strict=True) if e is None]
    assert sorted(ok) == sorted(v for k, v in files.items() if k not in REJECTED)

"""One odd file never stops a dataset (issue 12): each file-level problem is one reject row with a reason, or
one error row of predict; stage-level failures stop with a clear message; a bad param stops `dvc repro` at
download, and a stage run on its own keeps its outputs (persistent) through the failed run."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, copy_project, copy_shipped
from PIL import Image

from medflow.config import parse_config
from medflow.errors import ConfigError, StepError
from medflow.imaging.decode import decode_resized
from medflow.imaging.limits import Decoder, InputLimits
from medflow.inference import collect
from medflow.io import ImageStore, read_csv, sha256_file, write_csv
from tasks import filter as filter_step
from tasks import resize as resize_step

SIZE = 16
CFG = {"dataset": {"name": "t", "sources": ["x"], "labels": {"A": 0, "B": 1}, "channels": 1},
       "filter": {"workers": 1}, "resize": {"size": SIZE, "workers": 1}}


def _png(path: Path, value: int, side: int = 48) -> Path:
    """A noise PNG of ``side x side + 8``, written through ``open`` (cv2.imwrite crashes on a non-UTF-8 name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    ok, data = cv2.imencode(".png", rng.integers(0, 255, (side, side + 8), dtype=np.uint8))
    assert ok
    with open(os.fsencode(path), "wb") as f:
        f.write(data.tobytes())
    return path


def _bad_exif_png(path: Path) -> Path:
    """A good PNG whose eXIf chunk is garbage (a metadata block that cannot be parsed)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.full((48, 48), 70, np.uint8)).save(buf, "PNG")
    data, at = buf.getvalue(), 8 + 25  # after the signature and IHDR
    body = b"eXIf" + b"MM\x00\x2a\x00\x00\x00\x08\xff\xffnot a tiff"
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    path.write_bytes(data[:at] + chunk + data[at:])
    return path


# Runs manifest and filter in a child: a FIFO that blocked an open would hang it, not the test run (timeout).
# As root, chmod 000 does not stop reads: the child drops CAP_DAC_OVERRIDE/DAC_READ_SEARCH (setpriv).
_CHILD = """
import json, sys
from pathlib import Path
from medflow.config import parse_config
from medflow.io import write_json
from tasks import filter as f, manifest as m
cfg = parse_config(json.loads(sys.argv[1]))
out = Path(sys.argv[2])
write_json(out / "roots.json", [{"root": sys.argv[3], "source": "t", "kind": "folder"}])
print(json.dumps(m.run(cfg, roots_json=out / "roots.json", out=out / "manifest.csv")))
try:
    f.run(cfg, manifest=out / "manifest.csv", clean=out / "clean.csv", rejects=out / "rejects.csv",
          summary=out / "summary.json", cache=out / "cache", roots_json=out / "roots.json")
except Exception as e:
    print("ERROR", e)
"""


def _odd_tree(root: Path) -> None:
    _png(root / "A" / "ok1.png", 1)
    _png(root / "B" / "ok2.png", 2)
    _bad_exif_png(root / "B" / "exif.png")
    _png(Path(os.fsdecode(os.fsencode(str(root / "A")) + b"/caf\xe9.png")), 3)  # Latin-1 name, not UTF-8
    (root / "A" / "gone.png").symlink_to(root / "A" / "nowhere.png")
    os.mkfifo(root / "B" / "pipe.png")
    _png(root / "B" / "locked.png", 4).chmod(0)


def _run_child(tmp_path: Path, root: Path) -> tuple[dict, str]:
    cmd = [sys.executable, "-c", _CHILD, json.dumps(CFG), str(tmp_path), str(root)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: chmod 000 cannot make a file unreadable")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return json.loads(lines[0]), "\n".join(lines[1:])


def test_odd_files_become_reject_rows_and_the_stage_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "src"
    _odd_tree(root)
    summary, error = _run_child(tmp_path, root)
    assert not error and summary["images"] == 7 and summary["unreadable"] == 4
    rejects = read_csv(tmp_path / "rejects.csv").set_index("path")
    why = {Path(p).name: (r, d) for p, r, d in zip(rejects.index, rejects["reason"], rejects["detail"], strict=True)}
    assert {n: r for n, (r, _) in why.items()} == {"caf\\xe9.png": "unreadable", "gone.png": "unreadable",
                                                  "pipe.png": "unreadable", "locked.png": "unreadable"}
    assert "not valid UTF-8" in why["caf\\xe9.png"][1]
    assert "broken symlink" in why["gone.png"][1] and "nowhere.png" in why["gone.png"][1]
    assert "FIFO" in why["pipe.png"][1]
    assert "Permission denied" in why["locked.png"][1]
    clean = read_csv(tmp_path / "clean.csv")
    assert sorted(Path(p).name for p in clean["path"]) == ["exif.png", "ok1.png", "ok2.png"]
    # the image with the broken metadata block decodes in resize too (upright: the EXIF is ignored)
    cfg = parse_config(CFG)
    stats = resize_step.run(cfg, clean=tmp_path / "clean.csv", out=tmp_path / "images",
                            stats=tmp_path / "stats.json", cache=tmp_path / "rcache",
                            roots_json=tmp_path / "roots.json")
    assert stats["images"] == 3 and ImageStore(tmp_path / "images").shape == (3, SIZE, SIZE, 1)


def test_every_image_rejected_is_a_clear_step_error(tmp_path: Path) -> None:
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "text.png").write_text("not an image")
    (tmp_path / "A" / "gone.png").symlink_to(tmp_path / "missing.png")
    rows = [{"path": str(p), "relpath": p.name, "root": str(tmp_path), "class_name": "A", "label": 0,
             "group": p.stem, "source_split": "", "sha256": "", "bytes": 0, "width": None, "height": None,
             "mode": None, "format": None} for p in sorted((tmp_path / "A").iterdir())]
    rows[1]["bytes"] = 12
    write_csv(tmp_path / "manifest.csv", pd.DataFrame(rows))
    with pytest.raises(StepError) as e:
        filter_step.run(parse_config(CFG), manifest=tmp_path / "manifest.csv", clean=tmp_path / "clean.csv",
                        rejects=tmp_path / "rejects.csv", summary=tmp_path / "s.json", cache=tmp_path / "c")
    text = str(e.value)
    assert "every one of the 2 image(s) was rejected" in text and "not_an_image 1" in text
    assert "unreadable 1" in text and str(tmp_path / "rejects.csv") in text
    assert len(read_csv(tmp_path / "rejects.csv")) == 2  # written before the error: it says why


def test_a_file_replaced_after_the_filter_is_a_resize_reject_that_the_split_quarantines(tmp_path: Path) -> None:
    """Resize goes on past a file it cannot decode (a zero row, a reject row); the split quarantines that row
    with resize's reason, so no split (train, val, test) holds it and the image store still counts split + quarantine.
    Repaired, the next runs decode it and the extended split places it."""
    from medflow.data.split import read_quarantine
    from tasks import split as split_step

    files = [_png(tmp_path / ("A" if i % 2 else "B") / f"{i}.png", i) for i in range(12)]
    rows = [{"path": str(p), "relpath": p.name, "root": str(tmp_path), "class_name": p.parent.name,
             "label": int(p.parent.name == "A"), "group": p.stem, "source_split": "", "sha256": sha256_file(p),
             "bytes": p.stat().st_size, "width": 56, "height": 48, "mode": "L", "format": "PNG", "phash": "0" * 16,
             "dup_group": sha256_file(p)} for p in files]
    clean = tmp_path / "clean.csv"
    write_csv(clean, pd.DataFrame(rows))
    bad, good = files[3], files[3].read_bytes()
    bad.write_bytes(good[:200])  # cut short after the filter passed it
    cfg = parse_config(CFG)
    out = {"out": tmp_path / "split.csv", "summary": tmp_path / "split.json", "rejects": tmp_path / "split_rejects.csv",
           "resize_rejects": tmp_path / "resize_rejects.csv"}

    def resize() -> dict:
        return resize_step.run(cfg, clean=clean, out=tmp_path / "images", stats=tmp_path / "stats.json",
                               cache=tmp_path / "rcache", rejects=out["resize_rejects"])

    assert resize()["rejected"] == 1
    late = read_csv(out["resize_rejects"])
    assert late[["path", "reason", "row"]].values.tolist() == [[str(bad), resize_step.LATE_REASON, 3]]
    assert "truncated" in late["detail"][0] and "BytesIO" not in late["detail"][0]
    split_step.run(cfg, clean=clean, **out)
    split, quarantined = read_csv(out["out"]), read_csv(out["rejects"])
    assert str(bad) not in set(split["path"]) and len(split) == 11
    assert quarantined[["path", "reason", "row"]].values.tolist() == [[str(bad), resize_step.LATE_REASON, 3]]
    assert quarantined["detail"][0] == late["detail"][0]
    positions = {path: i for i, path in enumerate(read_csv(clean)["path"])}
    assert all(positions[p] == r for p, r in zip(split["path"], split["row"], strict=True))  # rows of the image store
    assert len(ImageStore(tmp_path / "images")) == len(split) + len(quarantined)  # what validate counts
    assert json.loads(out["summary"].read_text())["quarantined"]["by_reason"] == {resize_step.LATE_REASON: 1}
    listed = read_quarantine(tmp_path / "rejects.csv", out["rejects"])  # the Prefect artifact's and report's table
    assert listed is not None and listed["path"].tolist() == [str(bad)]

    bad.write_bytes(good)  # repaired: decoded now, and placed by the extended split, nothing else moved
    assert resize()["rejected"] == 0
    split_step.run(cfg, clean=clean, **out)
    again = read_csv(out["out"])
    assert len(again) == 12 and len(read_csv(out["rejects"])) == 0
    assert again.set_index("path").loc[split["path"], "split"].tolist() == split["split"].tolist()

    write_csv(out["resize_rejects"], late.assign(path=str(files[4])))  # of another clean.csv: named, not trusted
    with pytest.raises(StepError, match=r"resize_rejects.csv: row 3 .*4.png.* is not that row of .*clean.csv"):
        split_step.run(cfg, clean=clean, **out)


def _decode_errors(items: list, limits: InputLimits | None = None) -> dict[str, str | None]:
    with ThreadPoolExecutor(2) as pool:
        decoded = Decoder(SIZE, 1, limits or InputLimits(), pool).decode(items)
    return {Path(item.name).name: err for item, (_, err) in zip(items, decoded, strict=True)}


def test_predict_applies_the_filters_verdicts(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png", 1)
    _png(tmp_path / "small.png", 2, side=12)
    Image.fromarray(np.zeros((40, 40), np.float32), "F").save(tmp_path / "float.tiff")
    full = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) - 20])  # IEND gone
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:-2])  # no FFD9: libjpeg would fill it with grey
    _png(tmp_path / "bomb.png", 3, side=200)  # 200 x 208 pixels, over the cap below
    (tmp_path / "text.png").write_text("hello")
    errors = _decode_errors(collect([str(p) for p in sorted(tmp_path.iterdir())]),
                            InputLimits(max_pixels=20_000, min_side=32))
    assert errors["ok.png"] is None
    assert "too_small" in errors["small.png"] and "filter.min_side" in errors["small.png"]
    assert "unsupported_mode: mode F" in errors["float.tiff"]
    assert "truncated" in errors["cut.png"] and "truncated" in errors["cut.jpg"]
    assert "too_many_pixels" in errors["bomb.png"] and "filter.max_pixels" in errors["bomb.png"]
    assert "not an image format" in errors["text.png"]
    for name, err in errors.items():
        assert err is None or ("BytesIO" not in err and err.count(name) == 1), err


def test_decode_errors_say_what_is_wrong_in_words() -> None:
    with pytest.raises(StepError) as e:
        decode_resized(b"not an image at all", size=SIZE, channels=1, name="x.png")
    assert str(e.value).startswith("x.png: ") and "BytesIO" not in str(e.value) and "0x" not in str(e.value)


def _tar(path: Path, mode: str, n: int = 3) -> Path:
    with tarfile.open(path, mode) as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "PNG")
            info = tarfile.TarInfo(f"scans/{i}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_truncated_tar_and_a_bad_path_give_error_rows(tmp_path: Path, mode: str) -> None:
    whole = _tar(tmp_path / ("a.tar" if mode == "w" else "a.tar.gz"), mode)
    cut = tmp_path / f"cut_{whole.name}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    _png(tmp_path / "ok.png", 5)
    items = collect([str(cut), str(tmp_path / "nowhere.png"), str(tmp_path / "*.jpeg"), str(tmp_path / "ok.png")])
    with ThreadPoolExecutor(2) as pool:
        results = Decoder(SIZE, 1, InputLimits(), pool).decode(items)
    errors = [err for _, err in results]
    assert errors[-1] is None  # the good image is still scored
    assert any(err and "no such file or folder" in err for err in errors)
    assert any(err and "matches no file" in err for err in errors)
    assert any(err and str(cut) in err and ("cut short" in err or "not a readable archive" in err) for err in errors)


# --- params: a bad value stops `dvc repro` at download, before DVC deletes train's outputs -----------------


def test_preflight_names_a_useless_value(tmp_path: Path) -> None:
    from medflow.catalog import preflight

    copy_shipped(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"]["epochs"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        preflight(tmp_path / "params.yaml")
    assert "params.yaml: train.epochs: Input should be greater than or equal to 1 (got 0)" in str(e.value)
    def own_train(name: str) -> dict:
        return yaml.safe_load((tmp_path / "datasets" / f"{name}.yaml").read_text())["train"] or {}

    affected = [name for name in params["datasets"] if "epochs" not in own_train(name)]  # melanoma sets its own
    assert affected and all(name in str(e.value) for name in affected), (affected, str(e.value))


# train@<dataset>'s deps and outputs as a finished run leaves them (stand-ins: `dvc commit` records them as
# that run, and the typo stops `medflow train` before it reads any of them)
_TRAIN_DEPS = ["data/processed/{d}/images", "data/processed/{d}/split", "reports/{d}/validation.json"]
_TRAIN_OUTS = ["models/{d}/model.keras", "models/{d}/metadata.json", "models/{d}/history.csv",
               "models/{d}/checkpoints/state.json", "reports/{d}/train/metrics.json",
               "reports/{d}/train/plots/metrics/train/loss.tsv"]


# One DVC process for the stage run by hand (DVC's start-up is most of each call): record the stand-ins as the
# last good run, run the stage with the typo (sys.argv[3]) on its own, then undo it (sys.argv[2]) and ask.
_SINGLE_ITEM = """
import json, shutil, sys
from dvc.repo import Repo
project, good, typo, stage = sys.argv[1:5]
with Repo(project) as repo:
    repo.commit(stage, force=True)
    shutil.copy(typo, project + "/params.yaml")
    try:
        repo.reproduce(stage, single_item=True)
        failed = False
    except Exception as e:
        failed = str(e)
    shutil.copy(good, project + "/params.yaml")
    print(json.dumps({"failed": failed, "status": repo.status([stage])}))
"""


def _params_with_epochs(project: Path, value: object, name: str) -> Path:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = value
    path = project.parent / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_bad_train_param_stops_dvc_repro_at_download_and_train_outputs_stay(tmp_path: Path) -> None:
    """Real DVC: the stage run on its own (`dvc repro --single-item`, no preflight) keeps its outputs through the
    failed run, so undoing the typo leaves it up to date; then a full `dvc repro` stops at download's preflight
    (about 15 s each: DVC's start-up, `medflow train` refusing the value)."""
    value, says = "ten", "valid integer"
    project = tmp_path / "p"
    copy_project(project)
    good = shutil.copy(project / "params.yaml", tmp_path / "good.yaml")
    typo = _params_with_epochs(project, value, "typo.yaml")
    dataset = yaml.safe_load(typo.read_text())["datasets"][0]
    stage, model = f"train@{dataset}", project / f"models/{dataset}/model.keras"
    files = {project / p.format(d=dataset): f"a previous run's {p.format(d=dataset)}".encode()
             for p in _TRAIN_DEPS + _TRAIN_OUTS}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    # the stage by hand: DVC used to delete its outputs before `medflow train` refused the value
    proc = subprocess.run([sys.executable, "-c", _SINGLE_ITEM, str(project), str(good), str(typo), stage],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["failed"] and "train.epochs" in proc.stderr and repr(value) in proc.stderr, proc.stderr[-3000:]
    kept = {str(p.relative_to(project)) for p, data in files.items() if p.exists() and p.read_bytes() == data}
    assert kept == {str(p.relative_to(project)) for p in files}, proc.stderr[-3000:]
    assert result["status"] == {}, result  # the typo undone: up to date, nothing to recompute
    # a persistent output is still cached as usual (what `dvc checkout` restores)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]
    md5 = next(o["md5"] for o in lock["outs"] if o["path"] == f"models/{dataset}/model.keras")
    assert (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_bytes() == files[model]

    shutil.copy(typo, project / "params.yaml")
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "params.yaml: train.epochs" in out and says in out and repr(value) in out, out[-3000:]
    assert "Running stage 'download@" in out and "Running stage 'train@" not in out
    assert all(path.read_bytes() == data for path, data in files.items())

"""Extract step on generated archives (normal, hostile: escapes, links, devices, bombs; junk) and real images."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import shared_dataset

from medflow.config import Config, load_config, parse_config
from medflow.data import archives
from medflow.data.walk import folder_listing, listing_digest
from medflow.errors import StepError
from medflow.io import display_path, read_csv
from tasks import download, extract, manifest

_RNG = random.Random(0)
IMG = _RNG.randbytes(3000)  # incompressible stand-in for an image file
REPO = Path(__file__).resolve().parents[1]


def _cfg(**limits: Any) -> Config:
    return parse_config({
        "dataset": {"name": "t", "sources": ["unused"], "labels": {"NORMAL": 0, "PNEUMONIA": 1}},
        "extract": limits,
    })


def _zip(path: Path, entries: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = IMG) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info, None


def _run(tmp_path: Path, *sources: str | Path | dict[str, Any],
         cfg: Config | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Resolve sources (paths, or source mappings with url and sha256) with the real download step; extract."""
    listed = [s if isinstance(s, dict) else str(s) for s in sources]
    dl_cfg = parse_config({"dataset": {"name": "t", "sources": listed, "labels": {"NORMAL": 0, "PNEUMONIA": 1}}})
    download.run(dl_cfg, out_dir=tmp_path / "raw", sources_json=tmp_path / "sources.json",
                 inbox=tmp_path / "no-inbox")
    summary = extract.run(cfg or _cfg(), sources_json=tmp_path / "sources.json", out_dir=tmp_path / "ex",
                          roots_json=tmp_path / "roots.json")
    return summary, json.loads((tmp_path / "roots.json").read_text())


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_nothing_extracted(tmp_path: Path) -> None:
    out = tmp_path / "ex"
    assert not out.exists() or list(out.iterdir()) == []
    assert not (tmp_path / "roots.json").exists()


# --------------------------------------------------------------------------------------------- normal


def test_zip_is_extracted_to_content_addressed_folder(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "ChestXRay2017.zip", {
        "chest_xray/train/NORMAL/IM-0001-0001.jpeg": IMG,
        "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg": IMG[::-1],
        "chest_xray/test/": b"",
    })
    digest = _sha(archive)
    summary, roots = _run(tmp_path, archive)
    root = tmp_path / "ex" / f"ChestXRay2017-{digest[:12]}"
    assert roots == [{"root": str(root), "source": display_path(archive), "kind": "archive", "digest": digest}]
    assert _files(root) == {"chest_xray/train/NORMAL/IM-0001-0001.jpeg",
                            "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg"}
    assert (root / "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg").read_bytes() == IMG[::-1]
    assert (root / "chest_xray/test").is_dir()
    assert summary == {"roots": 1, "extracted": 1, "reused": 0, "folders": 0}
    assert [p.name for p in (tmp_path / "ex").iterdir()] == [root.name]  # no temporary leftovers


def test_tar_gz_is_extracted_and_archive_left_unchanged(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "in" / "cells.TAR.GZ", [
        _special("cells", tarfile.DIRTYPE), _file("cells/Parasitized/C100P61_cell_1.png"),
        _file("./cells/Uninfected/C101P62_cell_2.png", IMG[:100]),
    ])
    before = (_sha(archive), archive.stat().st_mtime_ns)
    _, roots = _run(tmp_path, archive)
    root = Path(roots[0]["root"])
    assert root.name == f"cells-{before[0][:12]}"
    assert _files(root) == {"cells/Parasitized/C100P61_cell_1.png", "cells/Uninfected/C101P62_cell_2.png"}
    assert (_sha(archive), archive.stat().st_mtime_ns) == before


def test_plain_tar_and_tgz_names(tmp_path: Path) -> None:
    a = _tar(tmp_path / "in" / "a.tar", [_file("x/NORMAL/1.png")])
    b = _tar(tmp_path / "in" / "b.tgz", [_file("y/NORMAL/2.png")])
    _, roots = _run(tmp_path, a, b)
    assert [Path(r["root"]).name.split("-")[0] for r in roots] == ["a", "b"]
    assert _files(Path(roots[1]["root"])) == {"y/NORMAL/2.png"}


def test_archive_downloaded_over_http_is_extracted(tmp_path: Path, file_server: tuple[str, Path]) -> None:
    base, served = file_server
    archive = _zip(served / "ChestXRay2017.zip", {"chest_xray/NORMAL/IM-0001-0001.jpeg": IMG})
    digest = _sha(archive)
    summary, roots = _run(tmp_path, {"url": f"{base}/ChestXRay2017.zip", "sha256": digest, "insecure": True})
    root = tmp_path / "ex" / f"ChestXRay2017-{digest[:12]}"
    assert roots == [{"root": str(root), "source": f"{base}/ChestXRay2017.zip", "kind": "archive", "digest": digest}]
    assert (root / "chest_xray/NORMAL/IM-0001-0001.jpeg").read_bytes() == IMG
    assert summary["extracted"] == 1


@pytest.mark.integration
def test_real_images_survive_http_download_and_extract(tmp_path: Path, file_server: tuple[str, Path]) -> None:
    cells = shared_dataset("malaria_cells")
    base, served = file_server
    with tarfile.open(served / "cells.tar.gz", "w:gz") as tf:
        tf.add(cells, arcname="cells")
    _, roots = _run(tmp_path, {"url": f"{base}/cells.tar.gz", "sha256": _sha(served / "cells.tar.gz"),
                               "insecure": True})  # the loopback server speaks plain http
    root = Path(roots[0]["root"]) / "cells"
    originals = {p.relative_to(cells).as_posix(): _sha(p) for p in cells.rglob("*") if p.is_file()}
    assert originals, f"{cells} holds no files"
    assert _files(root) == set(originals)
    assert {rel: _sha(root / rel) for rel in originals} == originals


def test_rerun_reuses_existing_folder(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "a.zip", {"NORMAL/1.png": IMG})
    _, roots = _run(tmp_path, archive)
    marker = Path(roots[0]["root"]) / "marker"
    marker.write_text("not re-extracted")
    summary, roots2 = _run(tmp_path, archive)
    assert roots2 == roots and marker.exists()
    assert summary == {"roots": 1, "extracted": 0, "reused": 1, "folders": 0}


def test_folder_source_is_listed_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "inbox" / "xrays"
    (folder / "NORMAL").mkdir(parents=True)
    (folder / "NORMAL" / "1.png").write_bytes(IMG)
    summary, roots = _run(tmp_path, folder)
    assert roots == [{"root": display_path(folder), "source": display_path(folder), "kind": "folder",
                      "digest": listing_digest(folder_listing(folder))}]  # the content: manifest re-runs on change
    assert summary["folders"] == 1 and not any((tmp_path / "ex").iterdir())


def test_same_archive_twice_is_indexed_once(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "a.zip", {"NORMAL/1.png": IMG})
    summary, roots = _run(tmp_path, archive, archive)
    assert len(roots) == 1 and summary["roots"] == 1


def test_junk_is_skipped(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "a.zip", {
        "__MACOSX/data/NORMAL/._1.png": b"x", "data/.DS_Store": b"x", "data/NORMAL/Thumbs.db": b"x",
        "data/NORMAL/._2.png": b"x", "data/@eaDir/1.png": b"x", "data/NORMAL/1.png": IMG,
    })
    _, roots = _run(tmp_path, archive)
    root = Path(roots[0]["root"])
    assert _files(root) == {"data/NORMAL/1.png"}
    assert not (root / "__MACOSX").exists()


def test_tar_symlinks_inside_are_skipped_and_hard_links_copied(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    archive = _tar(tmp_path / "in" / "a.tar", [
        _file("d/NORMAL/1.png"), _special("d/NORMAL/2.png", tarfile.SYMTYPE, "1.png"),
        _special("d/PNEUMONIA/3.png", tarfile.SYMTYPE, "../NORMAL/1.png"),
        _special("d/NORMAL/4.png", tarfile.LNKTYPE, "d/NORMAL/1.png"),  # GNU tar: a hard-linked file
        _special("d/PNEUMONIA/5.png", tarfile.LNKTYPE, "./d/NORMAL/4.png"),  # a link to a link
        _file("d/NORMAL/._6.png", b"junk"), _special("d/NORMAL/7.png", tarfile.LNKTYPE, "d/NORMAL/._6.png"),
    ])
    with caplog.at_level(logging.WARNING, logger="medflow.data.archives"):
        _, roots = _run(tmp_path, archive)
    root = Path(roots[0]["root"])
    assert _files(root) == {"d/NORMAL/1.png", "d/NORMAL/4.png", "d/PNEUMONIA/5.png"}
    assert (root / "d/NORMAL/4.png").read_bytes() == (root / "d/PNEUMONIA/5.png").read_bytes() == IMG
    assert (root / "d/NORMAL/4.png").stat().st_nlink == 1  # a copy, not a link
    assert not any(p.is_symlink() for p in root.rglob("*"))
    assert sum("skipping link" in r.getMessage() for r in caplog.records) == 2
    assert any("hard link 'd/NORMAL/7.png'" in r.getMessage() and "not extracted" in r.getMessage()
               for r in caplog.records)


def test_hard_link_copies_count_against_the_caps(tmp_path: Path) -> None:
    links = [_special(f"d/NORMAL/{i}.png", tarfile.LNKTYPE, "d/NORMAL/0.png") for i in range(1, 5)]
    archive = _tar(tmp_path / "in" / "a.tar", [_file("d/NORMAL/0.png"), *links])
    with pytest.raises(StepError, match="max_total_bytes"):
        _run(tmp_path, archive, cfg=_cfg(max_total_bytes=4 * len(IMG)))


@pytest.mark.parametrize("suffix", [".zip", ".tar"])
def test_duplicate_member_names_are_all_extracted(tmp_path: Path, suffix: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    copies = [IMG, IMG[::-1], IMG[:1000]]
    names = ["d/NORMAL/1.png", "d/NORMAL/1.png", "d/NORMAL/1.png", "d/NORMAL/1~2.png"]
    datas = [*copies, b"real ~2"]
    if suffix == ".zip":
        path = tmp_path / "in" / "a.zip"
        path.parent.mkdir(parents=True)
        with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "w") as zf:
            for name, data in zip(names, datas, strict=True):
                zf.writestr(name, data)
    else:
        path = _tar(tmp_path / "in" / "a.tar", [_file(n, d) for n, d in zip(names, datas, strict=True)])
    with caplog.at_level(logging.WARNING, logger="medflow.data.archives"):
        _, roots = _run(tmp_path, path)
    root = Path(roots[0]["root"]) / "d/NORMAL"
    got = {p.name: p.read_bytes() for p in root.iterdir()}
    # in archive order: the first keeps its name, later ones get ~2, ~3; a real "1~2.png" then gets ~2 itself
    assert got == {"1.png": IMG, "1~2.png": IMG[::-1], "1~3.png": IMG[:1000], "1~2~2.png": b"real ~2"}
    assert sum("appears more than once" in r.getMessage() for r in caplog.records) == 3


def _zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_nested_archives_are_extracted_one_level(tmp_path: Path) -> None:
    inner = _zip_bytes({"NORMAL/1.png": IMG, "PNEUMONIA/2.png": IMG[::-1]})
    archive = _zip(tmp_path / "in" / "outer.zip", {
        "ds/train.zip": inner, "ds/train/NORMAL/0.png": IMG[:500],  # the folder name is taken: train~2
        "ds/test.tar.gz": _tar_gz_bytes({"NORMAL/3.png": IMG[:2000]}), "__MACOSX/ds/._x.zip": b"junk",
    })
    summary, roots = _run(tmp_path, archive)
    root = Path(roots[0]["root"])
    assert _files(root) == {"ds/train/NORMAL/0.png", "ds/train~2/NORMAL/1.png", "ds/train~2/PNEUMONIA/2.png",
                            "ds/test/NORMAL/3.png"}  # the inner archives themselves are gone
    assert (root / "ds/test/NORMAL/3.png").read_bytes() == IMG[:2000]
    assert summary["extracted"] == 1


@pytest.mark.parametrize(("inner", "limits", "match"), [
    (_zip_bytes({"../evil.png": IMG}), {}, r"outer\.zip!ds/in\.zip: entry '\.\./evil\.png' escapes"),
    (_zip_bytes({"a/in2.zip": _zip_bytes({"x.png": IMG})}), {}, "inside an archive inside an archive"),
    (_zip_bytes({f"{i}.png": b"" for i in range(5)}), {"max_members": 5}, "max_members"),
    (_zip_bytes({"z.png": bytes(900_000)}), {}, "max_ratio"),  # the ratio is over the outer archive's size
    (b"not a zip at all", {}, r"outer\.zip!ds/in\.zip: corrupt"),
])
def test_nested_archive_keeps_the_outer_limits(tmp_path: Path, inner: bytes, limits: dict[str, Any],
                                               match: str) -> None:
    archive = _zip(tmp_path / "in" / "outer.zip", {"ds/in.zip": inner}, compression=zipfile.ZIP_STORED)
    with pytest.raises(StepError, match=match):
        _run(tmp_path, archive, cfg=_cfg(**limits))
    _assert_nothing_extracted(tmp_path)


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "proj" / "data/raw/t/extracted"
    (tmp_path / "proj" / ".dvc").mkdir(parents=True)
    staging = archives.staging_dir(out)
    assert staging == (tmp_path / "proj/.dvc/tmp/medflow/extract").resolve()  # outside every DVC output
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale, live = staging / f"{dead}.a-0123.x.tmp", staging / f"{os.getpid()}.b-4567.y.tmp"
    legacy = out / ".a-0123.zz.tmp"  # where earlier versions built it: inside the output
    for folder in (stale, live, legacy):
        (folder / "NORMAL").mkdir(parents=True)
        (folder / "NORMAL/1.png").write_bytes(IMG)
    assert set(archives.remove_stale_partials(out)) == {stale, legacy}
    assert live.is_dir() and not stale.exists() and not legacy.exists()


def test_staging_beside_the_output_outside_a_dvc_repo(tmp_path: Path) -> None:
    assert archives.staging_dir(tmp_path / "ex") == tmp_path.resolve() / ".medflow-extract-tmp"


def test_extract_killed_mid_way_leaves_nothing_partial(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real SIGKILL of ``medflow extract`` mid-archive; the re-run extracts exactly and removes the temp."""
    proj = tmp_path / "proj"
    (proj / ".dvc").mkdir(parents=True)
    rng = random.Random(1)
    members = {f"ds/NORMAL/{i:05d}.png": rng.randbytes(4096) for i in range(4000)}
    archive = _zip(proj / "in" / "big.zip", members, compression=zipfile.ZIP_STORED)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"dataset": {"name": "t", "sources": [str(archive)],
                                              "labels": {"NORMAL": 0, "PNEUMONIA": 1}}}))
    cfg = parse_config(json.loads(params.read_text()))
    sources, out = proj / "data/raw/t/sources.json", proj / "data/raw/t/extracted"
    download.run(cfg, out_dir=proj / "data/raw/t/downloads", sources_json=sources, inbox=tmp_path / "no-inbox")
    cmd = [sys.executable, "-m", "medflow.cli", "extract", "--params", str(params), "--sources-json",
           str(sources), "--out-dir", str(out), "--roots-json", str(proj / "data/raw/t/roots.json")]
    staging = proj / ".dvc/tmp/medflow/extract"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not any(staging.glob("*.tmp/ds/NORMAL/*.png")):
            time.sleep(0.002)  # poll for the partial folder to fill, then kill it mid-way
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"extract finished before it was killed: {err.decode()[-2000:]}"
    partial = list(staging.glob("*.tmp"))
    assert len(partial) == 1 and len(_files(partial[0])) < len(members)  # killed mid-way, left outside
    assert not out.exists() or list(out.iterdir()) == []  # nothing DVC would track
    with caplog.at_level(logging.WARNING, logger="medflow.data.archives"):  # the next run, in-process
        extract.run(cfg, sources_json=sources, out_dir=out, roots_json=proj / "data/raw/t/roots.json")
    assert any("removed a partial extraction" in r.getMessage() for r in caplog.records)
    assert list(staging.iterdir()) == []
    (folder,) = out.iterdir()
    assert _files(folder) == set(members)
    assert all((folder / name).read_bytes() == data for name, data in members.items())


# --------------------------------------------------------------------------------------------- hostile


@pytest.mark.parametrize("name", ["../evil.png", "data/../../evil.png", "..\\evil.png"])
def test_zip_entry_escaping_with_dotdot_is_refused(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "in" / "a.zip", {"ok/1.png": IMG, name: b"x"})
    with pytest.raises(StepError, match=rf"{archive.name}: entry .*evil.png.* escapes the target"):
        _run(tmp_path, archive)
    _assert_nothing_extracted(tmp_path)
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("name", ["/tmp/evil.png", "C:/evil.png", "c:evil.png"])
def test_absolute_entries_are_refused(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "in" / "a.zip", {name: b"x"})
    with pytest.raises(StepError, match="is an absolute path"):
        _run(tmp_path, archive)
    _assert_nothing_extracted(tmp_path)


def test_absolute_tar_entry_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "in" / "a.tar.gz", [_file("/abs/evil.png")])
    with pytest.raises(StepError, match=r"a.tar.gz: entry '/abs/evil.png' is an absolute path"):
        _run(tmp_path, archive)
    _assert_nothing_extracted(tmp_path)


@pytest.mark.parametrize(("type_", "target"), [
    (tarfile.SYMTYPE, "../../etc/passwd"), (tarfile.SYMTYPE, "/etc/passwd"), (tarfile.SYMTYPE, "../.."),
    (tarfile.LNKTYPE, "../outside.png"), (tarfile.LNKTYPE, "/etc/passwd"),
])
def test_tar_link_pointing_outside_is_refused(tmp_path: Path, type_: bytes, target: str) -> None:
    archive = _tar(tmp_path / "in" / "a.tar", [_file("d/1.png"), _special("d/link.png", type_, target)])
    with pytest.raises(StepError, match=rf"entry 'd/link.png' is a (symbolic|hard) link to '{target}'"):
        _run(tmp_path, archive)
    _assert_nothing_extracted(tmp_path)


def test_zip_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "in" / "a.zip"
    archive.parent.mkdir()
    info = zipfile.ZipInfo("d/link.png")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "../../secret")
    with pytest.raises(StepError, match="symbolic link to '../../secret'"):
        _run(tmp_path, archive)


@pytest.mark.parametrize("type_", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_devices_and_fifos_are_refused(tmp_path: Path, type_: bytes) -> None:
    archive = _tar(tmp_path / "in" / "a.tar", [_special("d/dev", type_)])
    with pytest.raises(StepError, match="entry 'd/dev' is a device file or fifo"):
        _run(tmp_path, archive)
    _assert_nothing_extracted(tmp_path)


def test_zip_bomb_ratio_is_refused_up_front(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "bomb.zip", {"NORMAL/zeros.png": bytes(20_000_000)})
    assert archive.stat().st_size < 100_000
    pattern = r"bomb.zip: declares 20000000 expanded bytes.*extract.max_ratio \(200\)"
    with pytest.raises(StepError, match=pattern):
        _run(tmp_path, archive)
    _assert_nothing_extracted(tmp_path)


def test_tar_gz_bomb_ratio_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "in" / "bomb.tgz", [_file("ok.png"), _file("zeros.png", bytes(5_000_000))])
    with pytest.raises(StepError, match=r"bomb.tgz: declares .*'zeros.png'.*extract.max_ratio \(50\)"):
        _run(tmp_path, archive, cfg=_cfg(max_ratio=50))
    _assert_nothing_extracted(tmp_path)


def test_total_bytes_cap(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "a.zip", {"1.png": IMG, "2.png": IMG[::-1]})
    _run(tmp_path, archive, cfg=_cfg(max_total_bytes=6000))
    archive2 = _zip(tmp_path / "in2" / "b.zip", {"1.png": IMG, "2.png": IMG[::-1], "3.png": IMG[:1]})
    with pytest.raises(StepError, match=r"b.zip: .* over extract.max_total_bytes \(6000\)"):
        _run(tmp_path, archive2, cfg=_cfg(max_total_bytes=6000))


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_members_cap(tmp_path: Path, suffix: str) -> None:
    names = [f"NORMAL/{k}.png" for k in range(5)]
    path = tmp_path / "in" / f"many{suffix}"
    archive = (_zip(path, {n: b"x" for n in names}) if suffix == ".zip"
               else _tar(path, [_file(n, b"x") for n in names]))
    _run(tmp_path, archive, cfg=_cfg(max_members=5))
    (tmp_path / "ex").rename(tmp_path / "ex-ok")
    (tmp_path / "roots.json").unlink()
    with pytest.raises(StepError, match=r"extract.max_members \(4\)"):
        _run(tmp_path, archive, cfg=_cfg(max_members=4))
    _assert_nothing_extracted(tmp_path)


def _patch_declared_size(path: Path, size: int) -> None:
    """Make a one-entry zip lie: rewrite the uncompressed size in its local and central headers."""
    data = bytearray(path.read_bytes())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, size)
    struct.pack_into("<I", data, central + 24, size)
    path.write_bytes(bytes(data))


def test_zip_lying_about_its_size_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "liar.zip", {"zeros.png": bytes(2_000_000)})
    _patch_declared_size(archive, 1000)
    with zipfile.ZipFile(archive) as zf:
        assert zf.infolist()[0].file_size == 1000  # the up-front check sees a harmless size
    with pytest.raises(StepError, match="liar.zip: (corrupt|.*holds more)"):
        _run(tmp_path, archive)
    _assert_nothing_extracted(tmp_path)


def test_streaming_count_catches_more_bytes_than_declared(tmp_path: Path) -> None:
    tally = archives._Tally(archive=Path("x.zip"), limits=_cfg().extract, compressed=10_000)
    with pytest.raises(StepError, match="'e.png' declares 10 bytes but holds more"):
        archives._write_member(io.BytesIO(bytes(11)), tmp_path / "e.png", 10, tally, "e.png")


def test_streaming_count_enforces_caps_whatever_was_declared(tmp_path: Path) -> None:
    tally = archives._Tally(archive=Path("x.zip"), limits=_cfg(max_total_bytes=100).extract, compressed=1000)
    with pytest.raises(StepError, match=r"expanded to more than .*extract.max_total_bytes \(100\)"):
        archives._write_member(io.BytesIO(bytes(2_000_000)), tmp_path / "e.png", 10**9, tally, "e.png")


def test_encrypted_zip_entry_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "enc.zip", {"1.png": IMG})
    data = bytearray(archive.read_bytes())  # set the "encrypted" flag bit in both headers
    data[data.find(b"PK\x03\x04") + 6] |= 1
    data[data.find(b"PK\x01\x02") + 8] |= 1
    archive.write_bytes(bytes(data))
    with pytest.raises(StepError, match="'1.png' is encrypted"):
        _run(tmp_path, archive)


def test_corrupt_archive_is_a_step_error(tmp_path: Path) -> None:
    archive = tmp_path / "in" / "broken.tar.gz"
    archive.parent.mkdir()
    good = _tar(tmp_path / "tmp" / "g.tar.gz", [_file("1.png", IMG * 20)]).read_bytes()
    archive.write_bytes(good[: len(good) // 2])
    with pytest.raises(StepError, match="broken.tar.gz: corrupt or truncated archive"):
        _run(tmp_path, archive)
    _assert_nothing_extracted(tmp_path)


def test_file_and_folder_of_one_name_conflict(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "in" / "a.tar", [_file("d/x"), _file("d/x/1.png")])
    with pytest.raises(StepError, match="conflicting entries"):
        _run(tmp_path, archive)


# --------------------------------------------------------------------------------------------- inputs


def test_missing_sources_json(tmp_path: Path) -> None:
    with pytest.raises(StepError, match="sources.json: not found; run the download step first"):
        extract.run(_cfg(), sources_json=tmp_path / "sources.json", out_dir=tmp_path / "ex",
                    roots_json=tmp_path / "roots.json")


@pytest.mark.parametrize("content", ["{not json", '{"a": 1}', '[{"url": "u", "kind": "rar", "path": "p"}]'])
def test_malformed_sources_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "sources.json").write_text(content)
    with pytest.raises(StepError, match="sources.json: "):
        extract.run(_cfg(), sources_json=tmp_path / "sources.json", out_dir=tmp_path / "ex",
                    roots_json=tmp_path / "roots.json")


def test_archive_gone_or_changed_since_download(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "in" / "a.zip", {"1.png": IMG})
    cfg = parse_config({"dataset": {"name": "t", "sources": [str(archive)], "labels": {"A": 0, "B": 1}}})
    sj = tmp_path / "sources.json"
    download.run(cfg, out_dir=tmp_path / "raw", sources_json=sj, inbox=tmp_path / "no-inbox")
    kw: dict[str, Any] = {"sources_json": sj, "out_dir": tmp_path / "ex", "roots_json": tmp_path / "r.json"}
    archive.write_bytes(archive.read_bytes() + b"x")
    with pytest.raises(StepError, match="size changed since the download step"):
        extract.run(cfg, **kw)
    archive.unlink()
    with pytest.raises(StepError, match=r"dataset.sources\[0\]: archive .*a.zip not found"):
        extract.run(cfg, **kw)


@pytest.mark.parametrize(("name", "expected"), [
    ("ChestXRay2017.zip", "ChestXRay2017-0123456789ab"), ("x.TAR.GZ", "x-0123456789ab"),
    ("x.tgz", "x-0123456789ab"), ("x.y.tar", "x.y-0123456789ab"),
])
def test_target_name(name: str, expected: str) -> None:
    assert archives.target_name(Path(name), "0123456789abcdef" * 4) == expected


@pytest.mark.parametrize(("name", "rel"), [("a/./b//c.png", "a/b/c.png"), ("./", None),
                                           ("a\\b.png", "a/b.png")])
def test_safe_relpath_normalises(name: str, rel: str | None) -> None:
    got = archives.safe_relpath(name, Path("x.zip"))
    assert (got.as_posix() if got else None) == rel


def test_melanoma_preset_zips_keep_the_challenge_split(tmp_path: Path, shipped_params: Path,
                                                       file_server: tuple[str, Path]) -> None:
    """The shipped melanoma sources are Udacity's class-folder zips of ISIC 2017 (train/, valid/, test/ inside):
    served over loopback HTTP in that layout, they download, extract and label, and each image keeps its
    zip's split, so split.keep_source_test (auto) keeps the official test set as the test split."""
    shipped = load_config(shipped_params, "melanoma")
    prefix = "https://s3-us-west-1.amazonaws.com/udacity-dlnfd/datasets/skin-cancer/"
    assert [s.url for s in shipped.dataset.sources] == [f"{prefix}{part}.zip" for part in ("train", "valid", "test")]
    base, served = file_server
    members = {"train": ("melanoma/ISIC_0000002.jpg", "nevus/ISIC_0000000.jpg"),
               "valid": ("seborrheic_keratosis/ISIC_0001769.jpg",),
               "test": ("melanoma/ISIC_0012258.jpg", "nevus/ISIC_0012086.jpg")}
    for part, names in members.items():
        _zip(served / f"{part}.zip", {f"{part}/{name}": IMG for name in names})
    local = [{"url": f"{base}/{part}.zip", "insecure": True} for part in members]
    data = shipped.model_dump(mode="json", by_alias=True)
    data["dataset"]["sources"] = local
    cfg = parse_config(data)
    download.run(cfg, out_dir=tmp_path / "raw", sources_json=tmp_path / "sources.json", inbox=tmp_path / "no-inbox")
    extract.run(cfg, sources_json=tmp_path / "sources.json", out_dir=tmp_path / "ex",
                roots_json=tmp_path / "roots.json")
    manifest.run(cfg, roots_json=tmp_path / "roots.json", out=tmp_path / "manifest.csv")
    rows = read_csv(tmp_path / "manifest.csv")
    got = set(rows[["relpath", "class_name", "label", "group", "source_split"]].itertuples(index=False, name=None))
    assert got == {("train/melanoma/ISIC_0000002.jpg", "melanoma", 1, "ISIC_0000002", "train"),
                   ("train/nevus/ISIC_0000000.jpg", "nevus", 0, "ISIC_0000000", "train"),
                   ("valid/seborrheic_keratosis/ISIC_0001769.jpg", "seborrheic_keratosis", 0, "ISIC_0001769", "val"),
                   ("test/melanoma/ISIC_0012258.jpg", "melanoma", 1, "ISIC_0012258", "test"),
                   ("test/nevus/ISIC_0012086.jpg", "nevus", 0, "ISIC_0012086", "test")}
    assert cfg.split.keeps_source_test(bool((rows["source_split"] == "test").any()))

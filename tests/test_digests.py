"""The manifest's stat-keyed digest cache (medflow.data.digests): an unchanged file is not opened again, a
changed one is re-hashed, a damaged cache is dropped, and the manifest CSV is the same bytes with or without it.

Opens are counted by a real CPython audit hook (``sys.addaudithook``, event ``open``: every ``open()``,
``io.open`` and ``os.open`` of this process and its threads, Pillow's and hashlib's reads included)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from medflow.config import Config, parse_config
from medflow.data import digests, manifest
from medflow.data.walk import folder_listing, listing_digest
from medflow.io import read_json, sha256_file, table_parts, write_json
from tasks.manifest import run

_WATCHED: list[tuple[str, list[str]]] = []
_HOOKED: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _WATCHED or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    for root, seen in _WATCHED:
        if path.startswith(root):
            seen.append(path)


@contextlib.contextmanager
def opened_under(root: Path) -> Iterator[list[str]]:
    """The files under ``root`` this process opens inside the block (an audit hook, installed once)."""
    if not _HOOKED:
        sys.addaudithook(_audit)  # cannot be removed: it does nothing outside this block
        _HOOKED.append(True)
    seen: list[str] = []
    _WATCHED.append((os.path.realpath(root) + os.sep, seen))
    try:
        yield seen
    finally:
        _WATCHED.pop()


def _cfg() -> Config:
    return parse_config({"dataset": {"name": "t", "labels": {"NORMAL": 0, "PNEUMONIA": 1}, "group_rule": "kermany"}})


def _dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A root of 5 images (PNG and JPEG, two classes) and a text file behind an image name, all modified an
    hour ago (older than the racy window), and its roots.json."""
    root = tmp_path / "root"
    for i, name in enumerate(["NORMAL/IM-0001-0001.jpeg", "NORMAL/IM-0002-0001.png", "PNEUMONIA/person1_virus_1.jpeg",
                              "PNEUMONIA/person1_virus_2.png", "PNEUMONIA/person2_bacteria_3.jpeg"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), np.random.default_rng(i).integers(0, 255, (30 + i, 40), dtype=np.uint8))
    (root / "NORMAL" / "IM-0003-0001.jpeg").write_text("text behind an image name")
    past = time.time_ns() - 3600 * 10**9
    for p in root.rglob("*.*"):
        os.utime(p, ns=(past, past))
    write_json(tmp_path / "roots.json", [{"root": str(root), "source": "test", "kind": "folder"}])
    return root, tmp_path / "roots.json"


def _db(cache: Path) -> Path:
    """The digest cache of the one root (the manifest step keeps one per root)."""
    (db,) = cache.glob(f"roots/*/{digests.FILE_NAME}")
    return db


def _manifest(tmp_path: Path, roots: Path, cache: Path | None, name: str) -> bytes:
    run(_cfg(), roots_json=roots, out=tmp_path / name, cache=cache)
    return manifest_bytes(tmp_path / name)


def test_a_second_run_opens_no_file_and_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, roots = _dataset(tmp_path)
    cache = tmp_path / "cache"
    without = _manifest(tmp_path, roots, None, "plain")
    monkeypatch.setattr(manifest, "CHUNK_ROWS", 4)  # two chunks: written one after the other, the same bytes
    assert _manifest(tmp_path, roots, None, "chunked") == without
    with opened_under(root) as first_opens:
        first = _manifest(tmp_path, roots, cache, "first")
    assert len(set(first_opens)) == 6  # the hook sees the reads: every file is opened once without a cache
    with opened_under(root) as opens:
        second = _manifest(tmp_path, roots, cache, "second")
    assert opens == []
    assert first == second == without
    with sqlite3.connect(_db(cache)) as con:
        assert con.execute("SELECT COUNT(*) FROM digests").fetchone()[0] == 6


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    """Same size, new content and mtime: re-hashed; a file modified just now is not cached (racy) at all."""
    root, roots = _dataset(tmp_path)
    cache = tmp_path / "cache"
    _manifest(tmp_path, roots, cache, "first")
    changed = root / "PNEUMONIA" / "person1_virus_2.png"
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    old = changed.stat().st_mtime_ns
    changed.write_bytes(bytes(data))
    os.utime(changed, ns=(old + 5 * 10**9, old + 5 * 10**9))
    fresh = root / "NORMAL" / "IM-0002-0001.png"
    os.utime(fresh)  # modified now: inside the racy window
    with opened_under(root) as opens:
        second = _manifest(tmp_path, roots, cache, "second")
    assert set(opens) == {os.path.realpath(changed), os.path.realpath(fresh)}
    assert sha256_file(changed).encode() in second
    assert second == _manifest(tmp_path, roots, None, "plain")
    with opened_under(root) as opens:
        _manifest(tmp_path, roots, cache, "third")
    assert set(opens) == {os.path.realpath(fresh)}  # still racy: read again, never trusted


@pytest.mark.parametrize("damage", ["garbage", "bad_row", "other_key"])
def test_a_damaged_cache_is_dropped_and_rebuilt(tmp_path: Path, damage: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    root, roots = _dataset(tmp_path)
    cache = tmp_path / "cache"
    first = _manifest(tmp_path, roots, cache, "first")
    db = _db(cache)
    if damage == "garbage":
        db.write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    else:
        with contextlib.closing(sqlite3.connect(db)) as con:
            sql = ("UPDATE digests SET sha256 = 'not a digest'" if damage == "bad_row"
                   else "UPDATE meta SET value = 'digests-0:0'")
            con.execute(sql)
            con.commit()
    with opened_under(root) as opens:
        second = _manifest(tmp_path, roots, cache, "second")
    assert len(set(opens)) == 6 and second == first
    assert (damage == "other_key") != ("damaged digest cache" in caplog.text)
    with opened_under(root) as opens:
        _manifest(tmp_path, roots, cache, "third")
    assert opens == []  # rebuilt


def test_batch_keys_resolve_links_as_realpath_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stat_keys resolves each folder once per batch; the keys equal one stat_key (os.path.realpath) per file,
    through a linked folder, a linked file and a relative path, so a cached row still matches its file."""
    from medflow.data.digests import stat_key, stat_keys

    real = tmp_path / "real" / "cls"
    real.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (real / name).write_bytes(name.encode())
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "inbox" / "file.png").symlink_to(real / "a.png")
    monkeypatch.chdir(tmp_path)
    paths = [Path("inbox/linked/cls/a.png"), Path("inbox/linked/cls/b.png"), Path("inbox/file.png"),
             tmp_path / "real" / "cls" / "b.png"]
    keys = stat_keys(paths)
    assert keys == [stat_key(p) for p in paths]
    assert keys[0] is not None and keys[2] is not None and keys[0].path == keys[2].path  # one file, two names
    assert keys[1] is not None and keys[3] is not None and keys[1].path == keys[3].path


# --- parts kept: a folder root whose listing digest is unchanged keeps its part of the table, unwalked -------


def _two_roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Folder roots ``a`` (the one in :func:`_dataset`) and ``b`` (two images), and a roots.json listing both with
    their listing digests, as the download and extract steps write them."""
    a, _ = _dataset(tmp_path)
    b = tmp_path / "b"
    for i, name in enumerate(["NORMAL/IM-0101-0001.png", "PNEUMONIA/person101_virus_1.png"]):
        (b / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(b / name), np.random.default_rng(50 + i).integers(0, 255, (36, 36), dtype=np.uint8))
    past = time.time_ns() - 3600 * 10**9
    for p in b.rglob("*.png"):
        os.utime(p, ns=(past, past))
    return a, b, _list_roots(tmp_path, [a, b])


def _list_roots(tmp_path: Path, roots: list[Path]) -> Path:
    write_json(tmp_path / "roots.json", [{"root": str(r), "source": str(r), "kind": "folder",
                                          "digest": listing_digest(folder_listing(r))} for r in roots])
    return tmp_path / "roots.json"


@contextlib.contextmanager
def walked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The roots the manifest walks inside the block."""
    seen: list[Path] = []
    real = manifest.iter_images
    monkeypatch.setattr(manifest, "iter_images", lambda root: (seen.append(Path(root)), real(root))[1])
    yield seen
    monkeypatch.setattr(manifest, "iter_images", real)


def _parts(table: Path) -> list[bytes]:
    return [p.read_bytes() for p in table_parts(table)]


def test_an_unchanged_folder_keeps_its_part_unwalked_and_a_changed_one_is_walked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, roots = _two_roots(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "manifest"
    first = run(_cfg(), roots_json=roots, out=out, cache=cache)
    before = _parts(out)
    assert len(before) == 2
    with walked(monkeypatch) as seen, opened_under(a) as opens_a, opened_under(b) as opens_b:
        again = run(_cfg(), roots_json=roots, out=out, cache=cache)
    assert seen == [] and opens_a == opens_b == [] and again == first and _parts(out) == before

    cv2.imwrite(str(b / "NORMAL" / "IM-0102-0001.png"), np.full((40, 40), 7, np.uint8))  # lands in b
    roots = _list_roots(tmp_path, [a, b])
    with walked(monkeypatch) as seen:
        grown = run(_cfg(), roots_json=roots, out=out, cache=cache)
    assert seen == [b] and grown["images"] == first["images"] + 1
    assert _parts(out)[0] == before[0] and _parts(out)[1] != before[1]
    assert manifest_bytes(out) == manifest_bytes(_fresh_with(tmp_path, roots, _cfg()))  # indexing everything


def manifest_bytes(table: Path) -> bytes:
    return b"".join(_parts(table))


@pytest.mark.parametrize("change", ["params", "tampered_part", "no_digest", "racy"])
def test_a_part_is_kept_only_when_it_is_what_indexing_would_make(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    a, b, roots = _two_roots(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "manifest"
    cfg = _cfg()
    if change == "racy":
        os.utime(a / "NORMAL" / "IM-0001-0001.jpeg")  # modified just now: its digest cannot be trusted yet
        roots = _list_roots(tmp_path, [a, b])
    run(cfg, roots_json=roots, out=out, cache=cache)
    if change == "params":
        cfg = parse_config({"dataset": {"name": "t", "labels": {"NORMAL": 1, "PNEUMONIA": 0},
                                        "group_rule": "kermany"}})
    elif change == "tampered_part":
        first = table_parts(out)[0]
        first.write_text(first.read_text().replace("IM-0001", "IM-0009"))
    elif change == "no_digest":
        write_json(roots, [{**e, "digest": None} for e in read_json(roots)])
    with walked(monkeypatch) as seen:
        run(cfg, roots_json=roots, out=out, cache=cache)
    assert a in seen
    assert manifest_bytes(out) == manifest_bytes(_fresh_with(tmp_path, roots, cfg))


def _fresh_with(tmp_path: Path, roots: Path, cfg: Config) -> Path:
    out = tmp_path / "fresh"
    run(cfg, roots_json=roots, out=out, cache=None)
    return out

"""Tests for the image store (medflow.imaging.store, medflow.io.ImageStore): keys, the plan, the round trip,
increments that add shards and leave old ones byte-identical, crashes, damage and the lock."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from resize_helpers import POOL, assert_no_output, config_for, image_set, load_images, run_step, write_clean

from medflow.errors import StepError
from medflow.imaging import decode, parallel, store
from medflow.io import STORE_INDEX, STORE_SHARDS, ImageStore
from tasks import resize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _small_pool_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "POOL_MIN_IMAGES", POOL)


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every shard file under ``folder/shards``, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / STORE_SHARDS).iterdir()}


def test_cache_key_depends_on_content_size_channels() -> None:
    base = store.cache_key("ab" * 32, 224, 1)
    assert base == store.cache_key("ab" * 32, 224, 1)
    assert len({base, store.cache_key("cd" * 32, 224, 1), store.cache_key("ab" * 32, 128, 1),
                store.cache_key("ab" * 32, 224, 3)}) == 4


def test_plan_keeps_known_rows_and_decodes_each_new_image_once() -> None:
    jobs = [store.Job(key, f"p{row}", None) for row, key in enumerate("abacd")]
    plan = store.plan_run(jobs, {"b": store.Entry("s.bin", 3), "d": store.Entry("t.bin", 0)})
    assert plan.hits == {1: store.Entry("s.bin", 3), 4: store.Entry("t.bin", 0)}
    assert [(t.job.key, t.rows) for t in plan.todo] == [("a", (0, 2)), ("c", (3,))]
    assert store.plan_run([], {}) == ({}, [])


def test_store_round_trip_across_shards_in_any_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    images = ImageStore(store.save_array(tmp_path / "s", array, shard_rows=3))  # 4 shards: 3+3+3+1 rows
    assert (images.shape, images.dtype, images.ndim, len(images)) == ((10, 4, 5, 3), np.uint8, 4, 10)
    assert len(list((tmp_path / "s" / STORE_SHARDS).iterdir())) == 4
    for rows in ([9, 0, 4, 4, 1], [0, 1, 2, 3], [], [7]):
        assert np.array_equal(images[np.array(rows, dtype=np.int64)], array[rows])
    assert np.array_equal(images[2:8], array[2:8]) and np.array_equal(images[-1], array[-1])
    rows = np.array([9, 0, 4, 1, 8])
    ordered = rows[np.argsort(images.locations(rows), kind="stable")]
    where = list(zip(images.shard[ordered], images.slot[ordered], strict=True))
    assert where == sorted(where)  # shard by shard, slot by slot (what training sorts a batch by)
    with pytest.raises(IndexError):
        images[np.array([10])]


def test_a_row_without_pixels_reads_as_zeros(tmp_path: Path) -> None:
    files = image_set(tmp_path, 3)
    clean = write_clean(tmp_path / "clean.csv", files)
    files[1].write_bytes(b"broken")
    resize.run(config_for(size=16), clean=clean, out=tmp_path / "out" / "images", stats=tmp_path / "s.json",
               cache=tmp_path / "cache")
    index = json.loads((tmp_path / "out" / "images" / STORE_INDEX).read_text())
    assert index["shard"][1] == -1  # the explicit marker: no pixels stored for it
    images = load_images(tmp_path / "out" / "images")
    assert not images[1].any() and images[0].any() and images[2].any()


def test_increment_adds_shards_and_leaves_old_ones_byte_identical(tmp_path: Path) -> None:
    files = image_set(tmp_path, POOL + 4)
    cfg = config_for(size=16, channels=1, workers=2)
    _, first = run_step(tmp_path, files[:-2], cfg)
    out, cache = tmp_path / "out" / "images", tmp_path / "cache"
    before, index_before = _digests(cache), (out / STORE_INDEX).read_bytes()
    assert first["new_shards"] == len(before) == first["shards"] == 1  # 2 decoders, one shard (64 MB holds all)
    _, same = run_step(tmp_path, files[:-2], cfg)  # nothing new: not one byte changes, so DVC sees no change
    assert same["decoded"] == 0 and _digests(cache) == before and (out / STORE_INDEX).read_bytes() == index_before
    images, second = run_step(tmp_path, files, cfg)  # +2 images: decoded by threads, one new shard
    after = _digests(cache)
    assert (second["decoded"], second["new_shards"]) == (2, 1)  # two threads, one shard: the plan places images
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 1
    added = set(after) - set(before)
    assert sum((cache / STORE_SHARDS / n).stat().st_size for n in added) == 2 * 16 * 16  # the new images alone
    for name in after:  # the published copy: hard links of the store's shards, no byte copied
        assert os.path.samefile(out / STORE_SHARDS / name, cache / STORE_SHARDS / name)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=16, channels=1))
    _, fewer = run_step(tmp_path, files[-2:], cfg)  # the store owns its shards: unreferenced ones go
    assert fewer["decoded"] == 0 and set(_digests(cache)) == added == set(_digests(out))


def test_the_shards_follow_the_plan_not_the_decoders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three images per shard, one image undecodable: one decoder or three threads make the same files."""
    monkeypatch.setattr(store, "SHARD_BYTES", 3 * 16 * 16)
    files = image_set(tmp_path, 8)
    clean = write_clean(tmp_path / "clean.csv", files)
    files[4].write_bytes(b"not an image")  # changed after the filter: a hole in the second shard (zeros)
    trees = []
    for workers in (1, 3):
        folder = tmp_path / f"w{workers}" / "images"
        summary = resize.run(config_for(size=16, channels=1, workers=workers), clean=clean, out=folder,
                             stats=tmp_path / f"w{workers}.json", cache=tmp_path / f"w{workers}" / "store")
        assert (summary["decoded"], summary["rejected"], summary["shards"]) == (7, 1, 3)
        trees.append({str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()})
    assert trees[0] == trees[1]
    assert sorted(len(data) for name, data in trees[0].items() if name != STORE_INDEX) == [2 * 256] + [3 * 256] * 2


_CRASHING_CALLER = """
import os, sys
sys.path[:0] = {paths!r}
from medflow.imaging import parallel, store
from tasks import resize
from medflow.config import parse_config
parallel.POOL_MIN_IMAGES = {pool}
def crash(*args, **kwargs):
    os._exit(3)  # a hard crash of the step once every image was decoded: no finally block runs
store.{where} = crash
cfg = parse_config({{"dataset": {{"name": "t", "sources": ["x"], "labels": {{"a": 0, "b": 1}}}},
                    "resize": {{"size": 16, "workers": 1}}}})
resize.run(cfg, clean={clean!r}, out={out!r}, stats={stats!r}, cache={cache!r})
"""


@pytest.mark.parametrize("where", ["finish_shards", "publish"])  # before the index; between index and copy
def test_a_crash_mid_write_leaves_the_previous_store_whole(tmp_path: Path, where: str) -> None:
    files = image_set(tmp_path, 6)
    first, _ = run_step(tmp_path, files[:3], config_for(size=16, channels=1))
    out, cache = tmp_path / "out" / "images", tmp_path / "cache"
    shards_before = _digests(out)
    clean = write_clean(tmp_path / "clean2.csv", files)
    script = tmp_path / "crash.py"
    script.write_text(_CRASHING_CALLER.format(
        paths=[str(ROOT), str(Path(__file__).parent)], pool=POOL, where=where, clean=str(clean), out=str(out),
        stats=str(tmp_path / "out" / "s.json"), cache=str(cache)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert np.array_equal(load_images(out), first) and _digests(out) == shards_before  # readable and whole
    if where == "finish_shards":  # the decoded bytes are in a part file no index points to
        assert any(p.name.startswith(store.PART_PREFIX) for p in (cache / STORE_SHARDS).iterdir())
    images, summary = run_step(tmp_path, files, config_for(size=16, channels=1))
    # a crash before the index costs its decoding; after it, only the published copy is made again
    assert (summary["cached"], summary["decoded"]) == ((3, 3) if where == "finish_shards" else (6, 0))
    assert not any(p.name.startswith(".") for p in (cache / STORE_SHARDS).iterdir())  # leftovers removed
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=16, channels=1))


def test_an_error_mid_run_keeps_the_previous_store_and_leaves_no_part(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    files = image_set(tmp_path, 3)
    first, _ = run_step(tmp_path, files[:2], config_for(size=16))
    out, cache = tmp_path / "out" / "images", tmp_path / "cache"
    index = (cache / STORE_INDEX).read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(cache / STORE_INDEX))

    monkeypatch.setattr(store, "write_index", full_disk)  # the new shard is named, the index cannot be written
    with pytest.raises(StepError, match="No space left on device"):
        run_step(tmp_path, files, config_for(size=16))
    assert (cache / STORE_INDEX).read_bytes() == index and np.array_equal(load_images(out), first)
    assert not any(p.name.startswith(store.PART_PREFIX) for p in (cache / STORE_SHARDS).iterdir())
    monkeypatch.undo()
    images, summary = run_step(tmp_path, files, config_for(size=16))  # the unreferenced shard: decoded again
    assert (summary["decoded"], summary["cached"], len(images)) == (1, 2, 3)
    assert len(_digests(cache)) == 2  # (one shard per run: the first run's and this one's, same name as before)


def test_a_short_shard_is_an_error_naming_it_and_the_next_run_decodes_its_rows(tmp_path: Path) -> None:
    files = image_set(tmp_path, 3)
    cfg = config_for(size=16)
    run_step(tmp_path, files, cfg)
    out = tmp_path / "out" / "images"
    (shard,) = (out / STORE_SHARDS).iterdir()
    os.unlink(shard)  # a damaged copy (its store file keeps its bytes: break the link first)
    shard.write_bytes(b"\0" * (2 * 16 * 16 * 3 + 5))  # the disk lost the last row
    with pytest.raises(StepError, match=f"{shard}: image shard damaged"):
        ImageStore(out)
    cached = tmp_path / "cache" / STORE_SHARDS / shard.name
    with open(cached, "r+b") as f:
        f.truncate(2 * 16 * 16 * 3 + 5)
    images, summary = run_step(tmp_path, files, cfg)
    assert (summary["decoded"], summary["cached"]) == (1, 2)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=16, channels=3))


def test_a_missing_shard_or_index_is_an_error_naming_it(tmp_path: Path) -> None:
    store.save_array(tmp_path / "s", np.zeros((2, 2, 2, 1), np.uint8))
    (shard,) = (tmp_path / "s" / STORE_SHARDS).iterdir()
    shard.unlink()
    with pytest.raises(StepError, match=f"{shard}: image shard missing"):
        ImageStore(tmp_path / "s")
    (tmp_path / "s" / STORE_INDEX).write_text("{not json")
    with pytest.raises(StepError, match=f"{tmp_path / 's' / STORE_INDEX}: not a readable image store index"):
        ImageStore(tmp_path / "s")
    with pytest.raises(StepError, match="images.npy/index.json: image store index not found.*older medflow"):
        ImageStore(tmp_path / "images.npy")


def test_damaged_index_starts_a_new_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = image_set(tmp_path, 2)
    first, _ = run_step(tmp_path, files, config_for(size=16))
    index = tmp_path / "cache" / STORE_INDEX
    index.write_bytes(b"\0" * 100)  # what a power loss can leave
    images, summary = run_step(tmp_path, files, config_for(size=16))
    assert summary["decoded"] == 2 and np.array_equal(images, first)
    assert "starting a new image store" in caplog.text and str(index) in caplog.text
    assert len(list((tmp_path / "cache" / STORE_SHARDS).iterdir())) == 1  # one shard of the same keys
    _, again = run_step(tmp_path, files, config_for(size=16))
    assert again["cached"] == 2


def test_the_first_run_removes_a_legacy_resize_cache(tmp_path: Path) -> None:
    (tmp_path / "cache" / STORE_SHARDS).mkdir(parents=True)
    (tmp_path / "cache" / "index.sqlite").write_bytes(b"old")
    (tmp_path / "cache" / STORE_SHARDS / "abc-1-2.bin").write_bytes(b"\0" * 100)
    run_step(tmp_path, image_set(tmp_path, 1), config_for(size=16))
    assert not (tmp_path / "cache" / "index.sqlite").exists()
    assert "abc-1-2.bin" not in _digests(tmp_path / "cache")


def test_locked_store_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = image_set(tmp_path, 1)
    run_step(tmp_path, files, config_for(size=16))
    monkeypatch.setattr(store, "_LOCK_TIMEOUT_S", 0.05)
    fd = os.open(tmp_path / "cache" / store.LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run writing to the same store, for too long
    try:
        with pytest.raises(StepError, match=f"{tmp_path / 'cache'}: the image store is locked"):
            run_step(tmp_path, files, config_for(size=16))
    finally:
        os.close(fd)


def test_unwritable_store_names_it(tmp_path: Path) -> None:
    files = image_set(tmp_path, 1)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the store folder should be")
    with pytest.raises(StepError, match="cache.*cannot write to the image store"):
        run_step(tmp_path, files, config_for(size=16))
    assert_no_output(tmp_path)


def test_out_and_cache_must_differ(tmp_path: Path) -> None:
    clean = write_clean(tmp_path / "clean.csv", image_set(tmp_path, 1))
    with pytest.raises(StepError, match="need two folders"):
        resize.run(config_for(size=16), clean=clean, out=tmp_path / "s", stats=tmp_path / "j.json",
                   cache=tmp_path / "s")


def _cache_files(project: Path) -> dict[str, int]:
    """DVC's cache objects (path -> size)."""
    return {str(p.relative_to(project)): p.stat().st_size for p in (project / ".dvc" / "cache").rglob("*")
            if p.is_file()}


@pytest.mark.integration  # two real `dvc repro` runs of the resize stage on 12 tiny images: about 10 s
def test_under_dvc_an_increment_caches_only_the_new_shard_and_index(tmp_path: Path) -> None:
    """dvc.yaml's declaration of resize (the published store not persistent, the store persistent and not
    cached): an increment adds one shard (the new images' bytes) and a new index to DVC's cache, and every
    file of the first run's published store is still in the cache, byte for byte."""
    import yaml

    bin_dir = Path(sys.executable).parent
    files = image_set(tmp_path, 12)
    project = tmp_path / "p"
    project.mkdir()
    env = {**os.environ, "MEDFLOW_PROJECT": str(ROOT), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(bin_dir / "dvc"), "init", "-q"], cwd=project, check=True, env=env)
    (project / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())  # the shipped link types
    (project / "params.yaml").write_text(yaml.safe_dump({"dataset": {"name": "t", "sources": ["x"], "labels": {
        "a": 0, "b": 1}, "channels": 1}, "resize": {"size": 16, "workers": 1}}))
    (project / "roots.json").write_text("[]\n")
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["resize"]["do"]
    outs = [o.replace("data/processed/${item}/", "").replace("data/interim/${item}/", "") if isinstance(o, str)
            else {k.replace("data/processed/${item}/", "").replace("data/interim/${item}/", ""): v
                  for k, v in o.items()} for o in spec["outs"]]
    assert outs[:2] == ["images", {"cache/resize": {"persist": True, "cache": False}}]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"resize": {
        "cmd": "medflow resize --params params.yaml --clean clean.csv --out images --stats resize.json "
               "--cache cache/resize --rejects resize_rejects.csv --roots-json roots.json",
        "deps": ["clean.csv", "roots.json"], "params": [{"params.yaml": ["resize"]}], "outs": outs}}}))

    def repro() -> None:
        proc = subprocess.run([str(bin_dir / "dvc"), "repro"], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    write_clean(project / "clean.csv", files[:10])
    repro()
    first = _cache_files(project)
    published = _digests(project / "images")
    write_clean(project / "clean.csv", files)  # +2 images
    repro()
    added = {k: v for k, v in _cache_files(project).items() if k not in first}
    assert {k: v for k, v in _cache_files(project).items() if k in first} == first  # nothing rewritten
    shards = [v for v in added.values() if v == 2 * 16 * 16]  # the new shard: the 2 new images alone
    assert len(shards) == 1 and len(added) == 3, added  # + the new index and the folder's .dir listing
    by_md5 = {k.replace("/", "")[-32:]: k for k in _cache_files(project)}
    for name, sha in _digests(project / "images").items():  # the published store is DVC's, shard for shard
        md5 = hashlib.md5((project / "images" / STORE_SHARDS / name).read_bytes()).hexdigest()
        assert md5 in by_md5 and (name not in published or published[name] == sha)
    status = subprocess.run([str(bin_dir / "dvc"), "status", "--json"], cwd=project, env=env, capture_output=True,
                            text=True, check=True)
    assert json.loads(status.stdout) == {}

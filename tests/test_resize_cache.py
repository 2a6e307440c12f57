"""Tests for medflow.imaging.cache: keys, the incremental plan, shards and index, crashes and damage."""

from __future__ import annotations

import mmap
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from resize_helpers import POOL, assert_no_output, config_for, image_set, key_of, run_step, write_clean

from medflow.errors import StepError
from medflow.imaging import cache, decode, parallel
from tasks import resize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _small_pool_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "POOL_MIN_IMAGES", POOL)


def test_cache_key_depends_on_content_size_channels() -> None:
    base = cache.cache_key("ab" * 32, 224, 1)
    assert base == cache.cache_key("ab" * 32, 224, 1)
    assert len({base, cache.cache_key("cd" * 32, 224, 1), cache.cache_key("ab" * 32, 128, 1),
                cache.cache_key("ab" * 32, 224, 3)}) == 4


def test_plan_copies_cached_rows_and_decodes_each_new_image_once() -> None:
    e = cache.CacheEntry
    jobs = [cache.Job(key, f"p{row}", None) for row, key in enumerate("abacd")]
    cached = {"b": e("s", 0, 10), "d": e("s", 10, 7)}  # d: bytes of another geometry, decoded again
    plan = cache.plan_run(jobs, cached, start=128, nbytes=10)
    assert plan.hits == [(1, cached["b"])]
    # a is in rows 0 and 2 (identical files): decoded once, written to both rows
    assert [(t.job.path, t.offsets) for t in plan.todo] == [("p0", (128, 148)), ("p3", (158,)), ("p4", (168,))]
    assert cache.plan_run([], {}, start=128, nbytes=10) == ([], [])


def test_copy_from_an_unaligned_offset_across_pages(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 3 * mmap.ALLOCATIONGRANULARITY, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(data)
    (tmp_path / "dst").write_bytes(b"\0" * 10_000)
    src_pos, nbytes = mmap.ALLOCATIONGRANULARITY - 100, mmap.ALLOCATIONGRANULARITY + 300
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "r+b") as dst:
        cache._copy(dst.fileno(), src.fileno(), nbytes, src_pos, 7)
    assert (tmp_path / "dst").read_bytes()[7:7 + nbytes] == data[src_pos:src_pos + nbytes]


def test_copy_from_a_shard_cut_short_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x" * 100)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst, \
            pytest.raises(StepError, match="shard shrank"):
        cache._copy(dst.fileno(), src.fileno(), 64, 50, 0)


def test_runs_coalesce_rows_contiguous_in_output_and_shard() -> None:
    e = cache.CacheEntry
    rows = [(0, e("a", 0, 10)), (1, e("a", 10, 10)), (2, e("a", 20, 10)),  # one run
            (3, e("b", 30, 10)),  # other shard
            (4, e("b", 50, 10)),  # gap in the shard
            (6, e("b", 60, 10))]  # gap in the output
    assert [(r, x.shard, x.offset, n) for r, x, n in cache._runs(rows)] == [
        (0, "a", 0, 3), (3, "b", 30, 1), (4, "b", 50, 1), (6, "b", 60, 1)]
    assert list(cache._runs([])) == []


def test_cut_shard_tail_is_decoded_again(tmp_path: Path) -> None:
    files = image_set(tmp_path, 3)
    cfg = config_for(size=16)
    run_step(tmp_path, files, cfg)
    entries = cache.cache_lookup(tmp_path / "cache", [key_of(f) for f in files])
    last = max(entries.values(), key=lambda e: e.offset)
    with open(last.shard, "r+b") as shard:  # the disk lost the end of the shard
        shard.truncate(last.offset + 5)
    images, summary = run_step(tmp_path, files, cfg)
    assert (summary["decoded"], summary["cached"]) == (1, 2)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=16, channels=3))
    assert len(cache.cache_lookup(tmp_path / "cache", [key_of(f) for f in files])) == 3


def test_bytes_without_index_records_at_a_shard_end_are_harmless(tmp_path: Path) -> None:
    """A crash between writing an entry and committing its record leaves a tail nobody reads."""
    files = image_set(tmp_path, 3)
    cfg = config_for(size=16)
    first, _ = run_step(tmp_path, files[:2], cfg)
    for shard in (tmp_path / "cache" / cache.SHARDS_DIR).iterdir():  # one per worker thread
        with open(shard, "ab") as f:
            f.write(b"\xff" * 1000)  # half an entry
    images, summary = run_step(tmp_path, files, cfg)
    assert (summary["decoded"], summary["cached"]) == (1, 2)
    assert np.array_equal(images[:2], first)
    assert np.array_equal(images[2], decode.load_resized(files[2], size=16, channels=3))


@pytest.mark.parametrize("n", [4, pytest.param(POOL + 4, marks=pytest.mark.slow)])
def test_cache_layout_one_shard_per_worker_of_a_run_that_decodes(tmp_path: Path, n: int) -> None:
    files = image_set(tmp_path, n)
    cfg = config_for(size=16, channels=1, workers=2)  # threads for 4 images, processes for 12
    shards = tmp_path / "cache" / cache.SHARDS_DIR
    run_step(tmp_path, files[:-1], cfg)
    first = {p.name for p in shards.iterdir()}
    assert 1 <= len(first) <= 2 and len({name.split("-")[0] for name in first}) == 1  # one run
    assert (tmp_path / "cache" / cache.INDEX_NAME).is_file()
    run_step(tmp_path, files[:-1], cfg)  # everything cached: no new shard
    assert {p.name for p in shards.iterdir()} == first
    _, summary = run_step(tmp_path, files, cfg)
    assert summary["decoded"] == 1 and len(list(shards.iterdir())) == len(first) + 1
    entries = cache.cache_lookup(tmp_path / "cache", [key_of(f, 16, 1) for f in files])
    assert len(entries) == n and {e.nbytes for e in entries.values()} == {16 * 16}
    # leftovers of the sqlite journal are gone once the run closed the index
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cache.INDEX_NAME, cache.SHARDS_DIR]


def test_cache_forget_makes_the_next_run_decode_those(tmp_path: Path) -> None:
    files = image_set(tmp_path, 3)
    run_step(tmp_path, files, config_for(size=16))
    assert cache.cache_forget(tmp_path / "cache", [key_of(files[0]), key_of(files[0]), "nope"]) == 1
    _, summary = run_step(tmp_path, files, config_for(size=16))
    assert (summary["decoded"], summary["cached"]) == (1, 2)
    assert cache.cache_lookup(tmp_path / "nothing", [key_of(files[0])]) == {}


_CRASHING_CALLER = """
import multiprocessing, os, sys
sys.path[:0] = {paths!r}
from medflow.imaging import cache, parallel
from tasks import resize
from medflow.config import parse_config
cache._COMMIT_EVERY = 2
parallel.POOL_MIN_IMAGES = {pool}
record = cache.IndexWriter.record
calls = []
def crash_on_fourth(self, *entry):
    calls.append(entry)
    if len(calls) == 4:
        for worker in multiprocessing.active_children():  # orphaned workers would wait forever
            worker.kill()
        os._exit(3)  # a hard crash of the step: no finally block, no commit
    record(self, *entry)
cache.IndexWriter.record = crash_on_fourth
cfg = parse_config({{"dataset": {{"name": "t", "sources": ["x"], "labels": {{"a": 0, "b": 1}}}},
                    "resize": {{"size": 16, "workers": {workers}}}}})
resize.run(cfg, clean={clean!r}, out={out!r}, stats={stats!r}, cache={cache!r})
"""


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: about 5 s
def test_hard_crash_keeps_only_committed_entries(tmp_path: Path, workers: int) -> None:
    files = image_set(tmp_path, POOL + 1)
    clean = write_clean(tmp_path / "clean.csv", files)
    script = tmp_path / "crash.py"
    script.write_text(_CRASHING_CALLER.format(
        paths=[str(ROOT), str(Path(__file__).parent)], workers=workers, pool=POOL,
        clean=str(clean), out=str(tmp_path / "out" / "images.npy"), stats=str(tmp_path / "out" / "s.json"),
        cache=str(tmp_path / "cache")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "images.npy").exists()  # (its temporary file stays: nobody removed it)
    # 3 or more entries written, records committed after the 2nd: exactly 2 count
    assert len(cache.cache_lookup(tmp_path / "cache", [key_of(f, 16, 1) for f in files])) == 2
    images, summary = run_step(tmp_path, files, config_for(size=16, channels=1, workers=workers))
    assert (summary["decoded"], summary["cached"]) == (len(files) - 2, 2)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=16, channels=1))


def test_a_failed_file_mid_run_is_not_cached_and_the_others_are(tmp_path: Path) -> None:
    files = image_set(tmp_path, 6)
    clean = write_clean(tmp_path / "clean.csv", files)
    good = files[3].read_bytes()
    files[3].write_bytes(b"broken")
    summary = resize.run(config_for(size=16), clean=clean, out=tmp_path / "out" / "images.npy",
                         stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache")
    assert (summary["decoded"], summary["rejected"]) == (5, 1)
    files[3].write_bytes(good)
    _, summary = run_step(tmp_path, files, config_for(size=16))
    assert (summary["decoded"], summary["cached"], summary["rejected"]) == (1, 5, 0)


def test_damaged_index_starts_a_new_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = image_set(tmp_path, 2)
    first, _ = run_step(tmp_path, files, config_for(size=16))
    index = tmp_path / "cache" / cache.INDEX_NAME
    index.write_bytes(b"this is not an SQLite database" * 200)  # what a power loss can leave
    images, summary = run_step(tmp_path, files, config_for(size=16))
    assert summary["decoded"] == 2 and np.array_equal(images, first)
    assert "damaged resize cache index" in caplog.text and str(index) in caplog.text
    assert len(list((tmp_path / "cache" / cache.SHARDS_DIR).iterdir())) == 1  # the old shard is gone
    _, again = run_step(tmp_path, files, config_for(size=16))
    assert again["cached"] == 2


def test_locked_index_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = image_set(tmp_path, 1)
    run_step(tmp_path, files, config_for(size=16))
    monkeypatch.setattr(cache, "_INDEX_TIMEOUT_S", 0.05)
    holder = sqlite3.connect(tmp_path / "cache" / cache.INDEX_NAME)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing to the same cache, for too long
    try:
        with pytest.raises(StepError, match=f"{cache.INDEX_NAME}: cannot use the resize cache index.*locked"):
            run_step(tmp_path, files, config_for(size=16))
    finally:
        holder.close()
    assert (tmp_path / "cache" / cache.INDEX_NAME).is_file()  # a busy index is never taken for damaged


def test_unwritable_cache_names_it(tmp_path: Path) -> None:
    files = image_set(tmp_path, 1)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(StepError, match="cache.*cannot write to the resize cache"):
        run_step(tmp_path, files, config_for(size=16))
    assert_no_output(tmp_path)

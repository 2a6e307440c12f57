"""Tests for medflow.imaging.parallel: chunking, processes vs threads, worker start-up and failures."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from conftest import run_caller_script
from resize_helpers import POOL, config_for, image_set, load_images, run_step, write_clean

from medflow.errors import StepError
from medflow.imaging import decode, parallel, store
from medflow.imaging.workers import PRELOAD
from medflow.io import ImageStore, read_csv
from tasks import resize


@pytest.fixture(autouse=True)
def _small_pool_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "POOL_MIN_IMAGES", POOL)


def test_chunks_in_row_order_and_shrinking() -> None:
    jobs = [store.Job(f"k{i}", f"p{i}", None) for i in range(100)]
    chunks = parallel._chunks(jobs, workers=2)
    sizes = [len(c) for c in chunks]
    assert sizes[0] == 100 // (4 * 2) and sizes[-4:] == [1, 1, 1, 1] and sizes == sorted(sizes, reverse=True)
    assert [j for c in chunks for j in c] == jobs
    assert parallel._chunks([], workers=2) == []


def test_chunks_sized_by_cost() -> None:
    """Ten costly images first (a class of large X-rays sorted first): they do not all go in one chunk."""
    costs = [10.0] * 10 + [1.0] * 90
    chunks = parallel._chunks(list(range(100)), workers=2, cost=lambda i: costs[i])
    spent = [sum(costs[i] for i in c) for c in chunks]
    assert len(chunks[0]) == 2 and spent[0] <= sum(costs) / 8  # 190 / 8: two costly images
    assert [i for c in chunks for i in c] == list(range(100)) and len(chunks[-1]) == 1
    assert parallel._chunks([7], workers=4, cost=lambda _: 1e12) == [[7]]  # one item over budget: alone


def test_pool_incremental_run_decodes_exactly_the_new_images(tmp_path: Path) -> None:
    files = image_set(tmp_path, POOL + 3)
    cfg = config_for(size=16, channels=1, workers=2)
    _, first = run_step(tmp_path, files[:-1] + [files[0]], cfg)  # a duplicate row too
    assert (first["decoded"], first["cached"], first["workers"]) == (len(files) - 1, 1, 2)
    images, second = run_step(tmp_path, files, cfg)
    assert (second["decoded"], second["cached"]) == (1, len(files) - 1)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=16, channels=1))


def test_process_pool_matches_in_process_decoding(tmp_path: Path) -> None:
    files = image_set(tmp_path, POOL + 2)
    images, summary = run_step(tmp_path, files, config_for(size=16, channels=3, workers=2))
    assert summary["workers"] == 2 and summary["decoded"] == len(files)
    for row, f in zip(images, files, strict=True):
        assert np.array_equal(row, decode.load_resized(f, size=16, channels=3))


def test_a_handful_of_new_images_decoded_by_threads(tmp_path: Path) -> None:
    files = image_set(tmp_path, 3)
    images, summary = run_step(tmp_path, files, config_for(size=16, workers=2))
    assert summary["workers"] == 2 and summary["decoded"] == 3
    assert np.array_equal(images[2], decode.load_resized(files[2], size=16, channels=3))


def test_workers_do_not_rerun_the_callers_main_module(tmp_path: Path) -> None:
    """The caller's script runs once, even without a __main__ guard (see medflow.imaging.workers.main_hidden)."""
    files = image_set(tmp_path, POOL)
    clean = write_clean(tmp_path / "clean.csv", files)
    run_caller_script(tmp_path, f"""
from medflow.imaging import parallel
from tasks import resize
from medflow.config import parse_config
parallel.POOL_MIN_IMAGES = {POOL}
cfg = parse_config({{"dataset": {{"name": "t", "sources": ["x"], "labels": {{"a": 0, "b": 1}}}},
                    "resize": {{"size": 16, "workers": 2}}}})
s = resize.run(cfg, clean={str(clean)!r}, out={str(tmp_path / "o")!r}, stats={str(tmp_path / "s.json")!r},
               cache={str(tmp_path / "cache")!r})
assert s["workers"] == 2 and s["decoded"] == {len(files)}, s
""")
    assert ImageStore(tmp_path / "o").shape == (len(files), 16, 16, 1)


def test_workers_start_without_pandas() -> None:
    """The fork server preloads these modules: they must not drag pandas or pydantic in (about 1 s per process)."""
    code = f"import sys, {', '.join(PRELOAD)}; sys.exit('pandas' in sys.modules or 'pydantic' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(("workers", "bad_row"), [(1, 3), (2, 0), (2, POOL - 1)])  # row 0: this process
def test_undecodable_file_is_a_reject_row_and_the_step_goes_on(tmp_path: Path, workers: int, bad_row: int) -> None:
    """A file broken after the filter passed it: a zero row, one reject row naming it, nothing cached; the
    others decoded by the worker processes or this one as usual. Repaired, it is decoded on the next run."""
    files = image_set(tmp_path, POOL)
    bad = files[bad_row]
    clean = write_clean(tmp_path / "clean.csv", files)
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # broken after the manifest was made
    out, rejects = tmp_path / "out" / "images", tmp_path / "out" / "resize_rejects.csv"
    cfg = config_for(size=16, workers=workers)
    summary = resize.run(cfg, clean=clean, out=out, stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache",
                         rejects=rejects)
    assert (summary["images"], summary["decoded"], summary["rejected"], summary["cached"]) == (POOL, POOL - 1, 1, 0)
    assert summary["workers"] == workers
    images, listed = load_images(out), read_csv(rejects)
    assert listed.to_dict("records") == [{"path": str(bad), "reason": resize.LATE_REASON,
                                          "detail": listed["detail"][0], "sha256": sha256_of(clean, bad_row),
                                          "bytes": len(good), "row": bad_row}]
    assert str(bad) not in listed["detail"][0] and "the filter passed it" in listed["detail"][0]
    assert not images[bad_row].any()
    for i, f in enumerate(files):
        if i != bad_row:
            assert np.array_equal(images[i], decode.load_resized(f, size=16, channels=3)), i
    bad.write_bytes(good)
    again = resize.run(cfg, clean=clean, out=out, stats=tmp_path / "out" / "stats.json", cache=tmp_path / "cache",
                       rejects=rejects)
    assert (again["decoded"], again["cached"], again["rejected"]) == (1, POOL - 1, 0) and len(read_csv(rejects)) == 0
    assert np.array_equal(load_images(out)[bad_row], decode.load_resized(bad, size=16, channels=3))


def sha256_of(clean: Path, row: int) -> str:
    return str(read_csv(clean)["sha256"][row])


def test_dead_worker_becomes_a_step_error() -> None:
    def results() -> Iterator[parallel.Written]:
        yield parallel.Written("k", True, "s.bin", 0)
        raise BrokenProcessPool("a worker was killed")

    got = parallel._unbroken(results())
    assert next(got) == ("k", True, "s.bin", 0)
    with pytest.raises(StepError, match=r"worker process died.*resize.workers: 1"):
        next(got)

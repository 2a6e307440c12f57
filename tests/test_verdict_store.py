"""The columnar verdict store (medflow.imaging.verdict_store) and the filter index built on it."""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from medflow.config import parse_config
from medflow.imaging import phash, quality, verdict_store
from medflow.imaging.verdict import Verdict
from medflow.imaging.verdict_store import VerdictStore

_FILTER = parse_config({"dataset": {"name": "t", "sources": ["x"], "labels": {"A": 0, "B": 1}}}).filter


def _sha(k: int) -> str:
    return hashlib.sha256(str(k).encode()).hexdigest()


def _thumb(rng: random.Random) -> str:
    return base64.b64encode(rng.randbytes(phash.THUMB_SIDE ** 2)).decode()


def _good(rng: random.Random) -> Verdict:
    crops = "".join(phash.to_hex(rng.getrandbits(64)) + _thumb(rng) for _ in phash.CROP_SCALES)
    return Verdict(phash=phash.to_hex(rng.getrandbits(64)), thumb=_thumb(rng), crops=crops,
                   mode=rng.choice(["L", "RGB"]), format="PNG", width=rng.randint(8, 4000),
                   height=rng.randint(8, 4000))


def _verdicts(n: int, seed: int = 0) -> dict[str, Verdict]:
    rng = random.Random(seed)
    out = {_sha(k): _good(rng) for k in range(n)}
    out[_sha(-1)] = Verdict("truncated", "no PNG IEND chunk après the last IDAT chunk", mode="RGB", format="PNG",
                            width=3, height=4)
    out[_sha(-2)] = Verdict("zero_bytes", "empty file")
    return out


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    verdicts = _verdicts(50)
    store = VerdictStore.build(verdicts.items())
    path = tmp_path / "index.npz"
    store.save(path, {"format": "x", "key": {"a": 1}})
    loaded, header = VerdictStore.load(path)
    assert header == {"format": "x", "key": {"a": 1}}
    assert dict(loaded) == verdicts
    assert list(loaded) == sorted(verdicts)  # rows sorted by sha256
    assert _sha(999) not in loaded
    assert loaded.rows([_sha(999), sorted(verdicts)[3]]).tolist() == [-1, 3]
    again = tmp_path / "again.npz"
    loaded.save(again, header)
    assert again.read_bytes() == path.read_bytes()  # equal stores, equal files


def test_merged_adds_rows_and_the_newer_verdict_wins() -> None:
    old = VerdictStore.build(list(_verdicts(5).items()))
    newer = Verdict("decode_error", "OSError: broken")
    both = old.merged(VerdictStore.build([(_sha(0), newer), (_sha(100), newer)]))
    assert len(both) == len(old) + 1
    assert both[_sha(0)] == newer and both[_sha(100)] == newer and both[_sha(1)] == old[_sha(1)]


def test_merged_and_concat_equal_one_build_of_all_pairs() -> None:
    """Random chunks, some sha256s in two of them: merging chunk by chunk, concatenating them, and building the
    store from every pair at once (a later pair wins) give the same rows, sorted, each sha256 once."""
    rng = random.Random(5)
    pool = list(_verdicts(300, seed=1).items()) + list(_verdicts(300, seed=2).items())  # each sha256 twice
    chunks = [[pool[rng.randrange(len(pool))] for _ in range(rng.randint(0, 80))] for _ in range(9)]
    stores = [VerdictStore.build(c) for c in chunks]
    expected = VerdictStore.build([pair for c in chunks for pair in c])
    stepwise = VerdictStore.empty()
    for store in stores:
        stepwise = stepwise.merged(store)
    for got in (stepwise, VerdictStore.concat(stores), stores[0].merged(VerdictStore.concat(stores[1:]))):
        assert got.sha.tolist() == expected.sha.tolist() == sorted(set(expected.sha.tolist()))
        assert dict(got) == dict(expected)


def test_the_index_writes_what_was_added_once_per_read_and_when_it_reaches_a_quarter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding verdicts packs them every _ADD_CHUNK and writes them into the index file (streaming its rows)
    when they reach _spill_rows or are read; never a merged copy in memory, and the file is one save of all."""
    writes = []
    real = quality.save_stores
    monkeypatch.setattr(quality, "save_stores",
                        lambda path, header, stores, **kw: writes.append([len(s) for s in stores]) or
                        real(path, header, stores, **kw))
    monkeypatch.setattr(quality, "_ADD_CHUNK", 16)
    monkeypatch.setattr(quality, "_SPILL_MIN", 64)
    index = quality.VerdictIndex(tmp_path / "index.npz", {"k": 1})
    verdicts = _verdicts(100)
    for sha, verdict in verdicts.items():
        index.add(sha, verdict)
    assert writes == [[0, 16, 16, 16, 16]] and len(index.store) == 64  # a quarter of 64 is less than 64
    assert dict(index.verdicts) == verdicts and writes[1:] == [[64, 16, 16, 6]]
    assert dict(index.verdicts) == verdicts and len(writes) == 2  # nothing new: no write
    assert isinstance(index.store.columns["thumb"], verdict_store._FileColumn)  # read from the file written
    VerdictStore.build(verdicts.items()).save(tmp_path / "whole.npz", {"format": quality._INDEX_FORMAT,
                                                                       "key": {"k": 1}, "fields": quality._FIELDS})
    assert index.path.read_bytes() == (tmp_path / "whole.npz").read_bytes()


@pytest.mark.parametrize("block", [3, 8192])
def test_a_loaded_store_reads_its_big_columns_from_the_file_row_by_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """Thumbnails and crop frames stay in the file: any rows asked for (one, a list with repeats, a mask, a
    row range of columns, a dense or a sparse set) are the built store's, also after another save replaced
    the file; a merged save streamed from it equals a save of all the pairs built at once."""
    monkeypatch.setattr(verdict_store, "_BLOCK_ROWS", block)
    verdicts = _verdicts(40)
    built = VerdictStore.build(verdicts.items())
    path = tmp_path / "index.npz"
    built.save(path, {})
    loaded, _ = VerdictStore.load(path)
    VerdictStore.build(_verdicts(7, seed=9).items()).save(path, {})  # replaced: the loaded store reads its own file
    rng = np.random.default_rng(0)
    for name in verdict_store.ON_DISK:
        column, want = loaded.columns[name], built.columns[name]
        assert isinstance(column, verdict_store._FileColumn) and column.shape == want.shape
        picks = [np.array([5]), rng.integers(0, len(want), 30), np.arange(len(want)), np.array([-1, 0, 0, 7]),
                 np.array([], dtype=np.int64), rng.random(len(want)) < 0.3]
        for rows in picks:
            assert (column[rows] == want[rows]).all()
        assert (column[3] == want[3]).all() and (column[rows, 2:9] == want[rows, 2:9]).all()
        with pytest.raises(IndexError):
            column[np.array([len(want)])]
    newer = VerdictStore.build([(_sha(0), Verdict("decode_error", "OSError: broken")),
                                *_verdicts(3, seed=4).items()])
    verdict_store.save_stores(tmp_path / "merged.npz", {}, [loaded, newer])
    VerdictStore.build([*verdicts.items(), *newer.items()]).save(tmp_path / "whole.npz", {})
    assert (tmp_path / "merged.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()


@pytest.mark.parametrize("damage", [lambda b: b[:-40], lambda b: b[: len(b) // 3], lambda b: b"junk" + b,
                                    lambda b: b""])
def test_damaged_file_is_a_value_error(tmp_path: Path, damage: object) -> None:
    path = tmp_path / "index.npz"
    VerdictStore.build(_verdicts(5).items()).save(path, {})
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(ValueError):
        VerdictStore.load(path)


def test_index_warns_naming_a_damaged_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _FILTER
    index = quality.VerdictIndex.load(tmp_path, cfg)
    for sha, v in _verdicts(3).items():
        index.add(sha, v)
    index.save()
    index.path.write_bytes(index.path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="medflow.imaging.quality"):
        assert len(quality.VerdictIndex.load(tmp_path, cfg).verdicts) == 0
    assert f"{index.path}: corrupt filter cache index" in caplog.text


def test_loading_the_index_holds_its_small_columns_alone(tmp_path: Path) -> None:
    """The format-1 JSON index held about 1 KB of Python objects a verdict before crop frames (about 1.8 KB
    with them), and its parse twice that; the columnar one read whole held its rows' bytes, about 900 a verdict.
    Loaded, it holds the columns but the thumbnails and crop frames (sha256 64, pHash 8, width and height 16,
    four string columns' pointers and offsets 64): under 250 bytes a verdict."""
    n = 3000
    cfg = _FILTER
    index = quality.VerdictIndex.load(tmp_path, cfg)
    for sha, v in _verdicts(n).items():
        index.add(sha, v)
    index.save()
    del index
    tracemalloc.start()
    try:
        loaded = quality.VerdictIndex.load(tmp_path, cfg)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(loaded.verdicts) == n + 2
    assert peak / n < 400 and held / n < 250, (held / n, peak / n)


def test_frames_from_the_columns_equal_those_parsed_from_the_texts() -> None:
    """The filter groups near duplicates from the store's columns; they must be the frames the texts give."""
    verdicts = _verdicts(40)
    store = VerdictStore.build(verdicts.items())
    good = [s for s, v in verdicts.items() if v.ok][::-1]  # any order
    hashes, thumbs = store.frames(good)
    want_h, want_t = phash.frames([verdicts[s].phash for s in good], [verdicts[s].thumb for s in good],
                                  [verdicts[s].crops for s in good])
    assert hashes.dtype == want_h.dtype and (hashes == want_h).all()
    assert thumbs.shape == want_t.shape
    everything = np.arange(want_t.shape[0] * want_t.shape[1])
    flat = want_t.reshape(-1, want_t.shape[2])
    assert (thumbs[everything] == flat).all()  # gathered on demand, frame by frame
    picked = np.array([5, 0, len(everything) - 1, 4, 4])
    assert thumbs[picked].dtype == np.uint8 and (thumbs[picked] == flat[picked]).all()

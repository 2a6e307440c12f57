"""Near-pair search (multi-index hashing against the all-pairs oracle) and the near-duplicate pixel check on a
labelled set from ../shared/data (tests/phash_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from phash_helpers import SHARED, TASKS, counts, groups, labelled_task, precision_recall

from medflow.config import load_config
from medflow.imaging import phash, quality

ROOT = Path(__file__).resolve().parents[1]
DATASET_OF = {"chest_xray": "pneumonia", "malaria_cells": "malaria", "skin_lesions": "melanoma",
              "covid_ct": "covid_ct"}


def _planted(n: int, seed: int) -> np.ndarray:
    """Random hashes plus copies with 1, 2, 3 and 4 bits flipped, and exact copies."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    out = [base, base[:5]]
    for flipped in range(1, 5):
        bits = rng.integers(0, 64, size=(n // 4, flipped))
        masks = np.array([sum(1 << int(b) for b in set(row)) for row in bits], dtype=np.uint64)
        out.append(base[:n // 4] ^ masks)
    return np.concatenate(out)


@pytest.mark.parametrize("distance", [0, 1, 2, 3, 4, 6])
def test_near_pairs_equal_the_all_pairs_search(distance: int) -> None:
    h = _planted(400, seed=distance)
    expected = phash.near_pairs_all(h, distance)
    expected = expected[np.lexsort((expected[:, 1], expected[:, 0]))]
    got = phash.near_pairs(h, distance)
    assert len(expected) >= 5  # planted pairs exist at every distance
    assert got.dtype == np.int64 and got.shape[1] == 2
    assert np.array_equal(got, expected)


def test_near_pairs_edge_cases() -> None:
    assert phash.near_pairs(np.zeros(0, dtype=np.uint64), 2).shape == (0, 2)
    assert phash.near_pairs(np.zeros(1, dtype=np.uint64), 2).shape == (0, 2)
    same = np.full(5, 0xABCDEF, dtype=np.uint64)  # one bucket in every band: each pair once
    assert phash.near_pairs(same, 2).tolist() == [[i, j] for i in range(5) for j in range(i + 1, 5)]
    h = _planted(50, seed=9)
    assert np.array_equal(phash.near_pairs(h, 20), phash.near_pairs_all(h, 20))  # wide: all-pairs path


def test_bands_cover_the_64_bits_once() -> None:
    for d in range(0, 16):
        b = phash.bands(d)
        assert len(b) == d + 1 and b[0][0] == 0 and sum(w for _, w in b) == 64
        assert all(s + w == b[k + 1][0] for k, (s, w) in enumerate(b[:-1]))


def test_thumbnails_round_trip_and_reject_garbage() -> None:
    img = np.random.default_rng(0).integers(0, 255, size=(100, 80)).astype(np.uint8)
    hashed, text = phash.fingerprint(img)
    assert hashed == phash.phash_hex(img) and len(text) == phash.THUMB_CHARS
    assert phash.fingerprint(img.astype(np.uint16) * 257) == (hashed, text)  # scale-free, like the hash
    thumbs = phash.thumbnails([text, phash.fingerprint(255 - img)[1], phash.fingerprint(np.zeros((9, 9)))[1]])
    assert thumbs.shape == (3, phash.THUMB_SIDE ** 2)
    r = phash.correlations(thumbs, np.array([[0, 0], [0, 1], [0, 2], [2, 2]]))
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and r[2] == 0.0 and r[3] == 1.0
    with pytest.raises(ValueError, match="item 1"):
        phash.thumbnails([text, "AAAA"])


def test_the_pixel_check_splits_a_hash_collision() -> None:
    shas = pd.Series(["a" * 64, "b" * 64, "c" * 64])
    hashes = pd.Series(["00000000ffffffff", "00000000ffffffff", "00000000fffffffc"])
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, size=(40, 40)).astype(np.uint8) for _ in range(2)]
    thumbs = pd.Series([phash.fingerprint(imgs[0])[1], phash.fingerprint(imgs[1])[1],
                        phash.fingerprint(imgs[0] // 2 + 10)[1]])
    by_hash = quality.near_duplicate_groups(shas, hashes, 2)
    assert by_hash.tolist() == ["a" * 64] * 3
    checked = quality.near_duplicate_groups(shas, hashes, 2, thumbs, 0.97)
    assert checked.tolist() == ["a" * 64, "b" * 64, "a" * 64]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data absent")
@pytest.mark.parametrize("task", TASKS)
def test_labelled_set_precision_and_recall_at_the_shipped_defaults(task: str) -> None:
    """40 originals of each task, each with its JPEG q50 re-encode, 0.8x resize and 5% crop, at the dataset's
    configured distance and correlation (params.yaml + datasets/<name>.yaml)."""
    fcfg = load_config(ROOT / "params.yaml", DATASET_OF[task]).filter
    s = labelled_task(task, 40)
    roots = groups(s, fcfg.near_duplicate_distance, fcfg.near_duplicate_min_correlation)
    precision, _ = precision_recall(*counts(s, roots))
    _, recall = precision_recall(*counts(s, roots, ("jpeg50", "resize80")))
    assert precision >= 0.99
    # Re-encodes and resizes only: a 5% crop moves the 64-bit pHash by 2-10 bits, mostly beyond distance 2, so
    # crops are not recalled (README, filter; benchmarks/bench_near_pairs.py prints their recall).
    assert recall >= 0.95

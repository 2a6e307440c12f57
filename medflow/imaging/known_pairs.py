"""The filter's near-duplicate links kept across runs: an increment checks only the candidate pairs it adds.

Grouping near duplicates (:func:`medflow.imaging.phash.frame_pairs`) finds candidate pairs among every
image's frame hashes and confirms each by its thumbnails' correlation. The candidates grow faster than the
images (random agreements on a hash band: 59,640 candidates for 283 links at 27,834 cells), and their
thumbnails are read from the verdict store, so confirming them all again when 1% lands cost nearly what the
first run did. A link depends on the two contents alone (their verdicts, fixed by sha256 and the verdict
key), the two grouping params and the linking code, so among the last run's images that are still there the
links are the ones found then: :class:`KnownPairs` keeps the contents searched and their links, one ``.npz``
file per key beside the verdict index, and a run confirms only the candidates with a new content at one end
(benchmarks/bench_known_pairs.py, a +1% increment: 0.49 -> 0.33 s at 27,558 cells, 8.8 -> 3.0 s at 110,000).
The groups (connected components over every link) are computed over all images each run, as before; the links
are the ones a search from scratch finds (``tests/test_phash.py``).

The file is a cache: missing, unreadable or written for another key, it is ignored (every candidate is
confirmed, and the file is written again); it is replaced atomically, sorted, with no time stamp.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medflow.imaging import phash
from medflow.io import atomic_open

log = logging.getLogger(__name__)

FORMAT = "medflow-known-pairs-1"
_SHA = "S64"  # a sha256 as its 64 hex digits


def rule_digest() -> str:
    """A digest of the linking rule's code (:mod:`medflow.imaging.phash` and this module), for the key: links
    kept under one rule are not taken for another."""
    h = hashlib.sha256()
    for source in (phash.__file__, __file__):
        h.update(Path(source).read_bytes())
    return h.hexdigest()[:16]


def pairs_path(cache: Path, key: dict[str, Any]) -> Path:
    """``<cache>/pairs-<digest of key>.npz``: one file per verdict key and grouping params."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache) / f"pairs-{digest}.npz"


@dataclass
class KnownPairs:
    """Contents whose candidate pairs were all checked (``searched``, sorted sha256s) and the links found among
    them (``pairs``: (k, 2) indices into ``searched``, i < j), saved to ``path`` under ``key``."""

    path: Path
    key: dict[str, Any]
    searched: npt.NDArray[np.bytes_] = field(default_factory=lambda: np.empty(0, dtype=_SHA))
    pairs: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))

    @classmethod
    def load(cls, cache: Path, key: dict[str, Any]) -> KnownPairs:
        """The links kept under ``cache`` for ``key``; none when absent, damaged or written for another key (a
        WARNING for the last two: the next save replaces the file)."""
        path = pairs_path(cache, key)
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes())
                searched, pairs = z["searched"], z["pairs"]
        except FileNotFoundError:
            return cls(path, key)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            log.warning("%s: cannot read the kept near-duplicate links (%s); every candidate pair is checked again",
                        path, e)
            return cls(path, key)
        problem = _problem(header, key, searched, pairs)
        if problem:
            log.warning("%s: %s; every candidate pair is checked again", path, problem)
            return cls(path, key)
        return cls(path, key, searched, pairs)

    def unsearched(self, shas: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """Per sha256 of ``shas``: whether its candidate pairs were never checked (a content new since the
        links were kept)."""
        return self._positions(shas) < 0

    def among(self, shas: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """The kept links whose two contents are both in ``shas``, as (i, j) positions into ``shas``, i < j."""
        where = self._positions(shas)
        at = np.full(len(self.searched), -1, dtype=np.int64)  # searched index -> its position in shas (-1: gone)
        found = where >= 0
        at[where[found]] = np.flatnonzero(found)
        linked = at[self.pairs] if len(self.pairs) else np.empty((0, 2), dtype=np.int64)
        linked = linked[(linked >= 0).all(axis=1)]
        return np.sort(linked, axis=1)

    def keep(self, shas: npt.NDArray[Any], pairs: npt.NDArray[np.int64]) -> None:
        """Hold ``pairs`` ((i, j) positions into ``shas``, the links of a search complete over ``shas``) as the
        links known among ``shas``."""
        values = np.asarray(shas, dtype=_SHA)
        order = np.argsort(values, kind="stable")
        rank = np.empty(len(values), dtype=np.int64)
        rank[order] = np.arange(len(values))
        ranked = np.sort(rank[np.asarray(pairs, dtype=np.int64).reshape(-1, 2)], axis=1)
        self.searched = values[order]
        self.pairs = np.unique(ranked, axis=0) if len(ranked) else np.empty((0, 2), dtype=np.int64)

    def save(self) -> None:
        """Write the file atomically (temp file, rename)."""
        header = np.frombuffer(json.dumps({"format": FORMAT, "key": self.key}, sort_keys=True).encode(), np.uint8)
        with atomic_open(self.path, "wb") as f:
            np.savez(f, header=header, searched=self.searched, pairs=self.pairs)

    def _positions(self, shas: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Index of each sha256 of ``shas`` in ``searched``, -1 where it is not there."""
        values = np.asarray(shas, dtype=_SHA)
        if not len(self.searched):
            return np.full(len(values), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.searched, values), len(self.searched) - 1)
        return np.where(self.searched[at] == values, at, -1)


def linked(shas: npt.NDArray[Any], hashes: npt.NDArray[np.uint64], thumbs: npt.NDArray[np.uint8] | phash.FrameThumbs,
           max_distance: int, min_correlation: float, known: KnownPairs | None = None) -> npt.NDArray[np.int64]:
    """The near-duplicate links among the contents ``shas`` (their frame ``hashes`` and ``thumbs``, as
    :func:`medflow.imaging.phash.frame_pairs` takes them): (i, j) positions, i < j, sorted, each once.

    With ``known``, only the candidate pairs with a content it has not searched at one end are confirmed (the
    links among the others are its own), and it then holds the links of ``shas``; the links are those a search
    from scratch finds. ``shas`` with a repeated content are searched from scratch (and ``known`` left as is).
    """
    if known is None or len(np.unique(np.asarray(shas, dtype=_SHA))) < len(shas):
        return phash.frame_pairs(hashes, max_distance, thumbs, min_correlation)
    found = phash.frame_pairs(hashes, max_distance, thumbs, min_correlation, involving=known.unsearched(shas))
    pairs = np.concatenate([known.among(shas), found])
    pairs = np.unique(pairs, axis=0) if len(pairs) else np.empty((0, 2), dtype=np.int64)
    known.keep(shas, pairs)
    return pairs


def _problem(header: dict[str, Any], key: dict[str, Any], searched: np.ndarray, pairs: np.ndarray) -> str:
    """What is wrong with a loaded file ('' if nothing): another format or key, or arrays that do not fit."""
    if header.get("format") != FORMAT or header.get("key") != key:
        return f"written as {header.get('format')} for {header.get('key')}, not for {key}"
    if searched.dtype != np.dtype(_SHA) or (len(searched) > 1 and not (searched[1:] > searched[:-1]).all()):
        return "its contents are not sorted sha256s"
    if pairs.dtype != np.int64 or pairs.ndim != 2 or pairs.shape[1] != 2:
        return f"its links are {pairs.dtype} {pairs.shape}, not (k, 2) int64"
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(searched) or (pairs[:, 0] >= pairs[:, 1]).any()):
        return "its links point outside its contents"
    return ""

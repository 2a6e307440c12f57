"""Perceptual hashing: 64-bit DCT pHash, Hamming distances, and near-duplicate groups.

Pure functions on arrays (no file I/O), so the filter step, tests and benchmarks share one implementation.

The hash (after Zauner 2010, the pHash.org recipe): the grayscale image is shrunk to 32x32 with
``INTER_AREA`` (a box filter, so it averages rather than aliases), transformed with a 2-D DCT, and the
top-left 8x8 block of lowest frequencies is kept. Each of its 64 coefficients gives one bit: 1 when it is
above the median of the 63 AC coefficients. The DC coefficient (mean brightness) is left out of the
median and its bit is always 0, so a global brightness change never changes the hash; a positive
contrast change does not either (the threshold scales with the coefficients). Every hash therefore has
31 set bits, and distances between hashes are even.

Re-encoding (JPEG quality, PNG vs JPEG) and mild resizing move only a few bits; unrelated photographs
differ in about 32. Homogeneous modalities are closer: on the 1,566 Kermany chest X-rays in
../shared/data, JPEG re-encoding at quality 60 moves at most 2 bits, but distinct X-rays of different
patients already collide at distance 2 (one pair) and 4 (twenty pairs).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

HASH_BITS = 64
_SIDE = 32  # the image is shrunk to _SIDE x _SIDE before the DCT
_LOW = 8  # the _LOW x _LOW lowest frequencies make the hash
THUMB_SIDE = 16  # the thumbnail kept for the pixel check, THUMB_SIDE x THUMB_SIDE uint8
THUMB_CHARS = 4 * -(-THUMB_SIDE * THUMB_SIDE // 3)  # its base64 length
_PAIR_BUDGET = 1 << 22  # XOR elements held at once by near_pairs (32 MiB of uint64)
# Crop frames: besides the full frame, each image is fingerprinted on centred crops keeping these fractions of
# its width and height, so that a slightly cropped copy (whose full frame is such a crop of the original)
# matches the original's frame (see frame_pairs).
CROP_SCALES = (0.95, 0.90)
FRAMES = 1 + len(CROP_SCALES)  # frames per image, the full frame first
FRAME_CHARS = 16 + THUMB_CHARS  # one crop frame as text: its pHash (hex) then its thumbnail
_CORR_CHUNK = 1 << 8  # pairs correlated at once by correlations(): 2 x 0.5 MB of float64 rows, about 2.5 MB with
# the temporaries (1 << 10 held about 9 MB, 1 << 12 peaked at 35 MB, 1 << 16 held 2 x 134 MB, most of the filter's
# peak RSS on 27,558 malaria-like cells, whose look-alikes give many candidates; a chunk costs about 0.1 ms of Python)


def phash(gray: npt.ArrayLike) -> int:
    """64-bit DCT perceptual hash of a 2-D grayscale image of any numeric dtype and scale."""
    return _hash_small(_small(gray))


def fingerprint(gray: npt.ArrayLike) -> tuple[str, str]:
    """(pHash as 16 hex digits, thumbnail as text) of a 2-D grayscale image, from one shared downscale.

    The thumbnail (:func:`thumbnail_text`) is what :func:`confirmed` compares pixel by pixel."""
    small = _small(gray)
    return to_hex(_hash_small(small)), thumbnail_text(small)


def crop_frames(gray: npt.ArrayLike) -> str:
    """The crop frames of a 2-D grayscale image (one per CROP_SCALES entry) as one text of FRAME_CHARS each:
    the pHash (16 hex digits) and thumbnail of the centred crop at that scale, what :func:`frames` reads."""
    img = _float_image(gray)
    parts = []
    for scale in CROP_SCALES:
        small = _small(centre_crop(img, scale))
        parts.append(to_hex(_hash_small(small)) + thumbnail_text(small))
    return "".join(parts)


def centre_crop(img: npt.NDArray[np.float32], scale: float) -> npt.NDArray[np.float32]:
    """The centred part of ``img`` keeping ``scale`` of its height and width (at least one pixel each)."""
    h, w = img.shape
    ch, cw = max(1, round(scale * h)), max(1, round(scale * w))
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y:y + ch, x:x + cw]


def _float_image(gray: npt.ArrayLike) -> npt.NDArray[np.float32]:
    img = np.asarray(gray, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ValueError(f"phash needs a non-empty 2-D grayscale array, got shape {img.shape}")
    return img


def _small(gray: npt.ArrayLike) -> npt.NDArray[np.float32]:
    img = _float_image(gray)
    return np.asarray(cv2.resize(img, (_SIDE, _SIDE), interpolation=cv2.INTER_AREA), dtype=np.float32)


def _hash_small(small: npt.NDArray[np.float32]) -> int:
    low = cv2.dct(small)[:_LOW, :_LOW].flatten()
    threshold = np.median(low[1:])  # AC coefficients only: the DC term is mean brightness
    bits = low > threshold
    bits[0] = False  # DC bit fixed at 0 (see module docstring)
    # Row-major over the 8x8 block: the most significant bit is the DC slot.
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail_text(small: npt.NDArray[np.float32]) -> str:
    """The 32x32 downscale as THUMB_SIDE^2 uint8 (min-max stretched, so any scale and dtype), base64 text."""
    thumb = cv2.resize(small, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA)
    lo, hi = float(thumb.min()), float(thumb.max())
    scaled = (thumb - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(thumb)
    return base64.b64encode(np.rint(scaled).astype(np.uint8).tobytes()).decode("ascii")


def thumbnails(texts: Sequence[str]) -> npt.NDArray[np.uint8]:
    """Thumbnail texts -> (n, THUMB_SIDE^2) uint8; ValueError naming the first malformed one."""
    out = np.empty((len(texts), THUMB_SIDE * THUMB_SIDE), dtype=np.uint8)
    for k, text in enumerate(texts):
        out[k] = _thumbnail(text, k)
    return out


def _thumbnail(text: str, item: int) -> npt.NDArray[np.uint8]:
    raw = base64.b64decode(text, validate=True) if len(text) == THUMB_CHARS else b""
    if len(raw) != THUMB_SIDE * THUMB_SIDE:
        raise ValueError(f"not a {THUMB_SIDE}x{THUMB_SIDE} thumbnail (item {item}): {text[:40]!r}")
    return np.frombuffer(raw, dtype=np.uint8)


def frames(hashes: Sequence[str], thumbs: Sequence[str],
           crops: Sequence[str]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint8]]:
    """Each image's frames, full frame first: (n, FRAMES) hashes and (n, FRAMES, THUMB_SIDE^2) thumbnails from
    the full-frame hex hashes, thumbnail texts and crop-frame texts (:func:`crop_frames`); ValueError naming
    the first malformed item. Decoded item by item into the arrays (no copies of the texts)."""
    n = len(hashes)
    if not len(thumbs) == len(crops) == n:
        raise ValueError(f"{n} hashes, {len(thumbs)} thumbnails and {len(crops)} crop frames")
    packed = np.empty((n, FRAMES), dtype=np.uint64)
    pixels = np.empty((n, FRAMES, THUMB_SIDE * THUMB_SIDE), dtype=np.uint8)
    packed[:, 0] = pack(hashes)
    pixels[:, 0] = thumbnails(thumbs)
    for k, text in enumerate(crops):
        for f, (value, thumb) in enumerate(crop_frame_parts(text, k), start=1):
            packed[k, f], pixels[k, f] = value, thumb
    return packed, pixels


def crop_frame_parts(text: str, item: int = 0) -> list[tuple[int, npt.NDArray[np.uint8]]]:
    """(pHash, thumbnail bytes) of each crop frame of one crop-frame text (:func:`crop_frames`), in
    CROP_SCALES order; ValueError naming ``item`` when it is malformed."""
    if len(text) != FRAME_CHARS * len(CROP_SCALES):
        raise ValueError(f"not {len(CROP_SCALES)} crop frames (item {item}): {text[:40]!r}")
    parts = []
    for f in range(len(CROP_SCALES)):
        at = f * FRAME_CHARS
        try:
            value = int(text[at:at + 16], 16)
        except ValueError:
            raise ValueError(f"not a hex hash in crop frame {f} (item {item}): {text[at:at + 16]!r}") from None
        parts.append((value, _thumbnail(text[at + 16:at + FRAME_CHARS], item)))
    return parts


def correlations(thumbs: npt.NDArray[np.uint8] | FrameThumbs,
                 pairs: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Pearson correlation of the two thumbnails of each pair (1.0 for two flat ones, 0.0 for one).

    Only the thumbnails of the pairs are converted, _CORR_CHUNK pairs at a time, so memory follows the
    candidates, not the number of thumbnails."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), _CORR_CHUNK):
        chunk = pairs[start:start + _CORR_CHUNK]
        a, a_flat = _centred_unit(thumbs[chunk[:, 0]])
        b, b_flat = _centred_unit(thumbs[chunk[:, 1]])
        out[start:start + len(chunk)] = np.where(a_flat & b_flat, 1.0, np.einsum("ij,ij->i", a, b))
    return out


def _centred_unit(rows: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Rows minus their mean, scaled to unit length (flat rows stay zero), and which rows were flat."""
    x = rows.astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.sqrt((x * x).sum(axis=1))
    flat = norm == 0
    x /= np.where(flat, 1.0, norm)[:, None]
    return x, flat


def confirmed(pairs: npt.NDArray[np.int64], thumbs: npt.NDArray[np.uint8] | FrameThumbs,
              min_correlation: float) -> npt.NDArray[np.int64]:
    """The candidate ``pairs`` whose thumbnails correlate at least ``min_correlation``."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return pairs
    return pairs[correlations(thumbs, pairs) >= min_correlation]


def to_hex(value: int) -> str:
    """A 64-bit hash as 16 lowercase hex digits."""
    return f"{value:016x}"


def from_hex(text: str) -> int:
    """Inverse of :func:`to_hex`; raises ValueError for anything but 1-16 hex digits."""
    if not 1 <= len(text) <= 16:
        raise ValueError(f"not a 64-bit hex hash: {text!r}")
    return int(text, 16)


def phash_hex(gray: npt.ArrayLike) -> str:
    """:func:`phash` as 16 hex digits (the form stored in the clean table)."""
    return to_hex(phash(gray))


def hamming(a: int | str, b: int | str) -> int:
    """Number of differing bits between two hashes (ints or hex strings)."""
    x = from_hex(a) if isinstance(a, str) else a
    y = from_hex(b) if isinstance(b, str) else b
    return (x ^ y).bit_count()


def pack(hexes: Iterable[str]) -> npt.NDArray[np.uint64]:
    """Hex hashes -> uint64 array, for vectorised distance search."""
    return np.array([from_hex(h) for h in hexes], dtype=np.uint64)


def popcount(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """Set bits per element of a uint64 array (np.bitwise_count on numpy>=2, a byte table otherwise)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)  # type: ignore[no-any-return]
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    as_bytes = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
    return table[as_bytes].sum(axis=-1, dtype=np.uint8)  # type: ignore[no-any-return]


def near_pairs_all(hashes: npt.NDArray[np.uint64], max_distance: int) -> npt.NDArray[np.int64]:
    """:func:`near_pairs` by brute force over the upper triangle: the benchmark's baseline and the tests' oracle.

    Row chunks are sized so that about ``_PAIR_BUDGET`` XORs are held at once: exact, memory-bounded, and
    O(n^2/2) popcounts (about a billion a second: 1.1 s at 27,558 hashes, 16 s at 110,000).
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    found: list[npt.NDArray[np.int64]] = []
    start = 0
    while start < n:
        rows = max(1, _PAIR_BUDGET // max(1, n - start))
        stop = min(n, start + rows)
        dist = popcount(h[start:stop, None] ^ h[None, start:])
        i, j = np.nonzero(dist <= max_distance)
        i += start
        j += start
        keep = j > i
        found.append(np.stack([i[keep], j[keep]], axis=1).astype(np.int64))
        start = stop
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.concatenate(found)


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the ``max_distance + 1`` bands that split the 64 bits for multi-index hashing."""
    count = min(max_distance + 1, HASH_BITS)
    edges = [HASH_BITS * k // count for k in range(count + 1)]
    return [(edges[k], edges[k + 1] - edges[k]) for k in range(count)]


def near_pairs(hashes: npt.NDArray[np.uint64], max_distance: int) -> npt.NDArray[np.int64]:
    """All index pairs (i, j), i < j, whose Hamming distance is at most ``max_distance``: shape (k, 2), sorted
    by (i, j), each pair once. The same output as :func:`near_pairs_all`, below its O(n^2).

    Multi-index hashing (Norouzi et al. 2012): the 64 bits are split into ``max_distance + 1`` bands, and a
    pair within ``max_distance`` bits agrees exactly on at least one band (pigeonhole). Per band the hashes
    are sorted by that band's value; every pair inside a run of equal values is a candidate, verified by
    popcount. Vectorised NumPy throughout (no Python loop over hashes): 110,000 real pHashes in about 0.1 s.
    The cost grows with the candidates, sum over bands of (run length)^2, so a band value shared by a big
    fraction of the hashes (a flood of identical images) degrades it towards the all-pairs search.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    if len(h) < 2:
        return np.empty((0, 2), dtype=np.int64)
    if max_distance + 1 > HASH_BITS // 4:  # bands under 4 bits prune nothing
        return near_pairs_all(h, max_distance)
    found = [_band_pairs(h, shift, width, max_distance) for shift, width in bands(max_distance)]
    pairs = np.concatenate(found)
    if not len(pairs):
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0)  # a pair agreeing on several bands is found once per band


def _band_pairs(h: npt.NDArray[np.uint64], shift: int, width: int, max_distance: int) -> npt.NDArray[np.int64]:
    """Verified pairs (i < j) among the hashes that agree exactly on bits ``shift .. shift + width``."""
    key = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    lengths = np.diff(np.r_[starts, len(h)])
    found: list[npt.NDArray[np.int64]] = []
    # Pairs at offset k inside a run: positions p and p + k with p + k still in the same run. One offset at
    # a time keeps memory at O(n) per step; runs are short, so few offsets are needed.
    run_end = np.repeat(starts + lengths, lengths)
    pos = np.arange(len(h))
    for k in range(1, int(lengths.max())):
        p = pos[pos + k < run_end[pos]]
        if not len(p):
            break
        a, b = order[p], order[p + k]
        close = popcount(h[a] ^ h[b]) <= max_distance
        a, b = a[close], b[close]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64))
        pos = p  # positions with no partner at offset k have none further on either
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


class FrameThumbs(Protocol):
    """Thumbnails of (n, F) frames gathered on demand: ``thumbs[frames]`` for flat frame indices
    ``image * F + frame`` gives their (k, THUMB_SIDE^2) uint8 rows (the verdict store's, read from its columns for
    the candidate pairs alone, not copied whole)."""

    shape: tuple[int, int, int]

    def __getitem__(self, frames: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]: ...


def frame_pairs(hashes: npt.NDArray[np.uint64], max_distance: int,
                thumbs: npt.NDArray[np.uint8] | FrameThumbs | None = None,
                min_correlation: float = -1.0, involving: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int64]:
    """Image pairs (i, j), i < j, sorted, each once, linked through their frames: some frame of one within
    ``max_distance`` bits of the other's full frame and, where ``thumbs`` are given, the thumbnails of those
    two frames correlating at least ``min_correlation``.

    ``hashes`` is (n, F) with the full frame in column 0 (as :func:`frames`; F = 1 is the full-frame rule
    alone), ``thumbs`` (n, F, THUMB_SIDE^2): an array, or a :class:`FrameThumbs`. A centred crop of an image
    then matches the image's crop frame at about its scale. All n * F frame hashes go through one
    :func:`near_pairs` search (sub-quadratic); pairs of two crop frames, or of one image's own frames, are
    dropped. ``involving`` (one flag per image): only the pairs with a flagged image at one end or both are
    confirmed and returned (the links the rest have among themselves are known: :mod:`medflow.imaging.known_pairs`).
    """
    h = np.asarray(hashes, dtype=np.uint64)
    if h.ndim != 2 or (thumbs is not None and thumbs.shape[:2] != h.shape):
        raise ValueError(f"frame hashes {h.shape} and thumbnails {None if thumbs is None else thumbs.shape}")
    n, f = h.shape
    pairs = near_pairs(h.reshape(-1), max_distance)  # indices image * f + frame
    image, frame = pairs // f, pairs % f
    wanted = ((frame[:, 0] == 0) | (frame[:, 1] == 0)) & (image[:, 0] != image[:, 1])
    if involving is not None:
        wanted &= involving[image[:, 0]] | involving[image[:, 1]]
    pairs = pairs[wanted]
    if thumbs is not None:
        flat = thumbs.reshape(n * f, thumbs.shape[2]) if isinstance(thumbs, np.ndarray) else thumbs
        pairs = confirmed(pairs, flat, min_correlation)
    linked = np.sort(pairs // f, axis=1)
    return np.unique(linked, axis=0) if len(linked) else np.empty((0, 2), dtype=np.int64)


def components(n: int, pairs: Sequence[tuple[int, int]] | npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Connected components of ``n`` items joined by ``pairs``: each item's label is the smallest index in
    its component (so "the group's first member" when items are in manifest order).

    The components come from :func:`scipy.sparse.csgraph.connected_components` on the undirected pair
    graph; its own labels are numbered by discovery, so they are mapped to each component's smallest index
    here rather than relied on.
    """
    # Imported here, not at the top: filter workers import this module (through medflow.imaging.verdict)
    # and need only phash(); scipy.sparse would add to every fork-server start for nothing.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if len(edges) and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"pair index out of range for {n} items: {edges.min()}..{edges.max()}")
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    smallest = np.full(count, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n, dtype=np.int64))
    return smallest[labels]

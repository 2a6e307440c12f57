"""A labelled near-duplicate set from ../shared/data, for tests/test_phash.py and benchmarks/bench_near_pairs.py.

Per task folder (the four datasets' images), a seeded sample of originals, and per original three known near
duplicates made from its bytes: a JPEG re-encode at quality 50, a 0.8x resize and a 5% crop (5% off each
dimension, centred). Every item goes through the filter's own verdict (medflow.imaging.verdict), so
the pHash and thumbnail are exactly those the filter stores. Positive pairs: each variant with its original;
negative pairs: every other pair of originals in the task (they include the real look-alike cells and slices).
A pair is linked when both items end in one near-duplicate group (the filter's transitive grouping, built per
task over originals and variants together), so chaining through a false link costs precision.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from medflow.imaging import phash, verdict
from medflow.schema import IMAGE_EXTENSIONS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("chest_xray", "malaria_cells", "skin_lesions", "covid_ct")  # the four datasets' shared images
VARIANTS = ("jpeg50", "resize80", "crop5")
_LIMITS = verdict.Limits(89_478_485, 1)


@dataclass
class Labelled:
    """One task's items: originals first (``origin[k] == k``), then their variants (``origin`` = the original)."""

    task: str
    hashes: npt.NDArray[np.uint64]
    thumbs: npt.NDArray[np.uint8]
    origin: npt.NDArray[np.int64]
    n_originals: int


def task_files(task: str, root: Path = SHARED) -> list[Path]:
    return sorted(p for p in (root / task).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _encode(im: Image.Image, fmt: str, **kw: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def variants(data: bytes, rng: np.random.Generator) -> list[bytes]:
    """The three near duplicates of one image's bytes (VARIANTS order)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if im.mode in ("L", "I", "I;16") else "RGB")
    w, h = im.size
    dw, dh = max(1, round(0.05 * w)), max(1, round(0.05 * h))
    x, y = dw // 2, dh // 2  # centred: 2.5% off each side
    return [_encode(im, "JPEG", quality=50),
            _encode(im.resize((round(0.8 * w), round(0.8 * h)), Image.Resampling.BICUBIC), "PNG", compress_level=1),
            _encode(im.crop((x, y, x + w - dw, y + h - dh)), "PNG", compress_level=1)]


def labelled_task(task: str, per_task: int | None, seed: int = 0, root: Path = SHARED) -> Labelled:
    """The labelled set of one task: ``per_task`` originals sampled with ``seed`` (None = every image)."""
    rng = np.random.default_rng(seed)
    files = task_files(task, root)
    if per_task is not None and per_task < len(files):
        files = [files[k] for k in sorted(rng.choice(len(files), per_task, replace=False))]
    originals = [f.read_bytes() for f in files]
    extra = [(k, v) for k, data in enumerate(originals) for v in variants(data, rng)]
    items = originals + [v for _, v in extra]
    found = [verdict.verdict(data, _LIMITS) for data in items]
    bad = [str(files[k]) for k, v in enumerate(found[:len(files)]) if not v.ok]
    assert not bad, f"shared images the filter rejects: {bad[:3]}"
    origin = np.r_[np.arange(len(files)), [k for k, _ in extra]].astype(np.int64)
    return Labelled(task, phash.pack(v.phash for v in found), phash.thumbnails([v.thumb for v in found]),
                    origin, len(files))


def groups(s: Labelled, max_distance: int, min_correlation: float | None) -> npt.NDArray[np.int64]:
    """Each item's group root under the filter's linking rule (None = pHash distance alone)."""
    pairs = phash.near_pairs(s.hashes, max_distance)
    if min_correlation is not None:
        pairs = phash.confirmed(pairs, s.thumbs, min_correlation)
    return phash.components(len(s.hashes), pairs)


def counts(s: Labelled, roots: npt.NDArray[np.int64],
           kinds: tuple[str, ...] = VARIANTS) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) over the labelled pairs, positives of ``kinds`` only."""
    n = s.n_originals
    kind = np.array(VARIANTS)[np.arange(len(roots) - n) % len(VARIANTS)]
    variant_linked = (roots[n:] == roots[s.origin[n:]])[np.isin(kind, kinds)]
    tp = int(variant_linked.sum())
    fn = len(variant_linked) - tp
    _, sizes = np.unique(roots[:n], return_counts=True)
    fp = int((sizes * (sizes - 1) // 2).sum())  # pairs of originals in one group
    return tp, fp, fn


def precision_recall(tp: int, fp: int, fn: int) -> tuple[float, float]:
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / (tp + fn) if tp + fn else 1.0)

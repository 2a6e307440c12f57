"""Shared helpers of the resize tests (test_decode, test_resize_store, test_resize_parallel, test_resize):
tiny generated images, clean.csv files in the pipeline's schema, and one-call runs of the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from medflow.config import Config, parse_config
from medflow.imaging import store
from medflow.io import ImageStore, read_json, sha256_file, write_csv
from medflow.schema import CLEAN_COLUMNS
from tasks import resize


def config_for(size: int = 32, channels: int = 3, workers: int = 1) -> Config:
    """A validated config of a two-class dataset with the resize parameters given."""
    return parse_config({"dataset": {"name": "t", "sources": ["x"], "labels": {"a": 0, "b": 1},
                                     "channels": channels},
                         "resize": {"size": size, "workers": workers}})


def save_image(path: Path, arr: np.ndarray, mode: str | None = None, **kw: Any) -> Path:
    """Save ``arr`` with Pillow (format from the suffix, ``kw`` its save options); the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, **kw) if mode else Image.fromarray(arr).save(path, **kw)
    return path


def write_clean(dest: Path, files: list[Path]) -> Path:
    """A clean.csv for ``files``, header facts read the way the manifest step reads them."""
    rows = []
    for f in files:
        with Image.open(f) as im:
            w, h, fmt, mode = im.width, im.height, im.format, im.mode
        rows.append({"path": str(f), "relpath": f.name, "root": str(f.parent), "class_name": "a", "label": 0,
                     "group": f.stem, "source_split": "", "sha256": sha256_file(f), "bytes": f.stat().st_size,
                     "width": w, "height": h, "mode": mode, "format": fmt, "phash": "0" * 16,
                     "dup_group": ""})
    write_csv(dest, pd.DataFrame(rows, columns=CLEAN_COLUMNS))
    return dest


POOL = 8  # the process-pool threshold these tests run with: a dozen tiny images exercise the pool


def run_step(tmp: Path, files: list[Path], cfg: Config,
             name: str = "clean.csv") -> tuple[np.ndarray, dict[str, Any]]:
    """Run the step on ``files`` (store ``tmp/cache``, outputs in ``tmp/out``): the images and the summary."""
    clean = write_clean(tmp / name, files)
    out, stats = tmp / "out" / "images", tmp / "out" / "stats.json"
    summary = resize.run(cfg, clean=clean, out=out, stats=stats, cache=tmp / "cache")
    assert read_json(stats) == summary
    return load_images(out), summary


def load_images(path: Path) -> np.ndarray:
    """Every row of the image store at ``path``, in one array (tests only: the readers gather batches)."""
    return ImageStore(path)[:]


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, natural-looking RGB image (low-frequency noise + gradient), so JPEG behaves realistically."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += (np.linspace(0, 60, w, dtype=np.int16)[None, :, None])
    return np.clip(img, 0, 255).astype(np.uint8)


def solid(rgb: tuple[int, int, int], h: int = 40, w: int = 50) -> np.ndarray:
    """An ``h x w`` RGB image of one colour."""
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def image_set(tmp_path: Path, n: int) -> list[Path]:
    """``n`` distinct images of mixed formats and sizes; image i has mean brightness rising with i."""
    files = []
    for i in range(n):
        arr = np.clip(texture(60 + 7 * i, 90 - 3 * i, seed=i) // 4 + 20 * i, 0, 255).astype(np.uint8)
        ext = ".png" if i % 2 else ".jpg"
        files.append(save_image(tmp_path / "img" / f"im{i:02d}{ext}", arr))
    return files


def key_of(f: Path, size: int = 16, channels: int = 3) -> str:
    """The image store key of file ``f`` at that geometry."""
    return store.cache_key(sha256_file(f), size, channels)


def assert_no_output(tmp_path: Path) -> None:
    """A failed run left nothing (no store, no stats, no temporary file) in ``tmp_path/out``."""
    out_dir = tmp_path / "out"
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def write_clean_unknown(dest: Path, files: list[Path], sha: str) -> Path:
    """A clean.csv with unknown header facts and one fixed digest (forces a decode of every row)."""
    df = pd.DataFrame({c: [""] * len(files) for c in CLEAN_COLUMNS})
    df["path"] = [str(f) for f in files]
    df["sha256"] = [sha[:-2] + f"{i:02d}" for i in range(len(files))]
    write_csv(dest, df)
    return dest

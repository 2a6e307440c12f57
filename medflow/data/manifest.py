"""Manifest: one row per image found under the image roots (see schema.MANIFEST_COLUMNS).

Labels come from the nearest ancestor folder that is a key of ``dataset.labels``; the patient/group id
from the dataset's rule applied to the file name (medflow.patients); the source's own split from an
ancestor folder named train/val/test. Headers are read (size, mode, format) but images are not decoded:
that is the filter's job. Files outside any labelled folder are skipped and counted; nothing is ever
modified. The manifest step (tasks/manifest.py) reads the roots and writes the CSV.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from medflow.io import SOURCE_ROOT, display_path, root_labels, sha256_file
from medflow.patients import group_of, join_runs
from medflow.schema import IMAGE_EXTENSIONS, JUNK_DIRS, JUNK_FILES, MANIFEST_COLUMNS, SOURCE_SPLIT_NAMES

log = logging.getLogger(__name__)


def iter_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` in sorted order, skipping OS junk and hidden AppleDouble files."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in JUNK_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name in JUNK_FILES or name.startswith("._"):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


def class_of(parts: tuple[str, ...], labels: Mapping[str, int]) -> str | None:
    """Nearest ancestor folder naming a class (exact match first, then case-insensitive)."""
    lowered = {k.lower(): k for k in labels}
    for part in reversed(parts):
        if part in labels:
            return part
        if part.lower() in lowered:
            return lowered[part.lower()]
    return None


def source_split_of(parts: tuple[str, ...]) -> str:
    """train/val/test when an ancestor folder carries the source's own split, else ''."""
    for part in reversed(parts):
        split = SOURCE_SPLIT_NAMES.get(part.lower())
        if split:
            return split
    return ""


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory (the project root under DVC), links kept
    (:func:`medflow.io.display_path`)."""
    return display_path(path)


def _shown(path: Path, rel: Path, root: str) -> str:
    """The manifest's ``path`` of an image: project-relative, or ``@<label>/<rel>`` under a source root outside
    the project (``root`` is then ``@<label>``): never absolute, never a home folder. The manifest, clean.csv,
    split.csv and the reports are shared; the steps that open files resolve it (:func:`medflow.io.readable_path`)."""
    return f"{root}/{rel.as_posix()}" if root.startswith(SOURCE_ROOT) else _display_path(path)


def _file_facts(path: Path) -> dict[str, Any]:
    """sha256, size and header facts of one file; header fields are None when it is not a readable image."""
    facts: dict[str, Any] = {"sha256": sha256_file(path), "bytes": path.stat().st_size,
                             "width": None, "height": None, "mode": None, "format": None}
    try:
        with Image.open(path) as im:
            facts.update(width=im.width, height=im.height, mode=im.mode, format=im.format)
    except Exception as e:  # noqa: BLE001 - any header failure is recorded; the filter names the reason
        log.debug("no readable header in %s: %s", path, e)
    return facts


def build_manifest(roots: list[Path], labels: Mapping[str, int], pattern: re.Pattern[str],
                   workers: int = 8, rule: str = "") -> tuple[pd.DataFrame, dict[str, int]]:
    """Index the images under ``roots``: one row per image of a labelled class folder, in walk order.

    ``pattern`` is the dataset's patient/group rule (medflow.patients); a file name it does not match
    becomes a group of its own (its stem) and is counted under ``group_rule_fallback``. ``rule`` is the
    rule's name (``dataset.group_rule``): a named rule with runs joins them (:func:`join_runs`). Returns the
    manifest (schema.MANIFEST_COLUMNS) and the counts ``no_class_folder`` (skipped) and
    ``group_rule_fallback``. Files are read (sha256, image header) by ``workers`` threads, never written.
    """
    rows: list[dict[str, Any]] = []
    skipped = {"no_class_folder": 0, "group_rule_fallback": 0}
    labels_of = root_labels(str(r) for r in roots)
    for root in roots:
        shown = f"{SOURCE_ROOT}{labels_of[str(root)]}" if str(root) in labels_of else _display_path(root)
        for path in iter_images(root):
            rel = path.relative_to(root)
            cls = class_of(rel.parts[:-1], labels)
            if cls is None:
                skipped["no_class_folder"] += 1
                continue
            group = group_of(path.name, pattern)
            if group is None:
                skipped["group_rule_fallback"] += 1
                group = path.stem
            rows.append({"path": _shown(path, rel, shown), "relpath": rel.as_posix(), "root": shown,
                         "class_name": cls, "label": labels[cls], "group": group,
                         "source_split": source_split_of(rel.parts[:-1]), "_abs": path})
    groups = join_runs([Path(r["relpath"]).name for r in rows],
                       [f"{r['root']}/{Path(r['relpath']).parent}" for r in rows], [r["group"] for r in rows], rule)
    for r, group in zip(rows, groups, strict=True):
        r["group"] = group
    with ThreadPoolExecutor(max_workers=workers) as pool:
        facts = list(pool.map(_file_facts, [r.pop("_abs") for r in rows]))
    df = pd.DataFrame([{**r, **f} for r, f in zip(rows, facts, strict=True)], columns=MANIFEST_COLUMNS)
    return df.astype({"width": "Int64", "height": "Int64", "bytes": "int64", "label": "int64"}), skipped

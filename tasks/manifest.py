"""The manifest step (dvc.yaml stage manifest): roots.json -> the manifest table, one row per image.

Reads the image roots the extract step listed, indexes each with :func:`medflow.data.manifest.manifest_chunks`
(class from the folder, patient id from ``dataset.group_rule``; the root's digest cache spares unchanged files)
and writes the table atomically, chunk by chunk, one part per root (memory stays flat in the number of images).
A folder root whose listing digest, params and code are those its previous part was made with keeps that part
byte for byte, unwalked: an increment costs the roots it changed, not the whole inbox.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import medflow
from medflow.config import Config
from medflow.data.digests import FILE_NAME, DigestCache
from medflow.data.manifest import manifest_chunks, root_columns
from medflow.errors import StepError
from medflow.io import TableWriter, read_json, sha256_file, write_json
from medflow.patients import project_salt

log = logging.getLogger(__name__)


def _read_roots(roots_json: Path) -> list[dict[str, Any]]:
    """The image roots listed in ``roots_json`` (its records); StepError naming the file when it or a root is
    missing."""
    try:
        entries = read_json(roots_json)
    except FileNotFoundError:
        raise StepError(f"{roots_json}: not found (run the extract step first)") from None
    for e in entries:
        if not Path(e["root"]).is_dir():
            raise StepError(f"{roots_json}: image root {e['root']} is not a folder")
    return list(entries)


@dataclass
class _Counts:
    """Images, patients/groups and images per class of the manifest, counted chunk by chunk."""

    images: int = 0
    groups: set[str] = field(default_factory=set)
    per_class: Counter[str] = field(default_factory=Counter)

    def add(self, df: pd.DataFrame) -> None:
        self.images += len(df)
        self.groups.update(df["group"].dropna())
        self.per_class.update(df["class_name"])

    def add_part(self, part: Path) -> int:
        """Count the rows of a reused part (the csv module: two columns, no DataFrame); their number."""
        with open(part, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            group, cls = header.index("group"), header.index("class_name")
            n = 0
            for row in reader:
                n += 1
                if row[group]:
                    self.groups.add(row[group])
                self.per_class[row[cls]] += 1
        self.images += n
        return n

    def summary(self, skipped: dict[str, int]) -> dict[str, Any]:
        """The step's summary, with the skipped counts."""
        return {"images": self.images, "patients": len(self.groups), "per_class": dict(sorted(self.per_class.items())),
                **skipped}


def _warn_skipped(skipped: dict[str, int], cfg: Config) -> None:
    if skipped["no_class_folder"]:
        log.warning("%d image files are outside any class folder of dataset.labels and were skipped",
                    skipped["no_class_folder"])
    if skipped["group_rule_fallback"]:
        log.warning("%d file names do not match dataset.group_rule %r; each is its own group",
                    skipped["group_rule_fallback"], cfg.dataset.group_rule)
    if skipped.get("dicom_patient_from_study"):
        log.warning("%d DICOM files have no PatientID; each is grouped by its StudyInstanceUID (one study = one "
                    "patient: two studies of one patient may then land in different splits)",
                    skipped["dicom_patient_from_study"])


def _no_images(roots: list[Path], cfg: Config) -> str:
    """Why no image was indexed: class folders dropped straight into the inbox (each became a root of its
    own, with no class folder below it), or labels that name no folder."""
    found = f"no images of classes {sorted(cfg.dataset.labels)} found under {', '.join(map(str, roots))}"
    loose = [r for r in roots if r.name in cfg.dataset.labels]
    if loose:
        return (f"{found}: {loose[0]} is itself a class folder; every inbox entry is one source with class "
                f"folders inside it, so put them in one folder ({loose[0].parent / 'mydata' / loose[0].name}/...)")
    return f"{found} (check dataset.labels in the dataset's catalog file)"


def run(cfg: Config, *, roots_json: Path, out: Path, cache: Path | None = None) -> dict[str, Any]:
    """Write the manifest table for every image under the roots listed in ``roots_json``; return its summary.

    ``cache``: the folder of the step's caches (persistent across runs; None: every file is read, nothing is
    reused). Each root gets its own digest cache (:mod:`medflow.data.digests`: files whose stat it knows are
    not read again), and a folder root whose listing digest (roots.json, from the download step's walk) is the
    one its part of the previous table was made from, with the same labels, group rule and code, keeps that
    part as it is: it is not walked, stat'ed or looked up (:data:`PARTS_RECORD`)."""
    entries = _read_roots(roots_json)
    roots = [Path(e["root"]) for e in entries]
    rule = cfg.dataset.group_rule
    salt = project_salt(Path.cwd()) if rule == "dicom" else None  # DVC runs the step in the project root
    key = _reuse_key(cfg, salt)
    previous = _previous_parts(cache, key, out)
    keys = root_columns(roots)
    counts, skipped, made = _Counts(), Counter[str](), []
    with TableWriter(out) as table:
        table.reserve(keys)
        for index, (entry, column) in enumerate(zip(entries, keys, strict=True)):
            kept = previous.get(entry["root"])
            if kept is not None and _keepable(entry) and kept["digest"] == entry["digest"]:
                table.add_part(column, kept["path"], counts.add_part(kept["path"]))
                skipped.update(kept["skipped"])
                made.append({**kept, "reused": True})
                continue
            digests = DigestCache(_root_cache(cache, entry["root"]), salt or b"")
            own: dict[str, int] = {}
            for df in manifest_chunks(roots, cfg.dataset.labels, cfg.dataset.group_pattern, own, rule=rule,
                                      salt=salt, cache=digests, only=index):
                table.write(df)
                counts.add(df)
            skipped.update(own)
            if _keepable(entry) and digests.complete and not own.get("unreadable"):
                made.append({"root": entry["root"], "column": column, "digest": entry["digest"], "skipped": own})
        if not counts.images:
            raise StepError(_no_images(roots, cfg))
        names = table.part_names()
    _record_parts(cache, key, out, made, names, [e["root"] for e in entries])
    summary = counts.summary({k: skipped[k] for k in sorted(skipped)} | _zero_skips(rule, skipped))
    _warn_skipped(summary, cfg)
    reused = sum(1 for m in made if m.get("reused"))
    log.info("manifest: %d images, %d patients/groups, per class %s -> %s%s",
             summary["images"], summary["patients"], summary["per_class"], out,
             f" ({reused} of {len(entries)} roots unchanged: their parts kept)" if reused else "")
    return summary


def _keepable(entry: dict[str, Any]) -> bool:
    """Whether a root's part may be kept across runs: a folder root with a listing digest (an archive root's
    digest is the archive's, not its extracted folder's)."""
    return entry.get("kind") == "folder" and bool(entry.get("digest"))


def _zero_skips(rule: str, skipped: Counter[str]) -> dict[str, int]:
    """The skip counts every summary carries, zero where nothing was skipped."""
    names = ["no_class_folder", "group_rule_fallback", *(["dicom_patient_from_study"] if rule == "dicom" else [])]
    return {n: skipped[n] for n in names}


# ---------------------------------------------------------------------------------------------------------
# parts kept across runs


PARTS_RECORD = "parts.json"  # in the cache folder: how each part of the last table was made
ROOT_CACHES = "roots"  # in the cache folder: one digest cache per root, by the root's path digest


def _root_cache(cache: Path | None, root: str) -> Path | None:
    return None if cache is None else cache / ROOT_CACHES / hashlib.sha256(root.encode()).hexdigest()[:16]


def _reuse_key(cfg: Config, salt: bytes | None) -> str:
    """What a kept part must have been made with: the labels, the group rule and pattern, the DICOM salt's
    digest, and the code (every module of the medflow package and this step: any change indexes every root
    again)."""
    h = hashlib.sha256()
    package = Path(medflow.__file__).parent
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    h.update(Path(__file__).read_bytes())
    d = cfg.dataset
    h.update(json.dumps({"labels": d.labels, "rule": d.group_rule, "pattern": d.group_pattern.pattern,
                         "salt": hashlib.sha256(salt or b"").hexdigest()}, sort_keys=True).encode())
    return h.hexdigest()


def _previous_parts(cache: Path | None, key: str, out: Path) -> dict[str, dict[str, Any]]:
    """Root -> its record in :data:`PARTS_RECORD` with ``path``, its part in the previous table ``out``, for the
    parts made with ``key`` whose file is still the one recorded (sha256); none when there is no record."""
    if cache is None or not (cache / PARTS_RECORD).is_file():
        return {}
    try:
        record = read_json(cache / PARTS_RECORD)
        if record.get("key") != key:
            return {}
        kept = {}
        for part in record["parts"]:
            path = Path(out) / part["file"]
            if path.is_file() and sha256_file(path) == part["sha256"]:
                kept[part["root"]] = {**part, "path": path}
        return kept
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: unreadable (%s); every root is indexed again", cache / PARTS_RECORD, e)
        return {}


def _record_parts(cache: Path | None, key: str, out: Path, made: list[dict[str, Any]], names: dict[str, str],
                  roots: list[str]) -> None:
    """Write :data:`PARTS_RECORD` for the parts that may be kept next run, and drop the digest caches of roots
    no longer listed (and the one cache of every root, before caches were per root)."""
    if cache is None:
        return
    parts = []
    for m in made:
        name = names.get(m["column"])
        if name is not None:
            parts.append({"root": m["root"], "column": m["column"], "digest": m["digest"], "file": name,
                          "sha256": m.get("sha256") or sha256_file(Path(out) / name), "skipped": m["skipped"]})
    write_json(cache / PARTS_RECORD, {"key": key, "parts": parts})
    wanted = {_root_cache(cache, r) for r in roots}
    for folder in (cache / ROOT_CACHES).glob("*") if (cache / ROOT_CACHES).is_dir() else []:
        if folder not in wanted:
            shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (cache / FILE_NAME).unlink()

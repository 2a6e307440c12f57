"""One walk of a source folder, shared by everything that reads or fingerprints one (no two can disagree).

:func:`walk_files` is the walk: files in sorted order (a folder's files, then its subfolders, as ``os.walk``),
skipping hidden entries (a name that starts with ``.``, file or folder alike) and OS junk
(:data:`medflow.schema.JUNK_FILES`, :data:`~medflow.schema.JUNK_DIRS`). A symlinked folder is followed, unless it
leads back to a folder on the path that reached it (a loop), which is reported (a WARNING naming the link)
and not followed. Links to files, and broken links, are yielded like files (readers check them).

:func:`folder_listing` (relative path, size, mtime_ns of every walked file) and :func:`listing_digest` over it
are the content identity of a folder: the download step records it for every folder source (sources.json,
then roots.json, so the manifest re-runs when a file is added, changed or removed) and the retrain
fingerprint and ``medflow watch`` hash the same listing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medflow.schema import JUNK_DIRS, JUNK_FILES

log = logging.getLogger(__name__)

Listing = list[tuple[str, int, int]]  # (relative posix path, size in bytes, mtime_ns), sorted


@dataclass
class WalkReport:
    """What a walk left out: hidden entries (skipped), and symlinked folders not followed (loops)."""

    hidden: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)

    def log(self, root: Path) -> None:
        """One INFO line for the hidden entries, one WARNING per loop (call once per walk)."""
        if self.hidden:
            log.info("%s: skipped %d hidden file(s)/folder(s) (names starting with '.'), e.g. %s", root,
                     len(self.hidden), self.hidden[0])
        for link in self.loops:
            log.warning("%s: symlinked folder %s leads back to a folder above it (a loop); not followed", root, link)


def _skipped(name: str, is_dir: bool) -> bool:
    return name in (JUNK_DIRS if is_dir else JUNK_FILES)


def walk_files(root: Path, report: WalkReport | None = None) -> Iterator[Path]:
    """Every file under ``root`` (see the module docstring); ``report`` collects what was left out."""
    for entry, _ in _walk_root(Path(root), report):
        yield Path(entry.path)


def _walk_root(root: Path, report: WalkReport | None) -> Iterator[tuple[os.DirEntry[str], str]]:
    """Each walked file's directory entry and its path relative to ``root`` (posix): no Path a file (a
    27,558-file inbox is listed on every ``dvc repro``)."""
    try:
        top = os.stat(root)
    except OSError:
        return
    yield from _walk(str(root), "", root, {(top.st_dev, top.st_ino)}, report if report is not None else WalkReport())


def _walk(folder: str, rel: str, root: Path, ancestors: set[tuple[int, int]],
          report: WalkReport) -> Iterator[tuple[os.DirEntry[str], str]]:
    """The files under ``folder``, ``rel`` below ``root`` ("" or ending in "/")."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        log.warning("%s: cannot list %s: %s", root, folder, e.strerror or e)
        return
    subdirs: list[tuple[os.DirEntry[str], tuple[int, int]]] = []
    for entry in entries:
        is_dir = _is_dir(entry)
        if entry.name.startswith("."):
            report.hidden.append(rel + entry.name)
            continue
        if _skipped(entry.name, is_dir):
            continue
        if not is_dir:
            yield entry, rel + entry.name
            continue
        st = entry.stat()  # follows a link: the folder's own identity
        ident = (st.st_dev, st.st_ino)
        if ident in ancestors:
            report.loops.append(rel + entry.name)
            continue
        subdirs.append((entry, ident))
    for entry, ident in subdirs:
        yield from _walk(entry.path, f"{rel}{entry.name}/", root, ancestors | {ident}, report)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def folder_listing(root: Path, report: WalkReport | None = None) -> Listing:
    """(relative path, size, mtime_ns) of every file :func:`walk_files` yields, sorted; a link is stat'ed
    through (the file it names), a broken link as itself."""
    out: Listing = []
    for entry, rel in _walk_root(Path(root), report):
        try:
            st = entry.stat()
        except OSError:
            st = entry.stat(follow_symlinks=False)
        out.append((rel, st.st_size, st.st_mtime_ns))
    return sorted(out)


def listing_digest(listing: Iterable[tuple[str, int, int]]) -> str:
    """sha256 over a listing (names, sizes, mtimes): equal digests mean an unchanged folder."""
    h = hashlib.sha256()
    for rel, size, mtime in listing:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()

"""Safe archive extraction: .zip, .tar, .tar.gz and .tgz, checked entry by entry, into a folder.

:func:`extract_archive` unpacks one archive into an empty folder; :func:`extract_into` puts it in
``<out_dir>/<archive stem>-<first 12 hex of its sha256>/``, built in a temporary folder and renamed into place
(:func:`medflow.io.atomic_dir`), so a crash or a rejected archive leaves nothing half-extracted, and an existing
folder of that name is reused as is (content-addressed). Archives are only read, never modified. The extract
step (``tasks/extract.py``) runs this over sources.json and writes roots.json (:class:`RootRecord`).

Safety rules (any violation raises :class:`StepError` naming the archive and the entry):

- no entry may escape the target: no ``..`` component, absolute path or drive letter (``\\`` counts as ``/``);
- no device files, fifos or sockets;
- symbolic and hard links pointing outside the target are rejected; symbolic links that stay inside are
  *skipped* with a warning, never materialised (an image dataset does not need them, and a link would index a
  file twice). A tar hard link to an earlier member (GNU tar writes these for hard-linked files) is extracted
  as a copy of that member's bytes (counted against the caps), since the member is an image in its own
  right; one whose target was not extracted (OS junk, or not in the archive) is skipped with a warning;
- two entries of one name (possible in a zip, and in an appended tar) are both extracted: the second as
  ``name~2.ext``, then ``~3``, in archive order (a WARNING names them), so no image is lost;
- an archive inside the archive (a member named .zip/.tar/.tar.gz/.tgz) is extracted one level deep into a
  folder of its name without the suffix (``~2`` if that name is taken), under the same entry rules and the
  *outer* archive's budget (members, bytes and ratio over the outer archive's size, so nesting cannot
  multiply a bomb), and the inner archive file itself is then removed from the extracted folder. Extracting
  beats rejecting: datasets do ship a zip of zips, and an unextracted inner archive is images that silently
  never reach the manifest. An archive nested two levels deep is refused (StepError naming both names);
- bombs: more than ``extract.max_members`` entries, more than ``extract.max_total_bytes`` expanded bytes, or
  an expanded/compressed ratio (over the whole archive file) above ``extract.max_ratio``. Declared sizes are
  checked before writing (the whole zip central directory up front; each tar header before its data), and the
  bytes actually written are counted while streaming, since declared sizes can lie;
- encrypted zip entries and unknown compression methods are refused.

OS junk (:data:`medflow.schema.JUNK_DIRS`, :data:`medflow.schema.JUNK_FILES`, AppleDouble ``._*``) is skipped.
Permissions, owners and timestamps from the archive are not restored (plain files with the default umask).

Partial extractions are built outside every DVC output: in ``<repo>/.dvc/tmp/medflow/extract/`` when the
output folder is inside a DVC repository, else in a hidden ``.medflow-extract-tmp`` folder beside it (the same
filesystem either way, for the atomic rename), named ``<pid>.<target>.<random>.tmp``. A run killed mid-way
(even ``kill -9``) leaves nothing in the output; :func:`remove_stale_partials` (run by the extract step first)
removes the folders of processes that are gone, and the hidden ``.<target>.*.tmp`` folders earlier versions
left inside the output.
"""

from __future__ import annotations

import gzip
import logging
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, TypedDict

from tqdm import tqdm

from medflow.config import ExtractConfig
from medflow.data.fetch import ARCHIVE_SUFFIXES, archive_suffix
from medflow.errors import StepError
from medflow.io import CHUNK, atomic_dir, pid_alive, sha256_file
from medflow.schema import JUNK_DIRS, JUNK_FILES

log = logging.getLogger(__name__)

_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
_MAX_LINK_TARGET = 4096
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)

EntryKind = Literal["file", "dir", "link", "hardlink"]
_STAGING = ".medflow-extract-tmp"  # beside the output folder when it is not inside a DVC repository


class RootRecord(TypedDict):
    """One folder to index, in roots.json (the contract between extract and manifest)."""

    root: str  # extracted folder, or a folder source in place
    source: str  # the source's url as written in params.yaml
    kind: Literal["archive", "folder"]
    digest: str | None  # the content it holds: a folder source's listing digest, an archive's sha256


@dataclass
class _Names:
    """The paths written in one folder (an archive's, or a nested archive's): duplicates get ``~N``."""

    taken: set[PurePosixPath] = field(default_factory=set)
    written_as: dict[PurePosixPath, PurePosixPath] = field(default_factory=dict)  # entry path -> file written
    nested: list[PurePosixPath] = field(default_factory=list)  # inner archives written, extracted after

    def claim(self, rel: PurePosixPath, archive: Path, entry: str) -> PurePosixPath:
        """A free path for the entry ``rel``: itself, else ``stem~2.ext``, ``stem~3.ext``, ... (logged)."""
        final, n = rel, 1
        while final in self.taken:
            n += 1
            final = rel.with_name(f"{rel.stem}~{n}{rel.suffix}")
        if final != rel:
            log.warning("%s: entry %r appears more than once; this copy is extracted as %s", archive, entry, final)
        self.taken.add(final)
        self.written_as[rel] = final
        return final


@dataclass
class _Tally:
    """Running counts for one archive, and the caps they must stay under."""

    archive: Path
    limits: ExtractConfig
    compressed: int  # size of the archive file
    members: int = 0
    declared: int = 0
    written: int = 0
    files: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"junk": 0, "links": 0})
    names: _Names = field(default_factory=_Names)
    depth: int = 0  # 1 inside a nested archive
    counts: dict[str, int] = field(default_factory=lambda: {"renamed": 0, "hard_links": 0, "nested": 0})

    def count_member(self, entry: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise StepError(f"{self.archive}: more than extract.max_members ({self.limits.max_members}) "
                            f"entries (at {entry!r}); refusing a possible archive bomb")

    def declare(self, size: int, entry: str) -> None:
        """Add a declared (header) size and check the caps before any of it is written."""
        self.declared += size
        self._check(self.declared, f"declares {self.declared} expanded bytes (up to {entry!r})")

    def add_written(self, n: int, entry: str) -> None:
        self.written += n
        self._check(self.written, f"expanded to more than {self.written - n} bytes (in {entry!r})")

    def _check(self, total: int, what: str) -> None:
        cap = self.limits.max_total_bytes
        if total > cap:
            raise StepError(f"{self.archive}: {what}, over extract.max_total_bytes ({cap}); "
                            "refusing a possible archive bomb")
        ratio = total / max(self.compressed, 1)
        if ratio > self.limits.max_ratio:
            raise StepError(f"{self.archive}: {what}, {ratio:.0f} times its {self.compressed} compressed "
                            f"bytes, over extract.max_ratio ({self.limits.max_ratio:g}); "
                            "refusing a possible zip bomb")

    def summary(self) -> dict[str, int]:
        return {"members": self.members, "files": self.files, "bytes": self.written,
                "skipped_junk": self.skipped["junk"], "skipped_links": self.skipped["links"],
                "renamed_duplicates": self.counts["renamed"], "hard_links_copied": self.counts["hard_links"],
                "nested_archives": self.counts["nested"]}


# --------------------------------------------------------------------------------------------- entry rules


def safe_relpath(name: str, archive: Path) -> PurePosixPath | None:
    """The entry's path inside the target, or None for the root itself; StepError if it would escape."""
    n = name.replace("\\", "/")
    if "\x00" in n:
        raise StepError(f"{archive}: entry {name!r} has a NUL character in its name")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        raise StepError(f"{archive}: entry {name!r} is an absolute path; refusing to extract it")
    parts = [p for p in n.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StepError(f"{archive}: entry {name!r} escapes the target folder ('..'); refusing to extract")
    return PurePosixPath(*parts) if parts else None


def is_junk(rel: PurePosixPath) -> bool:
    """OS clutter never extracted: __MACOSX/ and friends, .DS_Store, Thumbs.db, AppleDouble ``._*`` files."""
    return (any(p in JUNK_DIRS for p in rel.parts[:-1]) or rel.name in JUNK_DIRS
            or rel.name in JUNK_FILES or rel.name.startswith("._"))


def _check_link(archive: Path, entry: str, rel: PurePosixPath, target: str, *, hard: bool) -> None:
    """Reject a link whose target leaves the archive's folder (symlinks: relative to the link's folder)."""
    t = target.replace("\\", "/")
    if t.startswith("/") or re.match(r"^[A-Za-z]:", t):
        inside = False
    else:
        joined = posixpath.normpath(t if hard else posixpath.join(str(rel.parent), t))
        inside = joined != ".." and not joined.startswith("../")
    if not inside:
        kind = "hard link" if hard else "symbolic link"
        raise StepError(f"{archive}: entry {entry!r} is a {kind} to {target!r}, outside the target folder; "
                        "refusing to extract")


def _write_member(src: IO[bytes], path: Path, declared: int, tally: _Tally, entry: str) -> None:
    """Stream one member to ``path``, counting real bytes against its declared size and the archive caps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > declared:
                raise StepError(f"{tally.archive}: entry {entry!r} declares {declared} bytes but holds more; "
                                "refusing a lying archive")
            tally.add_written(len(chunk), entry)
            out.write(chunk)
    tally.files += 1


def _skip(tally: _Tally, rel: PurePosixPath | None, kind: EntryKind, entry: str) -> bool:
    """Whether to skip this entry (the root itself, OS junk, or a link that stays inside)."""
    if rel is None:
        return True
    if is_junk(rel):
        tally.skipped["junk"] += 1
        log.debug("%s: skipping OS junk %r", tally.archive, entry)
        return True
    if kind == "link":
        tally.skipped["links"] += 1
        log.warning("%s: skipping link %r (links are not extracted)", tally.archive, entry)
        return True
    return False


def _progress(desc: str, total: int | None) -> Any:
    return tqdm(total=total, desc=desc, unit="entry", file=sys.stderr, disable=None, leave=False)


# --------------------------------------------------------------------------------------------- zip


def _zip_kind(zf: zipfile.ZipFile, info: zipfile.ZipInfo, rel: PurePosixPath | None,
              archive: Path) -> EntryKind:
    """Classify a zip entry from its Unix mode bits (when made on Unix); reject specials and bad links."""
    if info.flag_bits & 0x1:
        raise StepError(f"{archive}: entry {info.filename!r} is encrypted; medflow cannot extract it")
    if info.compress_type not in _ZIP_METHODS:
        raise StepError(f"{archive}: entry {info.filename!r} uses unsupported compression method "
                        f"{info.compress_type}")
    mode = info.external_attr >> 16 if info.create_system == 3 else 0
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise StepError(f"{archive}: entry {info.filename!r} is a device file, fifo or socket; refusing")
    if stat.S_ISLNK(mode):
        if info.file_size > _MAX_LINK_TARGET:
            raise StepError(f"{archive}: entry {info.filename!r} is a symbolic link with an oversized target")
        target = zf.read(info).decode("utf-8", "surrogateescape")
        _check_link(archive, info.filename, rel or PurePosixPath(), target, hard=False)
        return "link"
    return "dir" if info.is_dir() else "file"


def _file_target(dest: Path, tally: _Tally, rel: PurePosixPath | None, kind: EntryKind, name: str) -> Path | None:
    """Where a file entry is written (``~N`` for a name already written); None for a skipped entry or a
    directory (created here). An inner archive is noted for :func:`_extract_nested`."""
    if _skip(tally, rel, kind, name) or rel is None:
        return None
    if kind == "dir":
        dest.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
        return None
    final = tally.names.claim(rel, tally.archive, name)
    tally.counts["renamed"] += final != rel
    if archive_suffix(final.name) is not None:
        if tally.depth:
            raise StepError(f"{tally.archive}: entry {name!r} is an archive inside an archive inside an "
                            "archive; medflow extracts one level of nesting (unpack it first)")
        tally.names.nested.append(final)
    return dest.joinpath(*final.parts)


def _extract_zip(archive: Path, dest: Path, tally: _Tally) -> None:
    name = tally.archive  # the outer archive, or "outer!inner" for a nested one
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if tally.members + len(infos) > tally.limits.max_members:
            raise StepError(f"{name}: {tally.members + len(infos)} entries, over extract.max_members "
                            f"({tally.limits.max_members}); refusing a possible archive bomb")
        tally.declare(sum(i.file_size for i in infos), infos[-1].filename if infos else "")
        plan = []  # validate every entry before writing anything
        for info in infos:
            tally.count_member(info.filename)
            rel = safe_relpath(info.filename, name)
            plan.append((info, rel, _zip_kind(zf, info, rel, name)))
        with _progress(archive.name, len(plan)) as bar:
            for info, rel, kind in plan:
                bar.update(1)
                target = _file_target(dest, tally, rel, kind, info.filename)
                if target is None:
                    continue
                with zf.open(info) as src:
                    _write_member(src, target, info.file_size, tally, info.filename)


# --------------------------------------------------------------------------------------------- tar


def _tar_kind(member: tarfile.TarInfo, rel: PurePosixPath | None, archive: Path) -> EntryKind:
    """Classify a tar entry; reject devices, fifos, unknown types and links that leave the target."""
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym() or member.islnk():
        _check_link(archive, member.name, rel or PurePosixPath(), member.linkname, hard=member.islnk())
        return "hardlink" if member.islnk() else "link"
    if member.ischr() or member.isblk() or member.isfifo():
        raise StepError(f"{archive}: entry {member.name!r} is a device file or fifo; refusing to extract")
    raise StepError(f"{archive}: entry {member.name!r} has unsupported tar type {member.type!r}")


def _copy_hard_link(dest: Path, tally: _Tally, rel: PurePosixPath | None, member: tarfile.TarInfo) -> None:
    """A hard link to an earlier member, extracted as a copy of the file written for it (or skipped, warned,
    when that member was not extracted)."""
    if rel is None or _skip(tally, rel, "file", member.name):
        return
    linked = safe_relpath(member.linkname, tally.archive)
    source = tally.names.written_as.get(linked) if linked is not None else None
    if source is None:
        tally.skipped["links"] += 1
        log.warning("%s: skipping hard link %r: its target %r was not extracted", tally.archive, member.name,
                    member.linkname)
        return
    src = dest.joinpath(*source.parts)
    target = _file_target(dest, tally, rel, "file", member.name)
    if target is None:  # pragma: no cover - files are never skipped past the checks above
        return
    size = src.stat().st_size
    tally.declare(size, member.name)
    with open(src, "rb") as data:
        _write_member(data, target, size, tally, member.name)
    tally.counts["hard_links"] += 1


def _extract_tar(archive: Path, dest: Path, tally: _Tally) -> None:
    """One streaming pass: each header is checked before its data is read (a .tar.gz is decompressed once)."""
    name = tally.archive
    with tarfile.open(archive, mode="r:*") as tf, _progress(archive.name, None) as bar:
        for member in tf:
            bar.update(1)
            tally.count_member(member.name)
            rel = safe_relpath(member.name, name)
            kind = _tar_kind(member, rel, name)
            if kind == "hardlink":
                _copy_hard_link(dest, tally, rel, member)
                continue
            target = _file_target(dest, tally, rel, kind, member.name)
            if target is None:
                continue
            tally.declare(member.size, member.name)
            src = tf.extractfile(member)
            if src is None:  # pragma: no cover - isreg() members always have data
                raise StepError(f"{name}: entry {member.name!r} has no data")
            with src:
                _write_member(src, target, member.size, tally, member.name)


# --------------------------------------------------------------------------------------------- public


def extract_archive(archive: Path, dest: Path, limits: ExtractConfig) -> dict[str, int]:
    """Safely extract ``archive`` (.zip, .tar, .tar.gz, .tgz) into the empty folder ``dest``.

    Returns counts: members seen, files written, bytes written, junk and links skipped. Raises StepError
    naming the archive (and the entry) on any unsafe entry, bomb, or corrupt/truncated archive; ``dest`` may
    then hold a partial extraction, so callers extract into a temporary folder (see :func:`extract_into`).
    """
    suffix = archive_suffix(archive.name)
    if suffix is None:
        raise StepError(f"{archive}: not an archive name ({', '.join(ARCHIVE_SUFFIXES)})")
    tally = _Tally(archive=archive, limits=limits, compressed=archive.stat().st_size)
    try:
        _extract_one(archive, dest, tally)
        _extract_nested(dest, tally)
    except _CORRUPT as e:
        raise StepError(f"{tally.archive}: corrupt or truncated archive: {e}") from None
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        raise StepError(f"{tally.archive}: conflicting entries (a file and a folder of one name): {e}") from None
    return tally.summary()


def _extract_one(archive: Path, dest: Path, tally: _Tally) -> None:
    if archive_suffix(archive.name) == ".zip":
        _extract_zip(archive, dest, tally)
    else:
        _extract_tar(archive, dest, tally)


def _extract_nested(dest: Path, tally: _Tally) -> None:
    """Extract each inner archive written under ``dest`` into a folder beside it (its name without the
    suffix, ``~N`` when taken), counted against the outer archive's caps; then remove the inner archive."""
    outer, names = tally.archive, tally.names
    for rel in names.nested:
        path = dest.joinpath(*rel.parts)
        stem = rel.name[: len(rel.name) - len(archive_suffix(rel.name) or "")]
        folder, n = path.with_name(stem), 1
        while folder.exists():
            n += 1
            folder = path.with_name(f"{stem}~{n}")
        folder.mkdir()
        tally.archive, tally.names, tally.depth = Path(f"{outer}!{rel}"), _Names(), 1
        _extract_one(path, folder, tally)
        tally.archive, tally.names, tally.depth = outer, names, 0
        path.unlink()
        tally.counts["nested"] += 1
        log.info("%s: extracted the inner archive %s into %s", outer, rel, folder.relative_to(dest))


def target_name(archive: Path, sha256: str) -> str:
    """Content-addressed folder name: ``ChestXRay2017.zip`` + digest -> ``ChestXRay2017-<12 hex>``."""
    suffix = archive_suffix(archive.name) or archive.suffix
    return f"{archive.name[: len(archive.name) - len(suffix)]}-{sha256[:12]}"


def extract_into(archive: Path, out_dir: Path, limits: ExtractConfig, *,
                 sha256: str | None = None) -> tuple[Path, bool]:
    """Extract ``archive`` to ``out_dir/<stem>-<12 hex of its sha256>``; return that folder and whether it was reused.

    The folder is content-addressed, so an existing one is reused as is; a new one is built in a temporary
    folder and renamed into place (:func:`medflow.io.atomic_dir`), so a crash or a rejected archive leaves
    nothing half-extracted. ``sha256`` (from sources.json) saves hashing the archive again.
    """
    target = out_dir / target_name(archive, sha256 or sha256_file(archive))
    if target.is_dir():
        log.info("reusing %s (already extracted from %s)", target, archive)
        return target, True
    with atomic_dir(target, tmp_dir=staging_dir(out_dir)) as tmp:
        stats = extract_archive(archive, tmp, limits)
    if not stats["files"]:
        log.warning("%s: no files extracted", archive)
    log.info("extracted %s -> %s: %d files, %d bytes (skipped %d junk, %d links; %d hard links copied, %d "
             "duplicate names renamed, %d inner archives)", archive, target, stats["files"], stats["bytes"],
             stats["skipped_junk"], stats["skipped_links"], stats["hard_links_copied"],
             stats["renamed_duplicates"], stats["nested_archives"])
    return target, False


def staging_dir(out_dir: Path) -> Path:
    """Where partial extractions for ``out_dir`` are built (see the module docstring); created."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    repo = next((p for p in out.parents if (p / ".dvc").is_dir()), None)
    base = repo / ".dvc" / "tmp" / "medflow" / "extract" if repo is not None else out.parent / _STAGING
    base.mkdir(parents=True, exist_ok=True)
    if base.stat().st_dev != out.stat().st_dev:  # a rename across filesystems would copy, not be atomic
        base = out.parent / _STAGING
        base.mkdir(exist_ok=True)
    return base


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Remove partial extractions for ``out_dir`` left by killed runs; return what was removed.

    In :func:`staging_dir`: each ``<pid>.*.tmp`` folder whose process is gone. In ``out_dir`` itself: hidden
    ``.<name>.*.tmp`` folders (partial extractions of earlier versions, which built them there)."""
    base, out = staging_dir(out_dir), Path(out_dir)
    stale = [p for p in sorted(base.iterdir()) if p.name.endswith(".tmp")
             and p.name.split(".", 1)[0].isdigit() and not pid_alive(int(p.name.split(".", 1)[0]))]
    stale += [p for p in sorted(out.glob(".*.tmp")) if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed a partial extraction left by an interrupted run: %s", path)
    return stale

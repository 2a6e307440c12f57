"""The manifest's digest cache: what reading a file found (sha256, size, header facts), keyed by its stat.

As DVC's own state database does for its md5s, a file whose resolved path, size, ``st_mtime_ns`` and inode
match a row is not opened again: the row's facts stand for it. Anything else about the file (a new mtime, a
copy over it, a rename onto it) misses, and the file is read as if there were no cache.

- One SQLite file, ``<cache>/digests.sqlite``, rewritten whole by each run (a temporary file beside it, then
  a rename): it holds the files of the latest run only, a reader never sees half of it, and a killed run
  leaves the previous one. Rows are looked up a batch of keys at a time, so memory does not grow with the number
  of files.
- Not cached (read again next time): a file whose mtime is less than :data:`RACY_NS` before the run started
  (so before the cache is written), or in the future, and one whose size changed while it was read. A file
  changed twice within the file system's timestamp granularity could otherwise keep the mtime of a version
  that was hashed (the "racy git" problem). Files that cannot be read, and anything that is not a regular
  file, are never cached.
- Rows are only trusted under the key they were written with (:data:`DIGEST_VERSION`, a digest of the DICOM
  patient salt). A cache that cannot be opened, fails SQLite's ``quick_check``, or holds one malformed row is
  dropped with a warning (every file is read again) and replaced when the run ends; a missing one is simply
  built. The cache may always be deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any, NamedTuple

from medflow.imaging.files import shown_path
from medflow.io import atomic_path, remove_stale_temps

log = logging.getLogger(__name__)

# Bump whenever the manifest's facts of one file (medflow.data.manifest._file_facts) could change.
DIGEST_VERSION = "digests-1"
FILE_NAME = "digests.sqlite"
RACY_NS = 2_000_000_000  # files modified less than this before the cache is written are read again next run
FACTS = ("sha256", "bytes", "width", "height", "mode", "format", "_patient", "_patient_tag")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TEXT_OR_NULL = (str, type(None))
_INT_OR_NULL = (int, type(None))


class StatKey(NamedTuple):
    """What must match for a row to stand for the file: its resolved path (as its sha256: the cache holds no
    path, so no folder above the project), size, mtime (ns) and inode."""

    path: str
    size: int
    mtime_ns: int
    ino: int


def stat_key(path: Path, folders: dict[str, str] | None = None) -> StatKey | None:
    """The key of the readable regular file at ``path``, or None (not a regular file, a name that is not
    valid UTF-8, no read permission, gone): such files are read the slow way, which says what is wrong.
    Never opens the file. ``folders``: real paths of folders already resolved in this batch (see
    :func:`stat_keys`)."""
    text = str(path)
    if shown_path(text) != text:
        return None
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or not os.access(path, os.R_OK):
            return None
        resolved = hashlib.sha256(os.fsencode(_resolved(text, {} if folders is None else folders))).hexdigest()
        return StatKey(resolved, st.st_size, st.st_mtime_ns, st.st_ino)
    except (OSError, ValueError):
        return None


def stat_keys(paths: list[Path]) -> list[StatKey | None]:
    """:func:`stat_key` of each path, each folder's real path resolved once (a batch is one walk: folders do not
    change into links under it)."""
    folders: dict[str, str] = {}
    return [stat_key(p, folders) for p in paths]


def _resolved(path: str, folders: dict[str, str]) -> str:
    """``os.path.realpath(path)``, the real path of each folder worked out once per batch (``folders``): a file
    that is not a link is its folder's real path plus its name, what realpath gives, for one lstat instead of
    one per part of the path."""
    head, tail = os.path.split(path)
    if tail in ("", ".", "..") or os.path.islink(path):
        return os.path.realpath(path)
    if head not in folders:
        folders[head] = os.path.realpath(head or os.curdir)
    return os.path.join(folders[head], tail)


def _schema_key(salt: bytes) -> str:
    return f"{DIGEST_VERSION}:{hashlib.sha256(b'medflow-digests' + salt).hexdigest()[:16]}"


class DigestCache:
    """Lookups in the previous run's digests and the rows of this run, written by :meth:`save`.

    ``folder`` None: no cache (every lookup misses, nothing is written)."""

    def __init__(self, folder: Path | None, salt: bytes = b"") -> None:
        self.folder = None if folder is None else Path(folder)
        self.key = _schema_key(salt)
        self.hits = 0
        self.looked_up = 0  # files asked about (a file without a key included)
        self.saved = 0  # rows the last save wrote (racy ones left out)
        self._racy_from = time.time_ns() - RACY_NS  # before any file is looked at
        self._old = self._open_old()
        self._new: list[tuple[Any, ...]] = []

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / FILE_NAME

    def _open_old(self) -> sqlite3.Connection | None:
        """The previous cache, read-only; None when absent, written under another key, or damaged (warned)."""
        path = self.path
        if path is None or not path.is_file():
            return None
        try:
            con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as e:
            self._drop(f"cannot open it ({e})")
            return None
        try:
            check = con.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                self._drop(f"SQLite quick_check: {check[0] if check else 'no answer'}", con)
                return None
            row = con.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
        except sqlite3.Error as e:
            self._drop(f"not a digest cache ({e})", con)
            return None
        if not row or row[0] != self.key:
            log.info("%s: written for %s, not %s: every file is read again", path, row and row[0], self.key)
            con.close()
            return None
        return con

    def _drop(self, why: str, con: sqlite3.Connection | None = None) -> None:
        if con is not None:
            con.close()
        log.warning("%s: damaged digest cache, %s; dropping it: every file is read again", self.path, why)
        self._old = None

    def lookup(self, key: StatKey) -> dict[str, Any] | None:
        """The cached facts of the file with ``key``, or None; a hit is kept for the new cache."""
        return self.lookup_many([key])[0]

    def lookup_many(self, keys: list[StatKey | None]) -> list[dict[str, Any] | None]:
        """:meth:`lookup` of each key (None: no key, a miss), :data:`_BATCH` keys a query: one SQLite round trip
        per key was half of a +1% manifest run at 27,558 files."""
        out: list[dict[str, Any] | None] = [None] * len(keys)
        self.looked_up += len(keys)
        for start in range(0, len(keys), _BATCH):
            if self._old is None:
                return out
            batch = [(i, k) for i, k in enumerate(keys[start:start + _BATCH], start) if k is not None]
            if not batch:
                continue
            try:
                rows = self._old.execute(f"SELECT {', '.join(_COLUMNS)} FROM digests WHERE path IN "
                                         f"({', '.join('?' * len(batch))})", [k.path for _, k in batch]).fetchall()
            except sqlite3.Error as e:
                self._drop(f"lookup failed ({e})", self._old)
                return [None] * len(keys)
            by_path = {row[0]: row for row in rows}
            for i, key in batch:
                row = by_path.get(key.path)
                if row is not None:
                    out[i] = self._hit(key, row)
                if self._old is None:  # a malformed row dropped the cache: the files from here on are read
                    return out
        return out

    def _hit(self, key: StatKey, row: tuple[Any, ...]) -> dict[str, Any] | None:
        """The facts of ``row`` if it stands for the file with ``key`` (kept for the new cache), else None."""
        if tuple(row[1:4]) != key[1:]:
            return None
        try:
            facts = _facts(row)
        except ValueError as e:
            self._drop(str(e), self._old)
            return None
        self.hits += 1
        self._new.append(tuple(row))
        return facts

    def add(self, key: StatKey, facts: dict[str, Any]) -> None:
        """Remember ``facts`` read from the file with ``key`` (never those of a file that could not be read)."""
        if (self.folder is None or facts.get("_problem") or not facts.get("sha256")
                or facts.get("bytes") != key.size):
            return
        self._new.append((*key, *(facts.get(f, "" if f.startswith("_") else None) for f in FACTS[:1] + FACTS[2:])))

    @property
    def complete(self) -> bool:
        """Whether the last :meth:`save` holds a row for every file looked up: none racy, unreadable or keyless
        (the files' facts then stand until their stat changes)."""
        return self.folder is not None and self.saved == self.looked_up

    def save(self) -> None:
        """Write this run's rows as the new cache, atomically; racy rows (:data:`RACY_NS`) left out."""
        if self.folder is None:
            return
        if self._old is not None:
            self._old.close()
            self._old = None
        dest = self.folder / FILE_NAME
        remove_stale_temps([dest])  # left by a killed run
        with atomic_path(dest) as tmp, contextlib.closing(sqlite3.connect(tmp)) as con:
            con.execute("PRAGMA journal_mode = OFF")  # the temporary file is renamed only once complete
            con.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute("CREATE TABLE digests (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER "
                        "NOT NULL, ino INTEGER NOT NULL, sha256 TEXT NOT NULL, width INTEGER, height INTEGER, "
                        "mode TEXT, format TEXT, patient TEXT NOT NULL, patient_tag TEXT NOT NULL) WITHOUT ROWID")
            con.execute("INSERT INTO meta VALUES ('key', ?)", (self.key,))
            kept = [r for r in self._new if r[2] < self._racy_from]
            con.executemany(f"INSERT OR REPLACE INTO digests ({', '.join(_COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(_COLUMNS))})", kept)
            con.commit()
            self.saved = len({r[0] for r in kept})
            con.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        self._new = []


_BATCH = 500  # keys per lookup query (SQLite allows 32,766 parameters since 3.32; 999 before)
_COLUMNS = ("path", "size", "mtime_ns", "ino", "sha256", "width", "height", "mode", "format", "patient",
            "patient_tag")


def _facts(row: tuple[Any, ...]) -> dict[str, Any]:
    """A row as the manifest's facts; ValueError naming what is malformed (the whole cache is then dropped)."""
    path, size, _, _, sha, width, height, mode, fmt, patient, tag = row
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise ValueError(f"bad sha256 {str(sha)[:80]!r} for {path}")
    if (not isinstance(size, int) or size < 0 or not isinstance(width, _INT_OR_NULL)
            or not isinstance(height, _INT_OR_NULL) or not all(isinstance(v, _TEXT_OR_NULL) for v in (mode, fmt))
            or not isinstance(patient, str) or not isinstance(tag, str)):
        raise ValueError(f"malformed row for {path}")
    facts: dict[str, Any] = {"sha256": sha, "bytes": size, "width": width, "height": height, "mode": mode,
                             "format": fmt}
    if patient or tag:
        facts.update(_patient=patient, _patient_tag=tag)
    return facts

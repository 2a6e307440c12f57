"""Download step: fetch remote sources (resumable, retried, verified) and resolve local ones.

Each ``dataset.sources[i]`` becomes one record in ``sources.json`` (see :class:`SourceRecord`):

- http(s) URLs are streamed to ``<out_dir>/<filename>.part``, resumed with an HTTP ``Range`` request after
  a cut, retried with exponential backoff on transient errors, checked against the pinned sha256 and only
  then renamed to ``<out_dir>/<filename>``: the final name never holds a partial or unverified file.
- ``file://`` URLs are copied the same way (no resume needed: the copy restarts).
- Local paths (archives or folders) are used in place, never copied; archives get their sha256 computed.

Unpinned sources (``sha256: null``) log a WARNING with the digest seen, so it can be pinned in params.yaml.
A sidecar ``<filename>.sha256`` (JSON: sha256, bytes, mtime_ns) lets a later run skip an unpinned download
whose file is unchanged; pinned files are re-hashed and skipped when they match.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any, Literal, TypedDict

from tqdm import tqdm

from medflow.config import Config, DownloadConfig, Source
from medflow.errors import StepError
from medflow.io import CHUNK, sha256_file, write_json
from medflow.schema import JUNK_DIRS, JUNK_FILES

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
USER_AGENT = "medflow/0.1 (+urllib)"
# HTTP statuses worth retrying besides 5xx: request timeout, too early, too many requests.
_RETRY_STATUSES = frozenset({408, 425, 429})


class SourceRecord(TypedDict):
    """One resolved source in sources.json (the contract between download and extract)."""

    index: int  # position in dataset.sources
    url: str  # as written in params.yaml
    path: str  # local archive or folder (as given if relative, else absolute)
    kind: Literal["archive", "folder"]
    sha256: str | None  # archives only
    bytes: int | None  # archives only


class FetchError(StepError):
    """A URL could not be fetched (after retries, or for a permanent reason such as HTTP 404)."""

    def __init__(self, url: str, reason: str, attempts: int) -> None:
        super().__init__(f"could not fetch {url} ({attempts} attempt{'s' * (attempts != 1)}): {reason}")
        self.url = url
        self.reason = reason
        self.attempts = attempts


class _Transient(Exception):
    """A failure worth retrying (connection, timeout, 5xx, stream cut short)."""


class _Permanent(Exception):
    """A failure retrying cannot fix (HTTP 404, missing file:// path, bad certificate)."""


# --------------------------------------------------------------------------------------------- names


def archive_suffix(name: str) -> str | None:
    """The archive suffix of a file name (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``; any case), else None."""
    lower = name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


def default_filename(url: str) -> str:
    """Last path segment of a URL, percent-decoded (``.../Chest%20X.zip?x=1`` -> ``Chest X.zip``)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rpartition("/")[2])


def _display_path(path: Path) -> str:
    """Relative paths stay as given (portable across machines); others are made absolute."""
    return str(path) if not path.is_absolute() else str(path.resolve())


# --------------------------------------------------------------------------------------------- fetch


def fetch(url: str, dest: Path, *, sha256: str | None = None, timeout_s: float = 60.0, retries: int = 5,
          backoff_s: float = 1.0) -> str:
    """Download ``url`` to ``dest`` through ``dest.part``; return the sha256 of what was written.

    A ``.part`` left by an earlier attempt or run is resumed with a Range request (a server that answers
    200 instead of 206 makes it restart from zero). Transient errors are retried ``retries`` times, waiting
    ``backoff_s * 2**k`` seconds before retry k. ``dest`` is written (atomically, by rename) only when the
    digest matches ``sha256``, or when no pin is given. Raises :class:`FetchError` when the URL cannot be
    fetched and :class:`StepError` on a checksum mismatch (the bad file is kept as ``dest.mismatch``).
    """
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    attempts = retries + 1
    reason = ""
    for attempt in range(attempts):
        if attempt:
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("retrying %s in %.1f s (attempt %d of %d)", url, delay, attempt + 1, attempts)
            time.sleep(delay)
        try:
            _download_once(url, part, timeout_s=timeout_s)
            break
        except _Transient as e:
            log.warning("transient error fetching %s: %s", url, e)
            reason = str(e)
        except _Permanent as e:
            raise FetchError(url, str(e), attempt + 1) from None
    else:
        raise FetchError(url, reason, attempts)
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        aside = dest.with_name(dest.name + ".mismatch")
        os.replace(part, aside)
        raise StepError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {digest} "
                        f"({aside.stat().st_size} bytes, kept as {aside} for inspection; {dest} not written)")
    os.replace(part, dest)
    return digest


def _download_once(url: str, part: Path, *, timeout_s: float) -> None:
    """One attempt: append to (or restart) ``part``; raise _Transient or _Permanent on failure."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    offset = part.stat().st_size if part.exists() and scheme != "file" else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - scheme is checked
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset and _range_total(e.headers.get("Content-Range")) == offset:
            log.info("%s: %s already holds all %d bytes", url, part.name, offset)
            return
        if e.code == 416:
            part.unlink(missing_ok=True)
            raise _Transient(f"server refused to resume at byte {offset} (HTTP 416); restarting") from None
        if e.code >= 500 or e.code in _RETRY_STATUSES:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise _Permanent(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if scheme == "file" or isinstance(e.reason, ssl.SSLCertVerificationError) or _unknown_host(e.reason):
            raise _Permanent(_reason(e.reason)) from None
        raise _Transient(_reason(e.reason)) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Transient(_reason(e)) from None
    with response:
        _receive(response, part, offset, url)


def _receive(response: Any, part: Path, offset: int, url: str) -> None:
    """Write the body of ``response`` to ``part``: appended after a 206 at ``offset``, else from zero."""
    status = getattr(response, "status", None)
    if offset and not (status == 206 and _range_start(response.headers.get("Content-Range")) == offset):
        log.info("%s ignored the Range request (HTTP %s); restarting from byte 0", url, status)
        offset = 0
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    total = offset + expected if expected is not None else None
    desc = part.name.removesuffix(".part")
    with open(part, "ab" if offset else "wb") as f, _progress(desc, total, offset) as bar:
        received = _copy_stream(response, f, bar)
    if expected is not None and received < expected:
        raise _Transient(f"stream cut short after {offset + received} of {total} bytes")


def _copy_stream(response: Any, f: IO[bytes], bar: Any) -> int:
    """Copy the response body to ``f``; network errors mid-stream become _Transient. Returns bytes copied."""
    received = 0
    while True:
        try:
            chunk = response.read(CHUNK)
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Transient(f"stream interrupted after {received} bytes: {_reason(e)}") from None
        if not chunk:
            return received
        f.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))


def _progress(desc: str, total: int | None, initial: int) -> Any:
    """A byte progress bar on stderr; tqdm hides it when stderr is not a terminal."""
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=None, leave=False)


def _range_start(content_range: str | None) -> int | None:
    """Start offset of ``bytes START-END/TOTAL``."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", content_range or "")
    return int(m.group(1)) if m else None


def _range_total(content_range: str | None) -> int | None:
    """TOTAL of ``bytes */TOTAL`` or ``bytes START-END/TOTAL``."""
    m = re.fullmatch(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)\s*", content_range or "")
    return int(m.group(1)) if m else None


def _unknown_host(err: object) -> bool:
    """A DNS answer that the name does not exist (offline sandbox, typo): retrying will not help.

    A temporary resolver failure (EAI_AGAIN) stays transient.
    """
    return isinstance(err, socket.gaierror) and err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5))


def _reason(err: object) -> str:
    """A short human reason for a network error ('connection refused', 'timed out', ...)."""
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, socket.gaierror):
        return f"DNS lookup failed ({err.strerror or err})"
    if isinstance(err, TimeoutError):
        return f"timed out ({err})" if str(err) else "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


# --------------------------------------------------------------------------------------------- sidecar


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _write_sidecar(dest: Path, digest: str) -> None:
    """Record the digest of ``dest`` with its size and mtime, so an unchanged file is not re-fetched."""
    st = dest.stat()
    write_json(_sidecar(dest), {"sha256": digest, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})


def _current_digest(dest: Path, pin: str | None) -> str | None:
    """Digest of an existing ``dest`` that can be reused as is, else None (download again)."""
    if not dest.is_file():
        return None
    if pin is not None:
        digest = sha256_file(dest)
        if digest == pin:
            return digest
        log.warning("%s exists but its sha256 %s is not the pinned %s; downloading again", dest, digest, pin)
        return None
    try:
        side = json.loads(_sidecar(dest).read_text())
        st = dest.stat()
        if side["bytes"] == st.st_size and side["mtime_ns"] == st.st_mtime_ns:
            return str(side["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# --------------------------------------------------------------------------------------------- sources


def _resolve_remote(i: int, src: Source, out_dir: Path, dl: DownloadConfig,
                    inbox: Path) -> tuple[SourceRecord, bool]:
    """Download one remote source (unless already there); return its record and whether it was fetched."""
    filename = src.filename or default_filename(src.url)
    dest = out_dir / filename
    digest = _current_digest(dest, src.sha256)
    fetched = digest is None
    if digest is None:
        try:
            digest = fetch(src.url, dest, sha256=src.sha256, timeout_s=dl.timeout_s, retries=dl.retries,
                           backoff_s=dl.backoff_s)
        except FetchError as e:
            raise StepError(
                f"dataset.sources[{i}]: {e}. If you are offline or the URL is gone, get the archive another "
                f"way and set dataset.sources[{i}].url in params.yaml to a local path of the archive or "
                f"folder, or drop it into the dataset's inbox and set dataset.sources to [] "
                f"(e.g. {inbox / filename})") from None
        _write_sidecar(dest, digest)
        log.info("downloaded %s -> %s (sha256 %s)", src.url, dest, digest)
    else:
        log.info("%s already downloaded and unchanged (sha256 %s); skipping", dest, digest)
    _warn_unpinned(i, src, digest)
    record = SourceRecord(index=i, url=src.url, path=_display_path(dest), kind="archive", sha256=digest,
                          bytes=dest.stat().st_size)
    return record, fetched


def _resolve_local(i: int, src: Source) -> SourceRecord:
    """Resolve a local archive or folder, in place; hash (and verify) archives."""
    path = Path(src.url).expanduser()
    if not path.exists():
        raise StepError(f"dataset.sources[{i}].url: {path} does not exist (relative to {Path.cwd()}); "
                        "point it at an archive (.zip, .tar, .tar.gz, .tgz) or a folder")
    if path.is_dir():
        if src.sha256 is not None:
            raise StepError(f"dataset.sources[{i}].sha256: {path} is a folder; only archives can be pinned")
        return SourceRecord(index=i, url=src.url, path=_display_path(path), kind="folder", sha256=None,
                            bytes=None)
    if archive_suffix(path.name) is None:
        raise StepError(f"dataset.sources[{i}].url: {path} is neither a folder nor an archive "
                        f"({', '.join(ARCHIVE_SUFFIXES)})")
    digest = sha256_file(path)
    if src.sha256 is not None and digest != src.sha256:
        raise StepError(f"dataset.sources[{i}]: checksum mismatch for {path}: expected sha256 {src.sha256}, "
                        f"got {digest}")
    _warn_unpinned(i, src, digest)
    return SourceRecord(index=i, url=src.url, path=_display_path(path), kind="archive", sha256=digest,
                        bytes=path.stat().st_size)


def _warn_unpinned(i: int, src: Source, digest: str) -> None:
    if src.sha256 is None:
        log.warning("dataset.sources[%d] (%s) is not pinned; the archive's sha256 is %s. Pin it with "
                    "dataset.sources[%d].sha256 in params.yaml to verify future downloads",
                    i, src.url, digest, i)


def _check_filenames(sources: list[Source]) -> None:
    """Remote sources need distinct, plain archive file names before anything is downloaded."""
    seen: dict[str, int] = {}
    for i, src in enumerate(sources):
        if not src.is_remote:
            continue
        key = "filename" if src.filename else "url"
        name = src.filename or default_filename(src.url)
        if name in {"", ".", ".."} or "/" in name or "\\" in name or "\x00" in name:
            raise StepError(f"dataset.sources[{i}].{key}: cannot derive a plain file name from {name!r}; "
                            f"set dataset.sources[{i}].filename (e.g. archive.zip)")
        if archive_suffix(name) is None:
            raise StepError(f"dataset.sources[{i}].{key}: {name!r} is not an archive name "
                            f"({', '.join(ARCHIVE_SUFFIXES)}); set dataset.sources[{i}].filename")
        if name in seen:
            raise StepError(f"dataset.sources[{i}]: file name {name!r} is also used by "
                            f"dataset.sources[{seen[name]}]; set distinct filename values")
        seen[name] = i


def inbox_sources(inbox: Path) -> list[Source]:
    """Archives and folders dropped into a dataset's inbox, in name order, as local sources.

    The inbox is where local copies and newly landed data go (``data/inbox/<dataset>/``); DVC tracks it as a
    dependency, so anything added there re-runs the pipeline. Hidden files and OS junk are ignored.
    """
    if not inbox.is_dir():
        return []
    found: list[Source] = []
    for entry in sorted(inbox.iterdir()):
        if entry.name.startswith(".") or entry.name in JUNK_FILES or entry.name in JUNK_DIRS:
            continue
        if entry.is_dir() or archive_suffix(entry.name):
            found.append(Source(url=str(entry)))
        else:
            log.warning("ignoring %s in the inbox: neither a folder nor a .zip/.tar/.tar.gz/.tgz archive", entry)
    return found


def run(cfg: Config, *, out_dir: Path, sources_json: Path, inbox: Path) -> dict[str, Any]:
    """Resolve every source to a local archive or folder and write ``sources_json``.

    Sources are ``dataset.sources`` followed by whatever lies in ``inbox``. Remote archives are downloaded
    into ``out_dir``; local paths are used where they are. Returns a summary with counts of sources,
    archives, folders, downloads made, and the indices of unpinned archives.
    """
    sources = [*cfg.dataset.sources, *inbox_sources(Path(inbox))]
    if not sources:
        raise StepError(f"no sources: set dataset.sources in params.yaml, or drop archives or folders into {inbox}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _check_filenames(sources)
    records: list[SourceRecord] = []
    fetched = 0
    for i, src in enumerate(sources):
        if src.is_remote:
            record, was_fetched = _resolve_remote(i, src, Path(out_dir), cfg.download, Path(inbox))
            fetched += was_fetched
        else:
            record = _resolve_local(i, src)
        records.append(record)
    write_json(sources_json, records)
    log.info("wrote %d source(s) to %s", len(records), sources_json)
    return {
        "sources": len(records),
        "archives": sum(r["kind"] == "archive" for r in records),
        "folders": sum(r["kind"] == "folder" for r in records),
        "downloaded": fetched,
        "unpinned": [r["index"] for r in records
                     if r["kind"] == "archive" and sources[r["index"]].sha256 is None],
    }

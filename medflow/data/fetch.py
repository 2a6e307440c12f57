"""Fetching raw inputs: resumable, retried, sha256-verified downloads, and local archives and folders.

The transport is ``requests`` over urllib3: :func:`fetch` opens a :class:`requests.Session` whose adapter is
mounted with a :class:`urllib3.util.Retry` (:func:`retry_policy`). urllib3 retries what happens *before* a body
arrives: connection failures, read timeouts, and the statuses 429, 500, 502, 503 and 504, waiting
``backoff_s * 2**(k - 1)`` seconds before retry k > 1 (the first retry is immediate; waits are capped at
urllib3's 120 s), or as long as a ``Retry-After`` header asks. ``download.retries``, ``download.backoff_s`` and
``download.timeout_s`` map onto ``Retry(total=...)``, ``backoff_factor`` and the per-socket-operation timeout.

What medflow keeps, because neither library does it:

- resume: the body streams to ``<dest>.part``; a stream cut short (or a ``.part`` left by an earlier run) is
  continued with a ``Range`` request, up to ``retries`` times; the answer must be a 206 whose
  ``Content-Range`` starts at the ``.part``'s size, else (a server that ignores Range) it restarts from zero;
- byte-exact bodies: ``Accept-Encoding: identity`` and undecoded reads, so a server that labels a ``.tar.gz``
  ``Content-Encoding: gzip`` cannot make requests store different bytes than the pinned sha256 describes;
- verification: the sha256 is checked before ``<dest>.part`` is renamed to ``dest``, so the final name never
  holds a partial or unverified file; a mismatch is kept aside as ``<dest>.mismatch``;
- clear errors (:class:`FetchError`): the URL, the attempts made and a short reason; an unknown host and a
  certificate that fails verification are not retried (retrying cannot fix them), nor is a 404;
- ``file://`` URLs: requests has no file:// adapter, and a local copy needs neither retries nor Range, so
  :func:`_copy_file_url` copies the file through the same ``.part`` and verification;
- local paths (archives or folders) are used in place, never copied (:func:`resolve_local`); a folder's record
  carries the digest of its listing (:mod:`medflow.data.walk`), so a change inside it changes sources.json;
- https only: a plain ``http://`` source, or a redirect from https to anything but https, is refused unless
  the source says ``insecure: true``. Certificates are verified against certifi's bundle, or the one that
  ``REQUESTS_CA_BUNDLE`` names (requests' own variable: a private CA, the tests' loopback server);
- signed URLs: logs, errors and ``sources.json`` (so roots.json and the model card too) show a URL with its
  query string, fragment and credentials replaced by ``<redacted>`` (:func:`redact`); the download uses
  the real URL. dvc.lock records params.yaml as written, which medflow cannot redact (see README).

Unpinned sources (``sha256: null``) log a WARNING with the digest seen, so it can be pinned in params.yaml.
A sidecar ``<filename>.sha256`` (JSON: sha256, bytes, mtime_ns) lets a later run skip an unpinned download
whose file is unchanged; pinned files are re-hashed and skipped when they match.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypedDict

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3 import BaseHTTPResponse
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError, ReadTimeoutError
from urllib3.util import Retry

import medflow
from medflow.config import DownloadConfig, Source
from medflow.data.walk import WalkReport, folder_listing, listing_digest
from medflow.errors import StepError
from medflow.io import CHUNK, display_path, sha256_file, write_json
from medflow.schema import JUNK_DIRS, JUNK_FILES

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
USER_AGENT = f"medflow/{medflow.__version__} python-requests/{requests.__version__}"
# Statuses a later attempt may fix: rate limiting (429) and a busy, restarting or overloaded server (5xx).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class SourceRecord(TypedDict):
    """One resolved source in sources.json (the contract between download and extract)."""

    index: int  # position in dataset.sources
    url: str  # remote: as written in params.yaml, redacted (:func:`redact`: no query string, no credentials);
    #           local: its path, as ``path`` (what the user wrote may be absolute; params.yaml keeps it)
    path: str  # local archive or folder, relative to the project root (medflow.io.display_path)
    kind: Literal["archive", "folder"]
    sha256: str | None  # archives only
    bytes: int | None  # archives only
    # folders only: :func:`medflow.data.walk.listing_digest` of the folder's files (names, sizes, mtimes, links
    # followed), so a file added, changed or removed changes sources.json and re-runs extract and manifest
    digest: str | None


class FetchError(StepError):
    """A URL could not be fetched (after retries, or for a permanent reason such as HTTP 404)."""

    def __init__(self, url: str, reason: str, attempts: int) -> None:
        reason = _scrub(reason, url)
        super().__init__(f"could not fetch {redact(url)} ({attempts} attempt{'s' * (attempts != 1)}): {reason}")
        self.url = url  # the real URL (a signed one included): never log it, log redact(url)
        self.reason = reason
        self.attempts = attempts


class _StreamCut(Exception):
    """The body stopped before its end (connection dropped, read timed out): resume it with Range."""

    def __init__(self, reason: str, attempts: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts  # requests urllib3 made for the response that was cut


# --------------------------------------------------------------------------------------------- names


def archive_suffix(name: str) -> str | None:
    """The archive suffix of a file name (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``; any case), else None."""
    lower = name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


def redact(url: str) -> str:
    """``url`` fit to log or store: a query string (the signature of a signed URL), a fragment and any
    ``user:password@`` replaced by ``<redacted>``; a URL without them is returned as is."""
    parts = urllib.parse.urlsplit(url)
    if not (parts.query or parts.fragment or "@" in parts.netloc):
        return url
    netloc = f"<redacted>@{parts.netloc.rpartition('@')[2]}" if "@" in parts.netloc else parts.netloc
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "<redacted>" if parts.query else "",
                                    "<redacted>" if parts.fragment else ""))


def _scrub(text: str, url: str) -> str:
    """``text`` (an error from requests, which may quote the URL) without ``url``'s query and credentials."""
    parts = urllib.parse.urlsplit(url)
    secrets = [parts.query, parts.fragment, parts.netloc.rpartition("@")[0]]
    for secret in (x for x in secrets if x):
        text = text.replace(secret, "<redacted>")
    return text


def default_filename(url: str) -> str:
    """Last path segment of a URL, percent-decoded (``.../Chest%20X.zip?x=1`` -> ``Chest X.zip``)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rpartition("/")[2])


def _display_path(path: Path) -> str:
    """``path`` relative to the project root, links kept (:func:`medflow.io.display_path`): never absolute."""
    return display_path(path)


# --------------------------------------------------------------------------------------------- transport


class _GaveUp(MaxRetryError):
    """urllib3's "no more retries", carrying how many attempts were made (for :class:`FetchError`)."""

    def __init__(self, pool: Any, url: str | None, reason: Exception | None = None, attempts: int = 1) -> None:
        super().__init__(pool, url, reason)
        self.attempts = attempts


class _Retry(Retry):
    """urllib3's Retry that gives up at once when retrying cannot help, counts its attempts, logs status retries."""

    def increment(self, method: str | None = None, url: str | None = None, response: Any = None,
                  error: Exception | None = None, _pool: Any = None,
                  _stacktrace: TracebackType | None = None) -> Self:
        attempts = len(self.history) + 1
        if error is not None and _hopeless(error):
            raise _GaveUp(_pool, url, error, attempts) from error
        try:
            return super().increment(method, url, response, error, _pool, _stacktrace)
        except MaxRetryError as e:
            raise _GaveUp(_pool, url, e.reason, attempts) from e.reason

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        """Wait as urllib3 does (Retry-After, else backoff); log retries a status caused (urllib3 logs the rest)."""
        if response is not None:
            after = response.headers.get("Retry-After")
            log.warning("HTTP %d for %s; retry %d of up to %d%s", response.status,
                        redact(self.history[-1].url or ""),
                        len(self.history), len(self.history) + (self.total or 0),
                        f" after Retry-After: {after} s" if after else "")
        super().sleep(response)


def retry_policy(retries: int, backoff_s: float) -> Retry:
    """The urllib3 Retry for downloads: ``retries`` retries of GETs, exponential backoff, Retry-After honoured.

    ``raise_on_status=False`` hands back the last 429/5xx response once retries run out, so the error
    names the server's real status instead of urllib3's "too many error responses".
    """
    return _Retry(total=retries, connect=retries, read=retries, status=retries, other=retries,
                  backoff_factor=backoff_s, status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET"}),
                  respect_retry_after_header=True, raise_on_status=False)


class _Session(requests.Session):
    """A Session that refuses, unless ``insecure``, a redirect to anything but https (a downgrade to http)."""

    def __init__(self, insecure: bool) -> None:
        super().__init__()
        self.insecure = insecure

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is not None and not self.insecure:
            to = urllib.parse.urljoin(resp.url, target)
            if urllib.parse.urlsplit(to).scheme.lower() != "https":
                raise FetchError(resp.url, f"redirected to {redact(to)}, which is not https; refusing the "
                                 "downgrade (set insecure: true on the source to allow http)", 1)
        return target


def _session(retries: int, backoff_s: float, insecure: bool = False) -> requests.Session:
    """A Session retrying per :func:`retry_policy`, asking for the bytes as stored (no content coding) and,
    unless ``insecure``, following redirects to https only."""
    session = _Session(insecure)
    adapter = HTTPAdapter(max_retries=retry_policy(retries, backoff_s))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    return session


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception wrapped in it (requests -> urllib3 -> socket), outermost first."""
    seen: set[int] = set()
    queue = [err]
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = (getattr(e, "reason", None), e.__cause__, e.__context__, *e.args)
        queue.extend(x for x in inner if isinstance(x, BaseException))


def _unknown_host(err: BaseException) -> bool:
    """A DNS answer that the name does not exist (offline sandbox, typo); EAI_AGAIN stays retryable."""
    nonexistent = (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5))
    return any(isinstance(e, socket.gaierror) and e.errno in nonexistent for e in _causes(err))


def _hopeless(err: BaseException) -> bool:
    """Errors that no retry can fix: an unknown host, a certificate that fails verification."""
    return _unknown_host(err) or any(isinstance(e, ssl.SSLCertVerificationError) for e in _causes(err))


def _reason(err: BaseException) -> str:
    """A short human reason for a transport error ('connection refused', 'timed out', ...)."""
    causes = list(_causes(err))
    for e in causes:
        if isinstance(e, socket.gaierror):
            return f"DNS lookup failed ({e.strerror or e})"
    for e in causes:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"certificate verification failed ({e.verify_message or e})"
    for e in causes:
        if isinstance(e, ReadTimeoutError | TimeoutError) or (
                isinstance(e, ConnectTimeoutError) and not isinstance(e, NewConnectionError)):
            return "timed out"
    for e in reversed(causes):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    return str(causes[-1]) or type(causes[-1]).__name__


def _attempts(response: requests.Response) -> int:
    """Requests urllib3 sent to get ``response``: one plus the retries recorded in its Retry history."""
    retries = getattr(response.raw, "retries", None)
    return len(retries.history) + 1 if isinstance(retries, Retry) else 1


# --------------------------------------------------------------------------------------------- fetch


def fetch(url: str, dest: Path, *, sha256: str | None = None, timeout_s: float = 60.0, retries: int = 5,
          backoff_s: float = 1.0, insecure: bool = False) -> str:
    """Download ``url`` (https or file; http too if ``insecure``) to ``dest`` through ``dest.part``; return the
    sha256 written.

    Without ``insecure`` a plain http URL, or a redirect to one, is a FetchError. Logs and errors show the
    URL redacted (:func:`redact`).

    Each request is retried by urllib3 (:func:`retry_policy`); a body cut short is resumed with a Range
    request up to ``retries`` times, after ``backoff_s * 2**k`` seconds. ``timeout_s`` bounds each connect
    and each read. ``dest`` is written (atomically, by rename) only when the digest matches ``sha256``, or
    when no pin is given. Raises :class:`FetchError` when the URL cannot be fetched and :class:`StepError`
    on a checksum mismatch (the bad file is kept as ``dest.mismatch``).
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "http" and not insecure:
        raise FetchError(url, "plain http:// is not encrypted; use https:// (or set insecure: true on the source)", 0)
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    if scheme == "file":
        _copy_file_url(url, part)
    else:
        with _session(retries, backoff_s, insecure) as session:
            _download(session, url, part, timeout_s=timeout_s, resumes=retries, backoff_s=backoff_s)
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        aside = dest.with_name(dest.name + ".mismatch")
        os.replace(part, aside)
        raise StepError(f"checksum mismatch for {redact(url)}: expected sha256 {sha256.lower()}, got {digest} "
                        f"({aside.stat().st_size} bytes, kept as {aside} for inspection; {dest} not written)")
    os.replace(part, dest)
    return digest


def _download(session: requests.Session, url: str, part: Path, *, timeout_s: float, resumes: int,
              backoff_s: float) -> None:
    """Fill ``part`` with the whole body of ``url``, resuming after cuts; FetchError when it cannot."""
    sent = 0  # requests made before the current one (cut or restarted), for the error message
    reason = ""
    for resume in range(resumes + 1):
        if resume:
            delay = backoff_s * 2 ** (resume - 1)
            log.warning("%s: %s; resuming in %.1f s (%d of %d)", redact(url), reason, delay, resume, resumes)
            time.sleep(delay)
        try:
            sent += _get_once(session, url, part, timeout_s=timeout_s)
            return
        except _StreamCut as e:
            sent += e.attempts
            reason = e.reason
        except FetchError as e:
            raise FetchError(url, e.reason, sent + e.attempts) from None
    raise FetchError(url, reason, sent)


def _get_once(session: requests.Session, url: str, part: Path, *, timeout_s: float) -> int:
    """One GET (urllib3 retrying it) appended to ``part`` or restarting it; returns the requests it took.

    Raises _StreamCut when the body stops early (or must restart), FetchError for anything else.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout_s)
    except requests.RequestException as e:
        attempts = next((c.attempts for c in _causes(e) if isinstance(c, _GaveUp)), 1)
        raise FetchError(url, _reason(e), attempts) from None
    with response:
        attempts = _attempts(response)
        if response.status_code == 416 and offset:
            if _range_total(response.headers.get("Content-Range")) == offset:
                log.info("%s: %s already holds all %d bytes", redact(url), part.name, offset)
                return attempts
            part.unlink()
            raise _StreamCut(f"server refused to resume at byte {offset} (HTTP 416); restarting", attempts)
        if response.status_code >= 400:
            raise FetchError(url, f"HTTP {response.status_code} {response.reason}", attempts)
        try:
            _receive(response, part, offset, url)
        except _StreamCut as e:
            raise _StreamCut(e.reason, attempts) from None
    return attempts


def _receive(response: requests.Response, part: Path, offset: int, url: str) -> None:
    """Write the body to ``part``: appended after a 206 starting at ``offset``, else from byte zero."""
    if offset and not (response.status_code == 206
                       and _range_start(response.headers.get("Content-Range")) == offset):
        log.info("%s ignored the Range request (HTTP %s); restarting from byte 0", redact(url),
                 response.status_code)
        offset = 0
    length = response.headers.get("Content-Length", "")
    expected = int(length) if length.isdigit() else None
    total = offset + expected if expected is not None else None
    received = 0
    with open(part, "ab" if offset else "wb") as f, _progress(part.name.removesuffix(".part"), total, offset) as bar:
        try:
            for chunk in _body(response):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except _StreamCut as e:
            raise _StreamCut(f"stream interrupted after {offset + received} bytes: {e.reason}") from None
    if expected is not None and received < expected:
        raise _StreamCut(f"stream cut short after {offset + received} of {total} bytes")


def _body(response: requests.Response) -> Iterator[bytes]:
    """The body as sent (no content decoding), in CHUNK pieces; read failures become _StreamCut.

    Only reading is guarded: a failure writing the ``.part`` (disk full) is not a network cut to retry.
    """
    try:
        yield from response.raw.stream(CHUNK, decode_content=False)
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
        raise _StreamCut(_reason(e)) from None


def _copy_file_url(url: str, part: Path) -> None:
    """Copy a ``file://`` URL's file to ``part`` (requests has no file:// adapter; a copy needs no resume)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(url, f"file:// URLs must name a local file, not one on host {parts.netloc!r}", 1)
    path = Path(urllib.request.url2pathname(parts.path))
    try:
        src = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise FetchError(url, f"{e.strerror or e}: {path}", 1) from None
    with src, open(part, "wb") as f, _progress(part.name.removesuffix(".part"), os.fstat(src.fileno()).st_size,
                                               0) as bar:
        while chunk := src.read(CHUNK):
            f.write(chunk)
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


def resolve_remote(index: int, src: Source, out_dir: Path, dl: DownloadConfig) -> tuple[SourceRecord, bool]:
    """Download one remote source into ``out_dir`` unless an unchanged copy is there already.

    Returns its record and whether it was fetched now. Raises :class:`FetchError` when the URL cannot be
    fetched (the step adds what to do about it) and :class:`StepError` on a checksum mismatch.
    """
    if urllib.parse.urlsplit(src.url).scheme.lower() == "http" and not src.insecure:
        raise StepError(f"dataset.sources[{index}].url: {redact(src.url)}: plain http:// is not encrypted (the "
                        f"archive could be swapped on the way); use https://, or set dataset.sources[{index}]."
                        "insecure: true to download it anyway")
    dest = out_dir / (src.filename or default_filename(src.url))
    digest = _current_digest(dest, src.sha256)
    fetched = digest is None
    if digest is None:
        digest = fetch(src.url, dest, sha256=src.sha256, timeout_s=dl.timeout_s, retries=dl.retries,
                       backoff_s=dl.backoff_s, insecure=src.insecure)
        _write_sidecar(dest, digest)
        log.info("downloaded %s -> %s (sha256 %s)", redact(src.url), dest, digest)
    else:
        log.info("%s already downloaded and unchanged (sha256 %s); skipping", dest, digest)
    _warn_unpinned(index, src, digest)
    record = SourceRecord(index=index, url=redact(src.url), path=_display_path(dest), kind="archive",
                          sha256=digest, bytes=dest.stat().st_size, digest=None)
    return record, fetched


def resolve_local(index: int, src: Source) -> SourceRecord:
    """Resolve a local archive or folder in place (never copied); hash archives and check their pin."""
    path = Path(src.url).expanduser()
    if not path.exists():
        raise StepError(f"dataset.sources[{index}].url: {path} does not exist (relative to {Path.cwd()}); "
                        "point it at an archive (.zip, .tar, .tar.gz, .tgz) or a folder")
    if path.is_dir():
        if src.sha256 is not None:
            raise StepError(f"dataset.sources[{index}].sha256: {path} is a folder; only archives can be pinned")
        return SourceRecord(index=index, url=_display_path(path), path=_display_path(path), kind="folder",
                            sha256=None, bytes=None, digest=folder_digest(path))
    if archive_suffix(path.name) is None:
        raise StepError(f"dataset.sources[{index}].url: {path} is neither a folder nor an archive "
                        f"({', '.join(ARCHIVE_SUFFIXES)})")
    digest = sha256_file(path)
    if src.sha256 is not None and digest != src.sha256:
        raise StepError(f"dataset.sources[{index}]: checksum mismatch for {path}: expected sha256 {src.sha256}, "
                        f"got {digest}")
    _warn_unpinned(index, src, digest)
    return SourceRecord(index=index, url=_display_path(path), path=_display_path(path), kind="archive",
                        sha256=digest, bytes=path.stat().st_size, digest=None)


def folder_digest(path: Path) -> str:
    """The content digest of a folder source (:mod:`medflow.data.walk`); what the walk left out is logged."""
    report = WalkReport()
    listing = folder_listing(path, report)
    report.log(path)
    digest = listing_digest(listing)
    log.info("%s: %d file(s), digest %s", path, len(listing), digest[:12])
    return digest


def _warn_unpinned(index: int, src: Source, digest: str) -> None:
    if src.sha256 is None:
        log.warning("dataset.sources[%d] (%s) is not pinned; the archive's sha256 is %s. Pin it with "
                    "dataset.sources[%d].sha256 in params.yaml to verify future downloads",
                    index, redact(src.url), digest, index)


def check_filenames(sources: list[Source]) -> None:
    """Remote sources need distinct, plain archive file names: checked before anything is downloaded."""
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

    The inbox is where local copies and newly landed data go (``data/inbox/<dataset>/``). The download stage
    runs on every ``dvc repro`` (``always_changed``: DVC sees nothing inside a symlinked folder), and each
    folder's record carries its content digest, so a file added, changed or removed anywhere below re-runs
    extract and manifest. Hidden entries and OS junk are ignored.
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

"""Download step against a real loopback HTTP server (Range, cuts, 503s) and real local files."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from medflow.config import Config, parse_config
from medflow.data.fetch import FetchError, archive_suffix, default_filename, fetch, redact
from medflow.data.walk import listing_digest
from medflow.errors import StepError
from medflow.io import display_path
from tasks import download

# --------------------------------------------------------------------------------------------- fixtures


def _zip_bytes(n_files: int = 40) -> bytes:
    """A real zip of incompressible bytes, big enough (~200 KB) to be cut mid-stream."""
    buf = io.BytesIO()
    rng = __import__("random").Random(0)
    with zipfile.ZipFile(buf, "w") as zf:
        for k in range(n_files):
            zf.writestr(f"data/NORMAL/im{k}.png", rng.randbytes(5000))
    return buf.getvalue()


PAYLOAD = _zip_bytes()
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class ServerState:
    """What the loopback server serves and how it misbehaves; it records every request's headers."""

    payload: bytes = PAYLOAD
    cut_first: bool = False  # first body stops halfway (Content-Length promises the whole)
    cut_all: bool = False  # every body stops halfway
    fail_first: int = 0  # answer this many requests with fail_status
    fail_status: int = 503
    retry_after: str | None = None  # Retry-After header sent with the failures
    honor_range: bool = True  # False: answer 200 with the whole body even to a Range request
    content_encoding: str | None = None  # a Content-Encoding label sent with the (unchanged) body
    redirect_to: str | None = None  # answer /files/ requests for anything else with a 302 to this URL
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Server:
    base: str
    state: ServerState

    def url(self, name: str = "ChestXRay2017.zip") -> str:
        return f"{self.base}/files/{name}"


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        st: ServerState = self.server.state
        with st.lock:
            st.requests.append({"path": self.path, "range": self.headers.get("Range"), "time": time.monotonic(),
                                "accept_encoding": self.headers.get("Accept-Encoding")})
            n = len(st.requests)
            fail = st.fail_first >= n
        if fail:
            self.send_response(st.fail_status)
            if st.retry_after is not None:
                self.send_header("Retry-After", st.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not self.path.startswith("/files/"):
            self.send_error(404)
            return
        if st.redirect_to and not st.redirect_to.endswith(self.path):
            self.send_response(302)
            self.send_header("Location", st.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, start = st.payload, 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and st.honor_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        if st.content_encoding:
            self.send_header("Content-Encoding", st.content_encoding)
        self.end_headers()
        if st.cut_all or (st.cut_first and n == 1):
            chunk = chunk[: len(chunk) // 2]
        self.wfile.write(chunk)


@pytest.fixture
def dl_server() -> Iterator[Server]:
    """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) in a daemon thread."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state)  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def dl_refused_url() -> str:
    """A loopback URL nothing listens on (port freshly released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ChestXRay2017.zip"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Server]:
    """The loopback server over https, with a freshly made self-signed certificate (trusted by nobody:
    a test that wants it trusted names it in REQUESTS_CA_BUNDLE, ``tmp_path / "cert.pem"``)."""
    cert, key = _self_signed(tmp_path)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(f"https://127.0.0.1:{httpd.server_address[1]}", httpd.state)  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def tls_url(tls_server: Server) -> str:
    return tls_server.url("a.zip")


@pytest.fixture
def trusted(tmp_path: Path, tls_server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """``tls_server`` with its certificate trusted the documented way: REQUESTS_CA_BUNDLE."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "cert.pem"))
    return tls_server


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files in ``folder``."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def fetch_http(url: str, dest: Path, **kwargs: Any) -> str:
    """:func:`fetch` of the plain-http loopback server (``insecure``: http is refused otherwise)."""
    return fetch(url, dest, insecure=True, **kwargs)


def _cfg(*sources: Any, retries: int = 2, timeout_s: float = 5.0, insecure: bool = True) -> Config:
    """A config of ``sources``; an http:// one (the loopback server) says ``insecure: true`` unless told not to."""
    def plain(src: Any) -> bool:
        return str(src["url"] if isinstance(src, dict) else src).startswith("http://")
    sources = tuple({**(s if isinstance(s, dict) else {"url": s}), "insecure": True} if insecure and plain(s)
                    else s for s in sources)
    return parse_config({
        "dataset": {"name": "t", "sources": list(sources), "labels": {"NORMAL": 0, "PNEUMONIA": 1}},
        "download": {"retries": retries, "backoff_s": 0.01, "timeout_s": timeout_s},
    })


def _run(tmp_path: Path, cfg: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = download.run(cfg, out_dir=tmp_path / "raw", sources_json=tmp_path / "sources.json",
                           inbox=tmp_path / "no-inbox")
    return summary, json.loads((tmp_path / "sources.json").read_text())


# --------------------------------------------------------------------------------------------- remote


def test_pinned_download_writes_verified_file_and_record(tmp_path: Path, dl_server: Server) -> None:
    summary, records = _run(tmp_path, _cfg({"url": dl_server.url(), "sha256": DIGEST}))
    final = tmp_path / "raw" / "ChestXRay2017.zip"
    assert final.read_bytes() == PAYLOAD
    assert not (tmp_path / "raw" / "ChestXRay2017.zip.part").exists()
    assert records == [{"index": 0, "url": dl_server.url(), "path": display_path(final), "kind": "archive",
                        "sha256": DIGEST, "bytes": len(PAYLOAD), "digest": None}]
    assert summary == {"sources": 1, "archives": 1, "folders": 0, "downloaded": 1, "unpinned": []}


def test_cut_stream_resumes_with_range(tmp_path: Path, dl_server: Server) -> None:
    dl_server.state.cut_first = True
    dest = tmp_path / "a.zip"
    digest = fetch_http(dl_server.url(), dest, sha256=DIGEST, timeout_s=5, retries=2, backoff_s=0)
    assert digest == DIGEST and dest.read_bytes() == PAYLOAD
    first, second = dl_server.state.requests
    assert first["range"] is None
    assert second["range"] == f"bytes={len(PAYLOAD) // 2}-"


def test_partial_from_earlier_run_is_resumed(tmp_path: Path, dl_server: Server) -> None:
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[:1000])
    assert fetch_http(dl_server.url(), tmp_path / "a.zip", sha256=DIGEST, retries=0) == DIGEST
    assert [r["range"] for r in dl_server.state.requests] == ["bytes=1000-"]


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, dl_server: Server) -> None:
    dl_server.state.honor_range = False
    (tmp_path / "a.zip.part").write_bytes(b"garbage that must not stay in front")
    assert fetch_http(dl_server.url(), tmp_path / "a.zip", sha256=DIGEST, retries=0) == DIGEST
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert dl_server.state.requests[0]["range"] is not None


def test_complete_part_answered_416_is_accepted(tmp_path: Path, dl_server: Server) -> None:
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD)
    assert fetch_http(dl_server.url(), tmp_path / "a.zip", sha256=DIGEST, retries=0) == DIGEST
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD


def test_oversized_part_answered_416_restarts(tmp_path: Path, dl_server: Server) -> None:
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD + b"extra")
    digest = fetch_http(dl_server.url(), tmp_path / "a.zip", sha256=DIGEST, retries=1, backoff_s=0)
    assert digest == DIGEST
    assert [r["range"] for r in dl_server.state.requests] == [f"bytes={len(PAYLOAD) + 5}-", None]


def test_checksum_mismatch_never_writes_final_name(tmp_path: Path, dl_server: Server) -> None:
    wrong = "0" * 64
    with pytest.raises(StepError) as e:
        _run(tmp_path, _cfg({"url": dl_server.url(), "sha256": wrong}))
    msg = str(e.value)
    assert dl_server.url() in msg and wrong in msg and DIGEST in msg
    raw = tmp_path / "raw"
    assert not (raw / "ChestXRay2017.zip").exists()
    assert not (raw / "ChestXRay2017.zip.part").exists()
    assert (raw / "ChestXRay2017.zip.mismatch").read_bytes() == PAYLOAD
    assert not (tmp_path / "sources.json").exists()


def test_unpinned_warns_records_digest_and_skips_next_time(tmp_path: Path, dl_server: Server,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg({"url": dl_server.url()})
    with caplog.at_level(logging.WARNING, logger="medflow.data.fetch"):
        summary, records = _run(tmp_path, cfg)
    assert any(DIGEST in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert records[0]["sha256"] == DIGEST and summary["unpinned"] == [0]
    sidecar = json.loads((tmp_path / "raw" / "ChestXRay2017.zip.sha256").read_text())
    assert sidecar["sha256"] == DIGEST and sidecar["bytes"] == len(PAYLOAD)

    summary, records = _run(tmp_path, cfg)
    assert summary["downloaded"] == 0 and records[0]["sha256"] == DIGEST
    assert len(dl_server.state.requests) == 1


def test_unpinned_file_changed_since_sidecar_is_fetched_again(tmp_path: Path, dl_server: Server) -> None:
    cfg = _cfg({"url": dl_server.url()})
    _run(tmp_path, cfg)
    (tmp_path / "raw" / "ChestXRay2017.zip").write_bytes(b"tampered")
    summary, records = _run(tmp_path, cfg)
    assert summary["downloaded"] == 1 and records[0]["sha256"] == DIGEST
    assert len(dl_server.state.requests) == 2


def test_pinned_existing_file_is_skipped_and_wrong_one_replaced(tmp_path: Path, dl_server: Server) -> None:
    cfg = _cfg({"url": dl_server.url(), "sha256": DIGEST})
    _run(tmp_path, cfg)
    assert _run(tmp_path, cfg)[0]["downloaded"] == 0
    (tmp_path / "raw" / "ChestXRay2017.zip").write_bytes(b"stale")
    assert _run(tmp_path, cfg)[0]["downloaded"] == 1
    assert (tmp_path / "raw" / "ChestXRay2017.zip").read_bytes() == PAYLOAD
    assert len(dl_server.state.requests) == 2


def test_503_twice_then_success_is_retried(tmp_path: Path, dl_server: Server) -> None:
    dl_server.state.fail_first = 2
    summary, records = _run(tmp_path, _cfg({"url": dl_server.url(), "sha256": DIGEST}, retries=2))
    assert records[0]["sha256"] == DIGEST
    assert len(dl_server.state.requests) == 3


def test_503_beyond_retries_fails_with_reason(tmp_path: Path, dl_server: Server) -> None:
    dl_server.state.fail_first = 5
    with pytest.raises(StepError, match=r"2 attempts\): HTTP 503"):
        _run(tmp_path, _cfg({"url": dl_server.url()}, retries=1))
    assert len(dl_server.state.requests) == 2
    assert not (tmp_path / "raw" / "ChestXRay2017.zip").exists()


def test_retry_after_is_honoured(tmp_path: Path, dl_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    dl_server.state.fail_first, dl_server.state.retry_after = 1, "1"
    with caplog.at_level(logging.WARNING, logger="medflow.data.fetch"):
        assert fetch_http(dl_server.url(), tmp_path / "a.zip", sha256=DIGEST, retries=2, backoff_s=0.01) == DIGEST
    assert "HTTP 503 for /files/ChestXRay2017.zip; retry 1 of up to 2 after Retry-After: 1 s" in caplog.text
    first, second = dl_server.state.requests
    # urllib3's own first retry is immediate (and backoff_s is 0.01): only Retry-After explains the wait
    assert second["time"] - first["time"] >= 0.95


def test_429_is_retried(tmp_path: Path, dl_server: Server) -> None:
    dl_server.state.fail_first, dl_server.state.fail_status = 2, 429
    assert fetch_http(dl_server.url(), tmp_path / "a.zip", sha256=DIGEST, retries=2, backoff_s=0) == DIGEST
    assert len(dl_server.state.requests) == 3


def test_429_beyond_retries_names_the_status(tmp_path: Path, dl_server: Server) -> None:
    dl_server.state.fail_first, dl_server.state.fail_status = 5, 429
    with pytest.raises(FetchError, match=rf"{re.escape(dl_server.url())} \(3 attempts\): HTTP 429 Too Many"):
        fetch_http(dl_server.url(), tmp_path / "a.zip", retries=2, backoff_s=0)
    assert len(dl_server.state.requests) == 3
    assert not (tmp_path / "a.zip").exists()


def test_cut_on_every_attempt_keeps_the_part_for_the_next_run(tmp_path: Path, dl_server: Server) -> None:
    dl_server.state.cut_all = True
    with pytest.raises(FetchError, match=r"\(2 attempts\): stream (cut short|interrupted) after"):
        fetch_http(dl_server.url(), tmp_path / "a.zip", retries=1, backoff_s=0)
    kept = (tmp_path / "a.zip.part").stat().st_size
    assert kept == len(PAYLOAD) // 2 + (len(PAYLOAD) - len(PAYLOAD) // 2) // 2
    dl_server.state.cut_all = False
    assert fetch_http(dl_server.url(), tmp_path / "a.zip", sha256=DIGEST, retries=0) == DIGEST
    assert dl_server.state.requests[-1]["range"] == f"bytes={kept}-"


def test_body_is_stored_as_sent_whatever_its_content_encoding(tmp_path: Path, dl_server: Server) -> None:
    tgz = gzip.compress(b"a tar archive's bytes " * 1000)  # a .tar.gz some servers label Content-Encoding: gzip
    dl_server.state.payload, dl_server.state.content_encoding = tgz, "gzip"
    digest = fetch_http(dl_server.url("x.tar.gz"), tmp_path / "x.tar.gz", retries=0)
    assert (tmp_path / "x.tar.gz").read_bytes() == tgz and digest == hashlib.sha256(tgz).hexdigest()
    assert dl_server.state.requests[0]["accept_encoding"] == "identity"


def test_untrusted_certificate_fails_at_once(tmp_path: Path, tls_url: str) -> None:
    with pytest.raises(FetchError, match=r"\(1 attempt\): certificate verification failed"):
        fetch(tls_url, tmp_path / "a.zip", retries=3, backoff_s=0)


def test_404_is_not_retried(tmp_path: Path, dl_server: Server) -> None:
    url = f"{dl_server.base}/missing/ChestXRay2017.zip"
    with pytest.raises(StepError, match="HTTP 404"):
        _run(tmp_path, _cfg({"url": url}, retries=3))
    assert len(dl_server.state.requests) == 1


def test_connection_refused_gives_one_clear_error(tmp_path: Path, dl_refused_url: str) -> None:
    with pytest.raises(StepError) as e:
        _run(tmp_path, _cfg({"url": dl_refused_url}, retries=1))
    msg = str(e.value)
    assert dl_refused_url in msg and "connection refused" in msg and "2 attempts" in msg
    assert "set dataset.sources[0].url in params.yaml to a local path of the archive or folder" in msg
    assert str(tmp_path / "no-inbox" / "ChestXRay2017.zip") in msg
    assert not (tmp_path / "sources.json").exists()


def test_unknown_host_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(StepError, match=r"\(1 attempt\): DNS lookup failed"):
        _run(tmp_path, _cfg({"url": "http://medflow-no-such-host.invalid/x.zip"}, retries=3))


def test_timeout_is_transient(tmp_path: Path) -> None:
    with socket.socket() as srv:  # accepts connections (kernel backlog) but never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/a.zip"
        with pytest.raises(FetchError, match="timed out") as e:
            fetch_http(url, tmp_path / "a.zip", timeout_s=0.2, retries=1, backoff_s=0)
    assert e.value.attempts == 2


def test_default_filename_is_decoded_last_segment(tmp_path: Path, dl_server: Server) -> None:
    url = dl_server.url("Chest%20X%2Bray.tar.gz") + "?token=1"
    assert default_filename(url) == "Chest X+ray.tar.gz"
    _, records = _run(tmp_path, _cfg({"url": url}))
    assert records[0]["path"] == display_path(tmp_path / "raw" / "Chest X+ray.tar.gz")


def test_remote_name_that_is_not_an_archive_is_refused_before_fetching(tmp_path: Path,
                                                                      dl_server: Server) -> None:
    with pytest.raises(StepError, match=r"dataset.sources\[0\].url: 'file_downloaded' is not an archive"):
        _run(tmp_path, _cfg(dl_server.url("file_downloaded")))
    with pytest.raises(StepError, match=r"dataset.sources\[0\].filename: cannot derive"):
        _run(tmp_path, _cfg({"url": dl_server.url(), "filename": "../x.zip"}))
    assert dl_server.state.requests == []


def test_duplicate_filenames_are_refused(tmp_path: Path, dl_server: Server) -> None:
    with pytest.raises(StepError, match=r"also used by dataset.sources\[0\]"):
        _run(tmp_path, _cfg(dl_server.url(), dl_server.url()))


def test_file_url_is_read_and_verified(tmp_path: Path) -> None:
    src = tmp_path / "inbox" / "ChestXRay2017.zip"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    summary, records = _run(tmp_path, _cfg({"url": src.as_uri(), "sha256": DIGEST}))
    assert (tmp_path / "raw" / "ChestXRay2017.zip").read_bytes() == PAYLOAD
    assert records[0]["sha256"] == DIGEST and summary["downloaded"] == 1


def test_missing_file_url_fails_without_retrying(tmp_path: Path) -> None:
    url = (tmp_path / "nope.zip").as_uri()
    with pytest.raises(StepError, match=r"could not fetch .*nope\.zip \(1 attempt\)"):
        _run(tmp_path, _cfg(url, retries=3))


# --------------------------------------------------------------------------------------------- local


def test_local_archive_and_folder_are_used_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    inbox = Path("inbox")
    (inbox / "xrays" / "NORMAL").mkdir(parents=True)
    (inbox / "A.ZIP").write_bytes(PAYLOAD)
    before = os.stat(inbox / "A.ZIP")
    with caplog.at_level(logging.WARNING, logger="medflow.data.fetch"):
        summary, records = _run(tmp_path, _cfg("inbox/A.ZIP", {"url": str(tmp_path / "inbox" / "xrays")}))
    assert records == [
        {"index": 0, "url": "inbox/A.ZIP", "path": "inbox/A.ZIP", "kind": "archive", "sha256": DIGEST,
         "bytes": len(PAYLOAD), "digest": None},
        {"index": 1, "url": "inbox/xrays", "path": "inbox/xrays",  # project-relative, though written absolute
         "kind": "folder", "sha256": None, "bytes": None, "digest": listing_digest([])},  # an empty folder
    ]
    assert summary == {"sources": 2, "archives": 1, "folders": 1, "downloaded": 0, "unpinned": [0]}
    assert not any((tmp_path / "raw").iterdir())  # nothing copied
    assert os.stat(inbox / "A.ZIP").st_mtime_ns == before.st_mtime_ns
    assert any(DIGEST in r.getMessage() for r in caplog.records)


def test_local_archive_checksum_is_verified(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    archive.write_bytes(PAYLOAD)
    _run(tmp_path, _cfg({"url": str(archive), "sha256": DIGEST}))
    with pytest.raises(StepError, match=f"checksum mismatch for {archive}: expected sha256 {'a' * 64}"):
        _run(tmp_path, _cfg({"url": str(archive), "sha256": "A" * 64}))


def test_missing_local_path_names_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "inbox" / "ChestXRay2017.zip"
    pattern = rf"dataset.sources\[1\].url: {re.escape(str(missing))} does not exist"
    with pytest.raises(StepError, match=pattern):
        _run(tmp_path, _cfg(str(tmp_path), str(missing)))


def test_local_file_that_is_not_an_archive_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    with pytest.raises(StepError, match=r"dataset.sources\[0\].url: .*notes.txt is neither a folder nor"):
        _run(tmp_path, _cfg(str(notes)))


def test_pinned_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StepError, match=r"dataset.sources\[0\].sha256: .* is a folder"):
        _run(tmp_path, _cfg({"url": str(tmp_path), "sha256": DIGEST}))


@pytest.mark.parametrize(("name", "suffix"), [("a.zip", ".zip"), ("B.TAR.GZ", ".tar.gz"), ("c.tgz", ".tgz"),
                                              ("d.tar", ".tar"), ("e.gz", None), ("f.rar", None)])
def test_archive_suffix(name: str, suffix: str | None) -> None:
    assert archive_suffix(name) == suffix


def test_inbox_entries_become_sources(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "landed" / "A").mkdir(parents=True)
    (inbox / ".gitkeep").touch()
    (inbox / ".DS_Store").touch()
    (inbox / "notes.txt").write_text("ignored")
    with zipfile.ZipFile(inbox / "more.zip", "w") as zf:
        zf.writestr("A/x.png", b"not really")
    cfg = parse_config({"dataset": {"name": "t", "labels": {"A": 0, "B": 1}}})
    summary = download.run(cfg, out_dir=tmp_path / "raw", sources_json=tmp_path / "s.json", inbox=inbox)
    records = json.loads((tmp_path / "s.json").read_text())
    assert summary["archives"] == 1 and summary["folders"] == 1
    assert [Path(r["path"]).name for r in records] == ["landed", "more.zip"]
    assert (tmp_path / "raw").is_dir()  # the DVC output exists even when nothing was downloaded


def test_no_sources_at_all_is_an_error(tmp_path: Path) -> None:
    cfg = parse_config({"dataset": {"name": "t", "labels": {"A": 0, "B": 1}}})
    with pytest.raises(StepError, match="no sources"):
        download.run(cfg, out_dir=tmp_path / "raw", sources_json=tmp_path / "s.json", inbox=tmp_path / "inbox")


# --------------------------------------------------------------------------------------------- https only


def test_plain_http_is_refused_unless_the_source_says_insecure(tmp_path: Path, dl_server: Server) -> None:
    with pytest.raises(StepError, match=r"dataset.sources\[0\].url: http://127.0.0.1:\d+/files/ChestXRay2017.zip: "
                       r"plain http:// is not encrypted .*dataset.sources\[0\].insecure: true"):
        _run(tmp_path, _cfg({"url": dl_server.url(), "sha256": DIGEST}, insecure=False))
    with pytest.raises(FetchError, match="plain http:// is not encrypted"):
        fetch(dl_server.url(), tmp_path / "a.zip")
    assert dl_server.state.requests == [] and not (tmp_path / "sources.json").exists()
    _, records = _run(tmp_path, _cfg({"url": dl_server.url(), "sha256": DIGEST, "insecure": True}, insecure=False))
    assert records[0]["sha256"] == DIGEST


def test_https_with_a_ca_named_in_requests_ca_bundle(tmp_path: Path, trusted: Server) -> None:
    summary, records = _run(tmp_path, _cfg({"url": trusted.url(), "sha256": DIGEST}, insecure=False))
    assert records[0]["url"] == trusted.url() and summary["downloaded"] == 1
    assert (tmp_path / "raw" / "ChestXRay2017.zip").read_bytes() == PAYLOAD


def test_https_to_http_redirect_is_refused(tmp_path: Path, trusted: Server, dl_server: Server) -> None:
    trusted.state.redirect_to = dl_server.url()
    src = {"url": trusted.url("a.zip"), "sha256": DIGEST}
    with pytest.raises(StepError, match=rf"could not fetch {re.escape(trusted.url('a.zip'))} .*redirected to "
                       rf"{re.escape(dl_server.url())}, which is not https; refusing the downgrade"):
        _run(tmp_path, _cfg(src, insecure=False))
    assert dl_server.state.requests == [], "the http server was contacted"
    _, records = _run(tmp_path, _cfg({**src, "insecure": True}))
    assert records[0]["sha256"] == DIGEST and len(dl_server.state.requests) == 1


def test_https_to_https_redirect_is_followed(tmp_path: Path, trusted: Server) -> None:
    trusted.state.redirect_to = trusted.url("elsewhere.zip")
    _, records = _run(tmp_path, _cfg({"url": trusted.url(), "sha256": DIGEST}, insecure=False))
    assert records[0]["sha256"] == DIGEST
    assert [r["path"] for r in trusted.state.requests] == ["/files/ChestXRay2017.zip", "/files/elsewhere.zip"]


def test_signed_url_is_used_but_redacted_everywhere(tmp_path: Path, trusted: Server,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    secret = "X-Amz-Signature=SECRET0123&X-Amz-Credential=AKIAEXAMPLE"
    url = f"{trusted.url()}?{secret}"
    caplog.set_level(logging.INFO)
    summary, records = _run(tmp_path, _cfg({"url": url}))  # unpinned: the warning names the source too
    assert trusted.state.requests[0]["path"].endswith(secret), "the download must use the real URL"
    assert records[0]["url"] == f"{trusted.url()}?<redacted>"
    assert "SECRET0123" not in (tmp_path / "sources.json").read_text()
    assert "SECRET0123" not in caplog.text and "<redacted>" in caplog.text
    trusted.state.fail_first, trusted.state.fail_status = 99, 404
    with pytest.raises(StepError) as e:
        _run(tmp_path / "again", _cfg({"url": url}))
    assert "HTTP 404" in str(e.value) and "SECRET0123" not in str(e.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("https://h.example/a.zip", "https://h.example/a.zip"),
    ("https://h.example/a.zip?sig=1&exp=2", "https://h.example/a.zip?<redacted>"),
    ("https://user:pw@h.example:8443/a.zip#frag", "https://<redacted>@h.example:8443/a.zip#<redacted>"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown

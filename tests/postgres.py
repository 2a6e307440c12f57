"""A throw-away PostgreSQL server for tests: Debian's binaries, a fresh cluster in a temporary folder, listening
on a free loopback port only, password auth (scram) over TCP. Stopped and removed on close, also on failure."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from medflow import procs

DEBIAN_BIN = Path("/usr/lib/postgresql")  # /usr/lib/postgresql/<major>/bin: Debian keeps them off PATH


def pg_bin() -> Path | None:
    """The folder holding initdb and postgres: Debian's newest version, else the ones on PATH."""
    found = sorted(DEBIAN_BIN.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """``initdb`` + ``postgres`` as an unprivileged user (PostgreSQL refuses root: as root, the ``postgres`` user,
    else ``nobody``), database ``prefect`` owned by user ``medflow`` with a random password."""

    def __init__(self, log: Path, timeout_s: float = 120) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL's initdb not found (Debian: apt-get install postgresql)")
        self.port, self.user, self.database = _free_port(), "medflow", "prefect"
        self.password = os.urandom(12).hex()
        self.dir = Path(tempfile.mkdtemp(prefix="medflow-pg-"))  # not under pytest's root-only tmp folder
        self.proc: subprocess.Popen[bytes] | None = None
        as_user: list[str] = []
        if os.getuid() == 0:
            name = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(name)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            as_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--"]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        self.bin, self.as_user, self.env = bindir, as_user, env
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.getuid() == 0:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        try:
            subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(self.dir / "data"), "-U", self.user,
                            f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                            "--no-sync", "--no-instructions"], env=env, check=True, capture_output=True,
                           timeout=timeout_s)
            pwfile.unlink()
            self.proc = procs.start([*as_user, str(bindir / "postgres"), "-D", str(self.dir / "data"),
                                     "-p", str(self.port), "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
                                     "-c", "fsync=off", "-c", "full_page_writes=off"], self.dir, env, log)
            self._wait(bindir, as_user, env, log, timeout_s)
            subprocess.run([*as_user, str(bindir / "createdb"), "-h", str(self.dir), "-p", str(self.port),
                            "-U", self.user, self.database], env=env, check=True, capture_output=True,
                           timeout=timeout_s)
        except BaseException:
            self.close()
            raise

    def query(self, sql: str) -> str:
        """``psql``'s unaligned answer to ``sql`` in the database (over the cluster's socket)."""
        out = subprocess.run([*self.as_user, str(self.bin / "psql"), "-h", str(self.dir), "-p", str(self.port),
                              "-U", self.user, "-d", self.database, "-tAc", sql], env=self.env, check=True,
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def _wait(self, bindir: Path, as_user: list[str], env: dict[str, str], log: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ready = [*as_user, str(bindir / "pg_isready"), "-q", "-h", str(self.dir), "-p", str(self.port), "-U", self.user]
        while subprocess.run(ready, env=env, timeout=timeout_s).returncode != 0:
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        """The server's SQLAlchemy URL for Prefect, without the password (that goes through a file)."""
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def close(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, sig=signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

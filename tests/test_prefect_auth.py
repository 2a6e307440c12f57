"""Issue 18 item 2: who can make the Prefect API run what.

- A served deployment is pinned to its checkout: a run asking for another ``project_dir`` is refused before
  anything of that folder is read or run (the flow functions in-process; no server).
- ``medflow server`` refuses a non-loopback ``--host`` without an auth string, and limits CORS to the UI; its
  ``--database-url`` takes no password (``--database-password-file`` does).
- The real server with an auth string file (401 without it, the UI asks for it, another site's preflight
  refused, the secret on no command line or log) is checked in tests/test_prefect_server.py, whose one
  server, runner and watcher all run with it.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, copy_shipped

from flows.common import SERVED_PROJECT_ENV, project_root
from medflow.cli import CORS_ENV, DATABASE_URL_ENV, prepare_database, prepare_server
from medflow.errors import ConfigError, StepError

BIN = Path(sys.executable).parent
SECRET = f"medflow:{secrets.token_urlsafe(18)}"
EVIL = "https://evil.example"
AUTH_ENV = ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "MEDFLOW_AUTH_STRING_FILE",
            "PREFECT_API_KEY")


def _hostile_project(dest: Path) -> Path:
    """A checkout-shaped folder (params, catalog, DVC) whose dvc.yaml writes a marker: ``id > pwned``."""
    copy_shipped(dest)
    (dest / "dvc.yaml").write_text("stages:\n  download:\n    foreach: ${datasets}\n    do:\n"
                                   "      cmd: id > pwned\n")
    (dest / ".dvc").mkdir()
    (dest / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")  # what `dvc init --no-scm` writes
    return dest


def _auth_file(folder: Path, text: str = SECRET + "\n") -> Path:
    path = folder / "auth"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_a_served_deployment_refuses_a_foreign_project_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.retrain import retrain_flow
    from flows.train import train_flow

    foreign = _hostile_project(tmp_path / "foreign")
    monkeypatch.setenv(SERVED_PROJECT_ENV, str(ROOT))  # as `medflow serve` in this checkout sets it
    for flow in (train_flow, retrain_flow):
        with pytest.raises(ConfigError, match=rf"project_dir '.*foreign' refused: this deployment is pinned to "
                                              rf"the checkout `medflow serve` serves \({re.escape(ROOT.name)}/\)"
                           ) as refused:
            flow.fn(dataset="pneumonia", project_dir=str(foreign))  # the flow body, before any Prefect call
        assert str(ROOT) not in str(refused.value)  # the pinned checkout by its folder name only
    assert not (foreign / "pwned").exists()
    assert not (foreign / "dvc.lock").exists() and not (foreign / ".dvc" / "tmp" / "medflow").exists()
    # The served checkout itself: by default, and by its own path (as deployments made before the pin pass it).
    assert project_root(None) == ROOT.resolve() == project_root(str(ROOT))
    # Without the pin (in-process calls, tests) project_dir is honoured, and the folder is hostile indeed.
    monkeypatch.delenv(SERVED_PROJECT_ENV)
    assert project_root(str(foreign)) == foreign.resolve()
    subprocess.run([str(BIN / "dvc"), "repro", "-q"], cwd=foreign, check=True, capture_output=True)
    assert "uid=" in (foreign / "pwned").read_text()


def test_deployments_carry_no_project_dir() -> None:
    from flows.deploy import build_deployments

    deployments = build_deployments(ROOT)
    assert deployments
    for d in deployments:
        assert d.parameters == {"dataset": d.parameters["dataset"]}, d.name
        assert "project_dir" not in d._parameter_openapi_schema.properties, d.name
        assert all("project_dir" not in (t.parameters or {}) for t in d.triggers), d.name


def _clean_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """No auth, CORS or UI setting from the caller's environment; a fresh PREFECT_HOME; restored afterwards."""
    for name in (*AUTH_ENV, *CORS_ENV, "PREFECT_SERVER_UI_API_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.chdir(home.parent)  # no prefect.toml or .env of the working directory


def test_server_refuses_an_open_host_without_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch, tmp_path / "home")
    with pytest.raises(StepError, match=r"--host 0\.0\.0\.0 is not loopback: .* set an auth string first"):
        prepare_server("0.0.0.0", 4300, None)
    for bad in ("no-colon\n", ":password\n", "user:\n"):
        with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'auth'}: not an auth string")):
            prepare_server("0.0.0.0", 4300, _auth_file(tmp_path, bad))
    for bad in ("user:pw\nsecond:line\n", "\n"):
        with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'auth'}: the auth string file must hold one")):
            prepare_server("0.0.0.0", 4300, _auth_file(tmp_path, bad))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'absent'}: cannot read the auth string file")):
        prepare_server("127.0.0.1", 4300, tmp_path / "absent")
    prepare_server("0.0.0.0", 4300, _auth_file(tmp_path))  # allowed with auth (and warned about)
    assert os.environ["PREFECT_SERVER_API_AUTH_STRING"] == os.environ["PREFECT_API_AUTH_STRING"] == SECRET
    assert os.environ[CORS_ENV[0]] == "http://127.0.0.1:4300,http://localhost:4300"

    _clean_env(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", SECRET)  # Prefect's own setting counts too
    prepare_server("192.0.2.7", 4300, None)
    assert os.environ["PREFECT_SERVER_API_AUTH_STRING"] == SECRET
    assert os.environ[CORS_ENV[0]] == "http://192.0.2.7:4300"


def test_server_database_url_and_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``medflow server --database-url``: PostgreSQL through asyncpg, the password from a file into Prefect's own
    setting (environment only); a URL with a password in it (it would show in ``ps``) or another database refused."""
    from prefect.settings import Settings

    _clean_env(monkeypatch, tmp_path / "home")
    for name in (DATABASE_URL_ENV, "PREFECT_SERVER_DATABASE_PASSWORD", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)
    password = tmp_path / "db_password"
    password.write_text("s3cr#t/pw\n")
    password.chmod(0o600)
    prepare_database("postgresql://prefect@db.example:5433/prefect", password)
    url = Settings().server.database.connection_url
    assert url is not None and url.get_secret_value() == "postgresql+asyncpg://prefect:s3cr%23t%2Fpw@db.example:5433/prefect"
    with pytest.raises(ConfigError, match="the URL holds a password, which would show on the command line"):
        prepare_database("postgresql+asyncpg://prefect:pw@db.example/prefect", None)
    with pytest.raises(ConfigError, match="'mysql' is not a database Prefect supports"):
        prepare_database("mysql://prefect@db.example/prefect", None)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'absent'}: cannot read the database password")):
        prepare_database("postgresql://prefect@db.example/prefect", tmp_path / "absent")
    password.write_text("\n")
    with pytest.raises(ConfigError, match=re.escape(f"{password}: the database password file must hold one")):
        prepare_database("postgresql://prefect@db.example/prefect", password)

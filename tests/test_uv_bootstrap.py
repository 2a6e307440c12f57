"""scripts/uv, the stdlib-only bootstrap of the pinned uv: reuse of an installed uv of the range, the sha256
check and the unpacking of a wheel, the platform table, and (slow, where PyPI answers) a real fetch."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import shutil
import urllib.request
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT


def _load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("uv_bootstrap", str(ROOT / "scripts" / "uv"))
    spec = importlib.util.spec_from_loader("uv_bootstrap", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


boot = _load()


def _fake_uv(folder: Path, version: str) -> Path:
    """An executable that answers ``--version`` as uv VERSION would (a stand-in on PATH, nothing mocked)."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "uv"
    exe.write_text(f"#!/bin/sh\necho 'uv {version} (x86_64-unknown-linux-gnu)'\n")
    exe.chmod(0o755)
    return exe


def _wheel(path: Path, members: tuple[str, ...] = ("uv", "uvx")) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name in members:
            zf.writestr(f"uv-{boot.VERSION}.data/scripts/{name}", f"#!/bin/sh\necho 'uv {boot.VERSION} (wheel)'\n")
        zf.writestr("uv/__init__.py", "")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_installed_uv_in_the_range_is_reused_and_one_outside_it_is_not(tmp_path: Path) -> None:
    inside, outside = _fake_uv(tmp_path / "a", boot.VERSION), _fake_uv(tmp_path / "b", boot.MINOR_BOUND + ".0")
    assert boot.find_installed(path=str(inside.parent), local=tmp_path / "none") == str(inside)
    assert boot.find_installed(path=str(outside.parent), local=tmp_path / "none") is None
    assert boot.find_installed(path=str(_fake_uv(tmp_path / "c", "0.5.31").parent), local=tmp_path / "none") is None
    # the fetched one comes first; a stale fetched one (an older pin) gives way to PATH's
    assert boot.find_installed(path=str(outside.parent), local=inside.parent) == str(inside)
    assert boot.find_installed(path=str(inside.parent), local=tmp_path / "c") == str(inside)
    real = shutil.which("uv")
    if real and boot.acceptable(boot.version_of(real)):
        assert boot.find_installed(path=str(Path(real).parent), local=tmp_path / "none") == real


def test_a_wheel_is_used_only_with_the_pinned_sha256(tmp_path: Path) -> None:
    wheel = tmp_path / "uv.whl"
    digest = _wheel(wheel)
    dest = tmp_path / ".uv" / "bin"
    with pytest.raises(boot.BootstrapError, match=r"uv\.whl: sha256 [0-9a-f]{64}, expected the pinned 0+; not used"):
        boot.install_wheel(wheel, "0" * 64, dest)
    assert not dest.exists()
    exe = boot.install_wheel(wheel, digest, dest)
    assert exe == dest / "uv" and (dest / "uvx").is_file()
    assert boot.version_of(str(exe)) == boot._version(boot.VERSION)  # unpacked executable, runs
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bin"]  # no staging folder left behind


def test_a_wheel_without_the_binaries_is_refused_by_name(tmp_path: Path) -> None:
    wheel = tmp_path / "odd.whl"
    digest = _wheel(wheel, members=("uv",))
    with pytest.raises(boot.BootstrapError, match=rf"odd\.whl has no uv-{boot.VERSION}\.data/scripts/uvx"):
        boot.install_wheel(wheel, digest, tmp_path / "bin")


def test_the_platform_table() -> None:
    assert "manylinux_2_17_x86_64" in boot.wheel_for("x86_64", "glibc")[0]
    assert "musllinux_1_1_x86_64" in boot.wheel_for("AMD64", "musl")[0]
    assert "aarch64" in boot.wheel_for("arm64", "glibc")[0]
    with pytest.raises(boot.BootstrapError, match="no pinned uv wheel for .* riscv64 .*install uv"):
        boot.wheel_for("riscv64", "glibc")


def test_only_https_is_fetched() -> None:
    with pytest.raises(boot.BootstrapError, match="refusing a non-https URL: http://pypi.org/pypi/uv/json"):
        boot._get("http://pypi.org/pypi/uv/json")


def _pypi_answers() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/uv/", timeout=10):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_a_real_fetch_from_pypi(tmp_path: Path) -> None:
    if not _pypi_answers():
        pytest.skip("PyPI does not answer here")
    exe = boot.fetch(tmp_path / "bin")
    assert boot.version_of(str(exe)) == boot._version(boot.VERSION)
    assert (tmp_path / "bin" / "uvx").stat().st_mode & 0o111

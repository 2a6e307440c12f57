"""`dvc plots show` renders offline: the repo's .dvc/config points DVC at plots/offline.html (vega inlined)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DVC = Path(sys.executable).parent / "dvc"
# A script, link, image or frame that loads from elsewhere: http(s) or protocol-relative.
REMOTE = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)
LIBRARIES = ("vega 5.33.1", "vega-lite 5.23.0", "vega-embed 6.29.0")  # scripts/plots_template.py's pins


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project with this repo's .dvc/config and template, and DVCLive per-epoch plots as train's."""
    if not DVC.exists():
        pytest.skip("dvc is not installed")
    live_mod = pytest.importorskip("dvclive")
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=root, check=True)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    (root / "plots").mkdir()
    shutil.copy(ROOT / "plots" / "offline.html", root / "plots" / "offline.html")
    live = live_mod.Live(dir=str(root / "live"), save_dvc_exp=False, dvcyaml=None, report=None)
    for epoch, (loss, val_loss) in enumerate([(0.9, 0.8), (0.6, 0.7), (0.4, 0.75)]):
        live.log_metric("train/loss", loss)
        live.log_metric("val/loss", val_loss)
        live.step = epoch
        live.next_step()
    live.end()
    (root / "dvc.yaml").write_text("plots:\n  - live/plots/metrics:\n      x: step\n")
    return root


def _show(project: Path) -> str:
    """``dvc plots show`` with no options, as the README says to run it; the page it writes."""
    run = subprocess.run([str(DVC), "plots", "show"], cwd=project, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return (project / "dvc_plots" / "index.html").read_text(encoding="utf-8")


def test_the_repo_config_names_the_offline_template() -> None:
    config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"^\[plots\]\s*\n\s*html_template\s*=\s*\.\./plots/offline\.html\s*$", config, re.M)
    template = (ROOT / "plots" / "offline.html").read_text(encoding="utf-8")
    assert "{plot_divs}" in template and "{scripts}" not in template  # DVC's CDN tags go into {scripts}
    assert template.count("Redistribution and use in source and binary forms") == 2  # vega-lite's, vega-embed's
    assert all(f"/*! {lib} " in template for lib in LIBRARIES)  # each library's licence comment, above its code


def test_dvc_plots_show_inlines_vega_and_loads_nothing_remote(project: Path) -> None:
    page = _show(project)
    assert not REMOTE.findall(page), REMOTE.findall(page)
    assert "cdn.jsdelivr.net" not in page
    for define in (".vega={}", ".vegaLite={}", "vegaEmbed"):  # the UMD builds define these globals
        assert define in page, define
    assert "vegaEmbed('#" in page and "val/loss" in page  # DVC's plot divs, with the logged metric


def test_the_plots_render_with_the_network_off(project: Path, tmp_path: Path) -> None:
    """Headless Chromium, every request sent to a dead proxy: vega still draws the plots (a canvas each)."""
    browser = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                    if (found := shutil.which(name))), None)
    if browser is None:
        pytest.skip("chromium is not installed")
    _show(project)
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--proxy-server=127.0.0.1:9", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=20000", "--dump-dom",
                          (project / "dvc_plots" / "index.html").as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<canvas") >= 1, "vega drew no plot: the inlined libraries did not run"

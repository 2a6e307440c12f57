"""Data that lands is always seen (issues 12, 19 item 7, 20).

A file added to, changed in or removed from a folder of the inbox, a folder symlinked into it or a folder that
``dataset.sources`` lists re-runs download -> extract -> manifest under a plain ``dvc repro`` (real DVC, real
NIH malaria cells), and the retrain fingerprint and ``medflow watch`` see the same change. Going back to an
earlier state lets DVC's run cache restore that state's manifest, which then matches the files again. The walk
is one function (:mod:`medflow.data.walk`): hidden files and hidden folders are skipped alike and counted, a
symlinked folder is followed and a link loop is reported, not followed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, git_commit_all, shared_dataset

from medflow.config import Source, load_config
from medflow.data.fetch import resolve_local
from medflow.data.manifest import iter_images
from medflow.data.walk import WalkReport, folder_listing
from medflow.io import read_csv, sha256_file
from medflow.lifecycle.retrain import source_fingerprint
from medflow.lifecycle.watch import InboxWatcher

STAGES = ["download@malaria", "extract@malaria", "manifest@malaria"]


# ------------------------------------------------------------------------------------------------- the walk
def test_walk_skips_hidden_entries_alike_follows_links_and_reports_loops(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    root, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    for rel in ("POS/a.png", "POS/.b.png", ".hidden/POS/c.png", "POS/._d.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (elsewhere / "NEG").mkdir(parents=True)
    (elsewhere / "NEG/e.png").write_bytes(b"y")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "NEG/up").symlink_to(elsewhere, target_is_directory=True)  # a loop through the link
    (root / "POS/self").symlink_to(".", target_is_directory=True)  # a loop in place
    report = WalkReport()
    listing = folder_listing(root, report)
    assert [rel for rel, _, _ in listing] == ["POS/a.png", "linked/NEG/e.png"]
    assert sorted(report.hidden) == [".hidden", "POS/._d.png", "POS/.b.png"]
    assert sorted(report.loops) == ["POS/self", "linked/NEG/up"]
    with caplog.at_level(logging.INFO, logger="medflow.data.walk"):
        images = [p.relative_to(root).as_posix() for p in iter_images(root)]
    assert images == ["POS/a.png", "linked/NEG/e.png"]  # the manifest's walk is the listing's walk
    assert "skipped 3 hidden" in caplog.text
    assert "POS/self leads back" in caplog.text and "linked/NEG/up leads back" in caplog.text


@pytest.mark.parametrize("where", ["plain", "linked", "source"])
def test_each_single_change_changes_the_record_and_the_fingerprint(tmp_path: Path, where: str,
                                                                  shipped_params: Path) -> None:
    """A file added, changed or removed (alone) in an inbox folder, a folder linked into the inbox or a
    folder of dataset.sources changes that folder's record in sources.json and the source fingerprint."""
    cfg = load_config(shipped_params, "malaria")
    inbox, folder = tmp_path / "inbox", tmp_path / "data"
    (folder / "POS").mkdir(parents=True)
    (folder / "POS/a.png").write_bytes(b"a")
    (folder / "POS/b.png").write_bytes(b"b")
    inbox.mkdir()
    if where == "plain":
        folder.rename(inbox / "data")
        folder = inbox / "data"
    elif where == "linked":
        (inbox / "data").symlink_to(folder, target_is_directory=True)
    else:
        cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"sources": [Source(url=str(folder))]})})
    record = inbox / "data" if where != "source" else folder
    seen = [(resolve_local(0, Source(url=str(record)))["digest"], source_fingerprint(cfg, inbox))]
    watcher = InboxWatcher(cfg, inbox, tmp_path / "models")
    watcher.check(settle=False)
    for step in ("add", "change", "remove"):
        if step == "add":
            (folder / "POS/c.png").write_bytes(b"c")
        elif step == "change":
            (folder / "POS/a.png").write_bytes(b"aa")
        else:
            (folder / "POS/b.png").unlink()
        seen.append((resolve_local(0, Source(url=str(record)))["digest"], source_fingerprint(cfg, inbox)))
        assert watcher.check(settle=False) is not None, where
    assert len({d for d, _ in seen}) == len({f for _, f in seen}) == 4, seen


# ---------------------------------------------------------------------------------------- real DVC project
def _project(dest: Path, external: Path) -> Path:
    """A git + DVC checkout of the pipeline whose malaria dataset reads its inbox and the folder ``external``."""
    copy_project(dest)
    entry = dest / "datasets/malaria.yaml"
    data = yaml.safe_load(entry.read_text())
    data["dataset"]["sources"] = [{"url": str(external)}]
    entry.write_text(yaml.safe_dump(data, sort_keys=False))
    git_commit_all(dest)
    return dest


def _dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _repro(project: Path) -> tuple[dict[str, str], str]:
    """A plain repro of the three data stages; returns manifest file name -> sha256, and DVC's output."""
    out = _dvc(project, "repro", "--single-item", *STAGES)
    rows = read_csv(project / "data/interim/malaria/manifest")
    return dict(zip(rows["relpath"].map(lambda p: Path(p).name), rows["sha256"], strict=True)), out


def _files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.rglob("*.png")}


def _put(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.mark.integration
def test_added_changed_removed_files_rerun_the_data_stages_and_a_retrain(tmp_path: Path) -> None:
    cells = sorted(shared_dataset("malaria_cells").glob("Parasitized/*.png"))[:12]
    external, linked = tmp_path / "external", tmp_path / "linked_target"
    project = _project(tmp_path / "project", external)
    inbox = project / "data/inbox/malaria"
    plain = inbox / "batch"
    folders = (plain, linked, external)  # in the inbox, symlinked into it, listed in dataset.sources
    for n, folder in enumerate(folders):
        (folder / "Parasitized").mkdir(parents=True)
        for p in cells[3 * n:3 * n + 2]:
            shutil.copy(p, folder / "Parasitized" / p.name)
    (inbox / "linked").symlink_to(linked, target_is_directory=True)  # the README's `ln -s` recipe

    def on_disk() -> dict[str, str]:
        return {k: v for folder in folders for k, v in _files(folder).items()}

    cfg = load_config(project / "params.yaml", "malaria")
    watcher = InboxWatcher(cfg, inbox, project / "models/malaria")
    prints = [source_fingerprint(cfg, inbox)]
    assert watcher.check(settle=False) is not None  # never ingested: the first data is news
    manifest, _ = _repro(project)
    assert manifest == on_disk() and len(manifest) == 6

    # 1. in each folder: one file added, one changed, one removed; all in one repro
    kept: dict[Path, tuple[bytes, int]] = {}
    for n, folder in enumerate(folders):
        changed, removed = (folder / "Parasitized" / cells[3 * n + k].name for k in (0, 1))
        kept |= {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (changed, removed)}
        shutil.copy(cells[3 * n + 2], folder / "Parasitized")  # added
        changed.write_bytes(cells[9 + n].read_bytes())
        removed.unlink()
    prints.append(source_fingerprint(cfg, inbox))
    assert watcher.check(settle=False) is not None
    manifest, out = _repro(project)
    assert "Running stage 'manifest@malaria'" in out
    assert manifest == on_disk() and len(manifest) == 6
    for n in range(3):
        assert cells[3 * n + 2].name in manifest and cells[3 * n + 1].name not in manifest
        assert manifest[cells[3 * n].name] == sha256_file(cells[9 + n])

    # 2. back to the first state, byte for byte and mtime for mtime: DVC's run cache may restore that state's
    # manifest, which lists exactly the files there again (issue 19 item 7: a plain re-run repairs the state)
    for n, folder in enumerate(folders):
        (folder / "Parasitized" / cells[3 * n + 2].name).unlink()
    for p, (data, mtime) in kept.items():
        _put(p, data, mtime)
    prints.append(source_fingerprint(cfg, inbox))
    assert watcher.check(settle=False) is not None
    manifest, out = _repro(project)
    assert manifest == on_disk() and len(manifest) == 6
    assert prints[2] == prints[0] != prints[1]  # the fingerprint is the content, nothing else

    # Unchanged now: only download is listed (it runs on every repro; an unchanged listing rewrites the same
    # sources.json, so nothing downstream runs: step 2 found the first state's records)
    status = json.loads(_dvc(project, "status", "--json", *STAGES))
    assert status == {"download@malaria": ["always changed"]}, status

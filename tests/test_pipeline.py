"""End to end: `dvc repro` on the real Kermany images, served as a zip from a loopback HTTP server.

Then new files land in the dataset's inbox (a truncated copy, an exact duplicate, a re-encoded near
duplicate and two new images): they are quarantined, grouped and, with everything else cached, only they
are decoded. All four datasets of the catalog, each on a small slice of its shared folder, run through `dvc repro`
in one checkout, each into its own outputs. After every run `git status` shows nothing but dvc.lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml
from conftest import copy_project, git_commit_all, output_bytes, shared_dataset, small_run_catalog

from medflow.config import load_config
from medflow.io import read_csv, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = ["download", "extract", "manifest", "filter", "resize", "split", "validate", "train", "evaluate"]



def _make_project(dest: Path) -> Path:
    """A fresh git + DVC checkout of the pipeline files (dvc.yaml hashes this checkout's medflow/ and tasks/)."""
    copy_project(dest)
    git_commit_all(dest)
    return dest


def _git_changes(project: Path) -> list[str]:
    """What `git status` reports besides dvc.lock (the run's record, committed with the code by the user):
    every derived file must be a DVC output or git-ignored, so this is empty after a run."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line[3:] != "dvc.lock"]


def _edit_yaml(path: Path, edit: Any) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=1200)


def _zip_folder(src: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                zf.write(path, Path("chest_xray") / "train" / path.relative_to(src))


def _set_source(project: Path, url: str, sha256: str) -> None:
    _edit_yaml(project / "datasets/pneumonia.yaml",
               lambda entry: entry["dataset"].update(sources=[{"url": url, "sha256": sha256,
                                                               "insecure": url.startswith("http://")}]))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_repro_then_new_data_lands(tmp_path: Path, file_server: tuple[str, Path]) -> None:
    src = shared_dataset("chest_xray")
    base_url, served = file_server
    archive = served / "chest_xray.zip"
    _zip_folder(src, archive)
    archive_sha = sha256_file(archive)
    project = _make_project(tmp_path / "project")
    _set_source(project, f"{base_url}/chest_xray.zip", archive_sha)

    git_commit_all(project)  # the source is part of the checkout
    run = _dvc(project, "repro", "validate@pneumonia")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert _git_changes(project) == []

    interim, processed = project / "data/interim/pneumonia", project / "data/processed/pneumonia"
    filt = _json(interim / "filter.json")
    # The shared Kermany train set holds no corrupt file but two byte-identical pairs
    # (person1430_bacteria_3695/3696, person1619_bacteria_4267/4268): each kept once.
    assert filt["in"] == 1566 and filt["rejected"] == 2 and filt["clean"] == 1564
    assert filt["by_reason"]["duplicate"] == 2
    split = read_csv(processed / "split")
    assert len(split) == 1564
    assert (split.groupby("group")["split"].nunique() == 1).all(), "a patient is in two splits"
    assert (split.groupby("dup_group")["split"].nunique() == 1).all()
    assert set(split["split"]) == {"train", "val", "test"}
    size = load_config(project / "params.yaml", "pneumonia").resize.size  # the shipped default
    assert _json(processed / "resize.json")["shape"] == [1564, size, size, 1]
    assert _json(processed / "resize.json")["rejected"] == 0 and read_csv(processed / "resize_rejects.csv").empty
    assert sha256_file(archive) == archive_sha  # the source archive is untouched
    status = _dvc(project, "status", "validate@pneumonia")
    assert "up to date" in status.stdout, status.stdout

    extracted = next(p for p in (project / "data/raw/pneumonia/extracted").rglob("*.jpeg"))
    extracted_inode = extracted.stat().st_ino
    tables = {interim / "manifest", interim / "clean", processed / "split"}
    parts_before = {table: output_bytes(table) for table in tables}
    assert all(len(parts) == 1 for parts in parts_before.values())  # one source root, one part

    # New data lands in the inbox: a truncated copy, an exact duplicate, a re-encoded near duplicate.
    first = src / "PNEUMONIA" / sorted(os.listdir(src / "PNEUMONIA"))[0]
    landed = project / "data/inbox/pneumonia/landed/PNEUMONIA"
    landed.mkdir(parents=True)
    data = first.read_bytes()
    (landed / "person90001_bacteria_1.jpeg").write_bytes(data[: len(data) * 6 // 10])
    (landed / "person90002_bacteria_1.jpeg").write_bytes(data)
    cv2.imwrite(str(landed / "person90003_bacteria_1.jpeg"), cv2.imread(str(first)),
                [cv2.IMWRITE_JPEG_QUALITY, 70])
    normal = sorted((src / "NORMAL").iterdir())
    shutil.copy(normal[0], landed.parent / "tmp.jpeg")  # outside a class folder: skipped
    (landed.parent / "NORMAL").mkdir()
    for i, path in enumerate(normal[:2]):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(landed.parent / "NORMAL" / f"NORMAL9-IM-900{i}-0001.jpeg"), cv2.flip(img, 0))

    run = _dvc(project, "repro", "validate@pneumonia")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert _git_changes(project) == []  # the landed files are inbox data (git-ignored)

    filt = _json(interim / "filter.json")
    assert filt["in"] == 1566 + 5
    # only the new contents were decoded (the exact duplicate's content was already known)
    assert filt["decoded"] == 4 and filt["cached"] == 1564
    rejects = read_csv(interim / "rejects.csv")
    reasons = {Path(p).name: r for p, r in zip(rejects["path"], rejects["reason"], strict=True)}
    assert reasons["person90001_bacteria_1.jpeg"] == "truncated"
    assert reasons["person90002_bacteria_1.jpeg"] == "duplicate"
    assert len(reasons) == 4
    resize = _json(processed / "resize.json")
    assert resize["decoded"] == 3 and resize["images"] == 1564 + 3
    split = read_csv(processed / "split")
    split["name"] = split["path"].map(lambda p: Path(p).name)
    near = split[split["name"].isin([first.name, "person90003_bacteria_1.jpeg"])]
    assert len(near) == 2 and near["dup_group"].nunique() == 1 and near["split"].nunique() == 1
    assert (split.groupby("group")["split"].nunique() == 1).all()
    validation = _json(project / "reports/pneumonia/validation.json")
    assert validation["success"] is True and validation["failed"] == [], validation["failed"]
    # the manifest, split and image suites, and one derived table per grouping (one split per group)
    suites = validation["suites"]
    assert set(suites) == {"manifest", "patients", "near_duplicates", "split_units", "splits", "images"}
    for name, suite in suites.items():
        stats = suite["statistics"]
        assert suite["success"] and stats["unsuccessful_expectations"] == 0, (name, stats)
        assert stats["evaluated_expectations"] == stats["successful_expectations"] >= 1, (name, stats)
    assert sum(s["statistics"]["evaluated_expectations"] for s in suites.values()) == 32
    _assert_shards_stored_once(project, "pneumonia")
    _assert_tables_grew_by_a_part(parts_before, project)
    # the archive's files are left as they are (a cached persistent output was copied by DVC before each run)
    assert extracted.stat().st_ino == extracted_inode


def _assert_shards_stored_once(project: Path, ds: str) -> None:
    """Each published shard is one inode with the store's shard and with its object in DVC's cache (hard links,
    `cache.type: hardlink,copy`): stored once, and DVC's state, keyed by inode, knows it when resize links the
    published folder again (with a copied cache object it re-hashed every shard on every increment)."""
    published = sorted((project / f"data/processed/{ds}/images/shards").iterdir())
    assert published
    for shard in published:
        md5 = hashlib.md5(shard.read_bytes()).hexdigest()
        cached = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
        store = project / f"data/interim/{ds}/cache/resize/shards" / shard.name
        assert shard.stat().st_ino == store.stat().st_ino == cached.stat().st_ino, shard.name


def _assert_tables_grew_by_a_part(before: dict[Path, dict[str, bytes]], project: Path) -> None:
    """The landed folder is a new source root: each table (a folder of one CSV part per root) gained a part and
    kept its earlier part byte for byte, so DVC's cache stored the new rows alone (its object is the old one)."""
    for table, parts in before.items():
        after = output_bytes(table)
        assert len(after) == len(parts) + 1, (table, sorted(after))
        for old in parts.values():
            assert old in after.values(), f"{table}: an earlier part changed"
            md5 = hashlib.md5(old).hexdigest()
            assert (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).is_file(), table


SMALL_RUN = {"resize": {"size": 64}, "validate": {"split_tolerance": 0.2, "class_ratio_tolerance": 0.25},
             "train": {"epochs": 2, "batch_size": 16}}


def _small_project(tmp_path: Path) -> Path:
    """A checkout whose datasets read their inbox only, with small-run shared params."""
    project = _make_project(tmp_path / "project")
    for entry in (project / "datasets").glob("*.yaml"):
        _edit_yaml(entry, lambda e: e["dataset"].update(sources=[]))
    _edit_yaml(project / "params.yaml", lambda p: [p[k].update(v) for k, v in SMALL_RUN.items()])
    small_run_catalog(project / "datasets", SMALL_RUN)
    git_commit_all(project)
    return project


def _copy_images(src: Path, dest: Path, counts: dict[str, int | None]) -> None:
    """Copy the first ``n`` files (sorted by name) of each class folder; ``None`` copies the whole folder."""
    for cls, n in counts.items():
        (dest / cls).mkdir(parents=True)
        for path in sorted((src / cls).iterdir())[:n]:
            shutil.copy(path, dest / cls / path.name)


# A small slice of each task's shared folder: (shared folder, images per class, image size here). COVID-CT is
# whole (203 images in 92 paper/patient groups: a slice would leave too few groups for a grouped split).
SLICES: dict[str, tuple[str, dict[str, int | None], int]] = {
    "pneumonia": ("chest_xray", {"NORMAL": 40, "PNEUMONIA": 80}, 64),
    "malaria": ("malaria_cells", {"Parasitized": 60, "Uninfected": 60}, 48),
    "melanoma": ("skin_lesions", {"melanoma": 40, "nevus": 40, "seborrheic_keratosis": 40}, 48),
    "covid_ct": ("covid_ct", {"CT_COVID": None, "CT_NonCOVID": None}, 48),
}
CHANNELS = {"pneumonia": 1, "malaria": 3, "melanoma": 3, "covid_ct": 1}


MARKER = "MARKER_home_x"


def _slice_folder(project: Path, home: Path, ds: str) -> Path:
    """Where a dataset's slice is copied: pneumonia and covid_ct into the inbox; malaria outside the project,
    linked into the inbox (the README recipe); melanoma outside, named by dataset.sources."""
    if ds == "melanoma":
        return home / "hospital" / "melanoma"
    if ds == "malaria":
        (project / "data/inbox/malaria").mkdir(parents=True, exist_ok=True)
        (project / "data/inbox/malaria/slice").symlink_to(home / "elsewhere" / "malaria")
        return home / "elsewhere" / "malaria"
    return project / f"data/inbox/{ds}/slice"


def _assert_no_marker(project: Path) -> None:
    """No file the run wrote (data/ but the inbox, reports/, models/, metrics, dvc.lock) names a folder above
    the project. dvc.lock's params keep what the user wrote in dataset.sources (an absolute path here)."""
    found = []
    for top in ("data", "reports", "models"):
        for dirpath, dirnames, filenames in os.walk(project / top):
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != project / "data/inbox"]
            found += [Path(dirpath, f) for f in filenames if MARKER.encode() in Path(dirpath, f).read_bytes()]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for params in stage.get("params", {}).values():
            params.pop("dataset.sources", None)
    assert MARKER in (project / "dvc.lock").read_text()  # the melanoma source, as written: the test can fail
    assert MARKER not in yaml.safe_dump(lock), "dvc.lock names the home folder outside dataset.sources"
    assert not found, [str(f.relative_to(project)) for f in found]


def test_every_catalog_dataset_through_evaluation_in_one_checkout(tmp_path: Path) -> None:
    """All four tasks of the catalog, each on a small slice of its real folder dropped into its inbox, through
    `dvc repro` in one checkout: each stage writes its own dataset's outputs, one dataset's run leaves the
    others alone, and afterwards every dataset has a model, report, metrics and plots, and status is clean."""
    folders = {ds: shared_dataset(folder) for ds, (folder, _, _) in SLICES.items()}
    home = tmp_path / MARKER  # stands for the user's home folder: no output may name it (issue 18)
    home.mkdir()
    project = _small_project(home)
    for ds, (_, counts, size) in SLICES.items():
        _copy_images(folders[ds], _slice_folder(project, home, ds), counts)
        _edit_yaml(project / f"datasets/{ds}.yaml", lambda e, s=size: e["resize"].update(size=s))
    outside = home / "hospital" / "melanoma"  # a folder source outside the project, written absolute
    _edit_yaml(project / "datasets/melanoma.yaml", lambda e: e["dataset"].update(sources=[{"url": str(outside)}]))
    git_commit_all(project)

    run = _dvc(project, "repro", "evaluate@malaria")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    locked = set(yaml.safe_load((project / "dvc.lock").read_text())["stages"])
    assert locked == {f"{s}@malaria" for s in STEPS}  # no other dataset's stages ran
    assert not (project / "data/processed/pneumonia").exists()
    run = _dvc(project, "repro")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert _git_changes(project) == []

    for ds, (_, counts, size) in SLICES.items():
        meta = _json(project / f"models/{ds}/metadata.json")
        assert meta["task"] == ds and meta["input_shape"] == [size, size, CHANNELS[ds]], (ds, meta["input_shape"])
        assert meta["epochs_run"] == 2 and (project / f"models/{ds}/model.keras").stat().st_size > 0
        split = read_csv(project / f"data/processed/{ds}/split")
        assert set(split["class_name"]) == set(counts), ds  # the source classes stay in the split
        assert (split.groupby("group")["split"].nunique() == 1).all(), f"{ds}: a patient is in two splits"
        assert set(split["split"]) == {"train", "val", "test"}, ds
        evaluation = project / f"reports/{ds}/evaluation"
        report = _json(evaluation / "metrics.json")
        assert report["n"] == int((split["split"] == "test").sum()) > 0, ds
        assert report["threshold"] == _json(project / f"models/{ds}/threshold.json")["threshold"]
        assert 0.0 <= report["test"]["roc_auc"]["value"] <= 1.0, ds
        assert "data:image/png;base64," in (evaluation / "report.html").read_text(), ds
        crossval = _json(project / f"reports/{ds}/crossval/metrics.json")  # on in covid_ct's catalog file only
        if ds == "covid_ct":
            assert crossval["folds"] == 5 and crossval["images"] == len(split), crossval
            assert len(read_csv(project / f"reports/{ds}/crossval/predictions.csv")) == len(split)
        else:
            assert crossval == {"folds": 0, "run": False}, ds
    malaria = read_csv(project / "data/processed/malaria/split")
    assert len(malaria) == 120 and malaria["group"].str.fullmatch(r"P\d+").all()  # NIH patients P<n>

    metrics = _dvc(project, "metrics", "show", "--json")
    assert metrics.returncode == 0, metrics.stderr[-2000:]
    for ds in SLICES:
        assert f"reports/{ds}/evaluation/metrics.json" in metrics.stdout, ds
    assert "roc_auc" in metrics.stdout and "threshold" in metrics.stdout
    plots = _dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr[-2000:]
    for name in ("roc.csv", "pr.csv", "calibration.csv", "predictions.csv",
                 "pneumonia, sensitivity and specificity"):
        assert name in plots.stdout, name
    assert _git_changes(project) == []  # dvc_plots/ and every report is ignored
    status = _dvc(project, "status", "--json")
    always = {f"download@{ds}": ["always changed"] for ds in SLICES}  # lists the inbox on every repro
    assert status.returncode == 0 and json.loads(status.stdout) == always, status.stdout
    _assert_no_marker(project)
    split = read_csv(project / "data/processed/melanoma/split")
    assert split["path"].str.startswith("@melanoma/").all() and set(split["root"]) == {"@melanoma"}
    assert read_csv(project / "data/processed/malaria/split")["path"].str.startswith(
        "data/inbox/malaria/slice/").all()  # through the link, not its target

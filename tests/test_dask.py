"""Filter and resize on a Dask cluster (medflow.imaging.cluster): a 2-worker LocalCluster decodes real images
into the same bytes as the local process pool; the address comes from compute.dask_address or
$DASK_SCHEDULER_ADDRESS; a scheduler that cannot be reached is an error naming it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import output_bytes, shared_dataset
from PIL import Image

from medflow.config import Config, ConfigError, load_config, parse_config
from medflow.errors import StepError
from medflow.imaging import cluster, parallel, quality
from medflow.io import sha256_file, write_csv
from medflow.schema import MANIFEST_COLUMNS
from tasks import filter as filter_step
from tasks import resize

# A few dozen real images: X-rays (JPEG, some at full resolution: 400-2900 px), CT slices (PNG/JPEG, L/RGB/RGBA),
# cells (PNG).
PICKS = {"chest_xray_fullres": 6, "chest_xray": 10, "covid_ct": 8, "malaria_cells": 8}
# resize.json keys that say how the run went, not what it made
TIMING = ("seconds", "images_per_s", "workers", "decoded_on")


def _cfg(address: str | None = None) -> Config:
    return parse_config({"dataset": {"name": "t", "sources": ["x"], "labels": {"A": 0, "B": 1}, "channels": 3},
                         "filter": {"workers": 2}, "resize": {"size": 64, "workers": 2},
                         "compute": {"dask_address": address}})


def _copy_images(dest: Path) -> list[Path]:
    """Copies of real images under ``dest/raw/<A|B>/``, plus a truncated copy of the first (a filter reject)."""
    files = []
    for name, n in PICKS.items():
        classes = sorted(p for p in shared_dataset(name).iterdir() if p.is_dir())
        for label, folder in zip("AB", classes, strict=False):
            for src in sorted(folder.iterdir())[: n // 2]:
                target = dest / "raw" / label / f"{name}-{src.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                files.append(Path(shutil.copyfile(src, target)))
    truncated = dest / "raw" / "A" / "truncated.jpeg"
    truncated.write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])
    return [*files, truncated]


def _manifest(files: list[Path], root: Path) -> pd.DataFrame:
    rows = []
    for f in files:
        with Image.open(f) as im:
            w, h, mode, fmt = im.width, im.height, im.mode, im.format
        rel = f.relative_to(root)  # project-relative, as the pipeline writes them: workers must not need the cwd
        rows.append({"path": str(rel), "relpath": str(rel), "root": "raw", "class_name": f.parent.name,
                     "label": int(f.parent.name == "B"), "group": f.stem, "source_split": None,
                     "sha256": sha256_file(f), "bytes": f.stat().st_size, "width": w, "height": h, "mode": mode,
                     "format": fmt})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _pipeline(out: Path, cfg: Config, manifest: Path, broken: Path | None = None) -> dict[str, Any]:
    """Filter then resize into ``out``; ``broken`` (a clean file) is overwritten between the two, as a file
    that changed after the filter read it (a resize reject). Returns both summaries."""
    paths = {"clean": out / "clean", "rejects": out / "rejects.csv", "summary": out / "filter.json"}
    summary = filter_step.run(cfg, manifest=manifest, cache=out / "cache" / "filter", **paths)
    if broken is not None:
        broken.write_bytes(b"not an image any more")
    stats = resize.run(cfg, clean=paths["clean"], out=out / "images", stats=out / "resize.json",
                       cache=out / "cache" / "resize", rejects=out / "resize_rejects.csv")
    return {"filter": summary, "resize": stats}


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """A 2-worker LocalCluster of processes (one thread each), owned (started and closed) by this module."""
    distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as local:
        yield local


@pytest.mark.integration
def test_local_cluster_outputs_are_byte_identical_to_the_local_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dask_cluster: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cluster.ADDRESS_ENV, raising=False)
    # the local pool, not the in-process shortcut, for a few dozen images
    monkeypatch.setattr(parallel, "POOL_MIN_IMAGES", 8)
    monkeypatch.setattr(quality, "_INLINE_MAX", 8)
    files = _copy_images(tmp_path)
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, _manifest(files, tmp_path))
    broken = files[-2]  # a cell PNG the filter passes; both resize runs then find it changed
    original = broken.read_bytes()

    def run(name: str, address: str | None) -> dict[str, Any]:
        broken.write_bytes(original)  # the filter reads it intact
        return _pipeline(Path(name), _cfg(address), manifest, broken)

    local = run("local", None)
    remote = run("dask", dask_cluster.scheduler_address)

    assert local["filter"]["clean"] == len(files) - 1 and local["resize"]["rejected"] == 1  # the fixture works
    assert local["resize"]["workers"] == 2
    # the tables, rejects, summary and the store (index.json and shards/): the same bytes
    for name in ("clean", "rejects.csv", "filter.json", "resize_rejects.csv"):
        assert output_bytes(tmp_path / "dask" / name) == output_bytes(tmp_path / "local" / name), name
    assert output_bytes(tmp_path / "dask" / "images") == output_bytes(tmp_path / "local" / "images")
    strip = {k: v for k, v in remote["resize"].items() if k not in TIMING}
    assert strip == {k: v for k, v in local["resize"].items() if k not in TIMING}
    assert (local["resize"]["decoded_on"], remote["resize"]["decoded_on"]) == ("local", "dask")
    # the cluster's worker processes ran the decoder, in project-relative folders
    assert {"inspect_files", "decode_remote"} <= set(dask_cluster.scheduler.task_prefixes)  # filter, resize
    # and the cluster-written store serves the local pool: nothing decoded again, the same store
    again = resize.run(_cfg(), clean=Path("dask/clean"), out=Path("again"), stats=Path("again.json"),
                       cache=Path("dask/cache/resize"), rejects=Path("again_rejects.csv"))
    assert (again["decoded"], again["cached"]) == (0, len(files) - 2)  # the changed file alone is tried again
    assert output_bytes(Path("again")) == output_bytes(tmp_path / "local" / "images")


def test_address_from_the_param_else_dasks_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cluster.ADDRESS_ENV, raising=False)
    assert cluster.scheduler_address(_cfg().compute.dask_address) is None
    monkeypatch.setenv(cluster.ADDRESS_ENV, "tcp://10.0.0.5:8786")
    assert cluster.scheduler_address(None) == "tcp://10.0.0.5:8786"
    assert cluster.scheduler_address(_cfg("tcp://sched:8786").compute.dask_address) == "tcp://sched:8786"
    with pytest.raises(Exception, match="dask_address"):
        _cfg("tcp://a b")


def test_a_dataset_may_override_compute_and_other_datasets_keep_the_default(shipped_params: Path) -> None:
    entry = shipped_params.parent / "datasets" / "malaria.yaml"
    data = yaml.safe_load(entry.read_text())
    entry.write_text(yaml.safe_dump({**data, "compute": {"dask_address": "tcp://cells:8786"}}, sort_keys=False))
    assert load_config(shipped_params, "malaria").compute.dask_address == "tcp://cells:8786"
    assert load_config(shipped_params, "pneumonia").compute.dask_address is None  # params.yaml's null
    entry.write_text(yaml.safe_dump({**data, "compute": {"dask_adress": "x"}}, sort_keys=False))
    with pytest.raises(ConfigError, match=r"malaria\.yaml: compute\.dask_adress: unknown key"):
        load_config(shipped_params, "malaria")


def test_unreachable_scheduler_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1.0)
    with pytest.raises(StepError, match=r"tcp://127\.0\.0\.1:9 .*cannot connect"), \
            cluster.connected("tcp://127.0.0.1:9"):
        pass

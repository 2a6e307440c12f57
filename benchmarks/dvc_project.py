"""Shared by the DVC benchmarks: a throw-away copy of the pipeline, and the best time of a command in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# What `dvc repro` reads: the pipeline, its params, the step code it hashes, DVC's config, the inbox folder.
FILES = ["dvc.yaml", "params.yaml", "datasets", ".dvcignore", ".gitignore", "tasks", "medflow", ".dvc/config",
         ".dvc/.gitignore", "data/inbox", "data/external"]
BIN = Path(sys.executable).parent  # this environment's `dvc` and `medflow`
DVC = str(BIN / "dvc")


def output_bytes(path: Path) -> dict[str, bytes]:
    """What a step wrote at ``path``: a file's bytes, or a folder's (a table's parts, an image store's index and
    shards) by relative path."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_pipeline(dest: Path, edit_params: Callable[[dict[str, Any]], None] = lambda _: None,
                  dataset: str = "pneumonia", root: Path = ROOT) -> None:
    """Copy the pipeline of ``root`` (default: this checkout) into ``dest`` (a new git repository) building
    ``dataset`` alone, from its inbox only (``sources: []``), with edited params."""
    for name in FILES:
        src, dst = root / name, dest / name
        if not src.exists() and name.startswith("data/"):
            continue  # an empty data folder is not in git (a worktree of another revision lacks it)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    catalog = dest / "datasets" / f"{dataset}.yaml"
    entry = yaml.safe_load(catalog.read_text())
    entry["dataset"]["sources"] = []  # the inbox only: nothing to download
    catalog.write_text(yaml.safe_dump(entry, sort_keys=False))
    for other in (dest / "datasets").glob("*.yaml"):
        if other.stem != dataset:
            other.unlink()
    params = yaml.safe_load((dest / "params.yaml").read_text())
    shipped = yaml.safe_load((dest / "params.yaml").read_text())
    params["datasets"] = [dataset]  # `dvc repro` builds this dataset only
    edit_params(params)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # an edited key that the catalog entry overrides takes the edited value there too (the entry would win)
    for section, values in entry.items():
        if section != "dataset" and isinstance(values, dict):
            for key in values:
                if params.get(section, {}).get(key) != shipped.get(section, {}).get(key):
                    values[key] = params[section][key]
    catalog.write_text(yaml.safe_dump(entry, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def best_time(cmd: list[str], cwd: Path, repeat: int, check: Callable[[str], None] = lambda _: None) -> float:
    """Best wall time of ``repeat`` runs of ``cmd`` (this environment's bin first on PATH); ``check`` sees stdout."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        check(out.stdout)
    return min(times)

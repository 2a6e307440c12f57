"""dvc.yaml itself: one templated stage per step over the catalog, deps covering all the code a stage runs,
params that exist in every catalog file, and per-dataset top-level plots and artifacts."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, copy_shipped

from medflow.catalog import STAGE_SECTIONS

STEPS = ["download", "extract", "manifest", "filter", "resize", "split", "validate", "train", "evaluate", "crossval"]
SPEC: dict[str, Any] = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _entry_path(entry: Any) -> str:
    return str(next(iter(entry)) if isinstance(entry, dict) else entry)


def _module_file(name: str) -> Path | None:
    """The file of an importable ``medflow`` module or package, relative to ROOT, or None (an attribute)."""
    base = Path(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def _imported(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute ``medflow`` modules a file imports, function-level imports included (unless ``top_level_only``)."""
    tree = ast.parse((ROOT / path).read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {n for n in names if n == "medflow" or n.startswith("medflow.")}


def _closure(roots: set[str]) -> set[Path]:
    """Files of every medflow module reachable from ``roots``, with the packages on the way (their __init__)."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            file = _module_file(".".join(parts[:i]))
            if file is not None and file not in seen:
                seen.add(file)
                todo.extend(_imported(file))
    return seen


def step_closure(step: str) -> set[Path]:
    """What ``medflow STEP`` runs: the CLI (with what it imports at load time) and tasks/STEP.py's whole closure."""
    cli = Path("medflow/cli.py")
    return {Path(f"tasks/{step}.py"), cli} | _closure(_imported(Path(f"tasks/{step}.py"))) | _closure(
        _imported(cli, top_level_only=True))


def test_closure_follows_function_level_imports() -> None:
    closure = step_closure("evaluate")
    assert Path("medflow/evaluation/assess.py") in closure and Path("medflow/config.py") in closure
    assert Path("medflow/catalog.py") in closure  # via config
    assert Path("medflow/lifecycle/registry.py") not in closure  # cli imports it inside a function only


@pytest.mark.parametrize("step", STEPS)
def test_stage_deps_cover_the_code_it_runs(step: str) -> None:
    deps = [_entry_path(d) for d in SPEC["stages"][step]["do"]["deps"]]
    code_deps = [d for d in deps if d.startswith(("medflow", "tasks"))]
    uncovered = sorted(str(f) for f in step_closure(step)
                       if not any(str(f) == d or str(f).startswith(d.rstrip("/") + "/") for d in code_deps))
    assert not uncovered, f"{step}: add to its deps in dvc.yaml: {uncovered}"
    for dep in code_deps:
        assert (ROOT / dep).exists(), f"{step}: dep {dep} does not exist"


@pytest.mark.parametrize("step", STEPS)
def test_every_stage_runs_per_dataset_with_its_own_paths(step: str) -> None:
    stage = SPEC["stages"][step]
    assert stage["foreach"] == "${datasets}" and set(stage) == {"foreach", "do"}
    cmd = stage["do"]["cmd"]
    words = (cmd[-1] if isinstance(cmd, list) else cmd).split()  # download: `medflow preflight` first
    assert words[:4] == ["medflow", step, "--dataset", "${item}"]
    paths = [w for w in words[4:] if not w.startswith("--")]
    outs = [_entry_path(o) for key in ("outs", "metrics", "plots") for o in stage["do"].get(key, [])]
    data_deps = [d for d in map(_entry_path, stage["do"]["deps"]) if not d.startswith(("medflow", "tasks"))]
    for path in paths + outs + data_deps:
        assert "${item}" in path, f"{step}: {path} is shared between datasets"


def _holds(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("step", STEPS)
def test_stage_params_exist_in_params_yaml_and_every_catalog_file(step: str, tmp_path: Path) -> None:
    """DVC fails a stage whose listed param key is missing ("Parameters 'resize' are missing from ...")."""
    params_file = copy_shipped(tmp_path)
    shared = yaml.safe_load(params_file.read_text())
    listed = {}
    for entry in SPEC["stages"][step]["do"]["params"]:
        if isinstance(entry, dict):
            listed.update(entry)
        else:
            listed.setdefault("params.yaml", []).append(entry)
    catalog_keys = listed.pop("datasets/${item}.yaml")
    assert step not in STAGE_SECTIONS or step in catalog_keys, f"{step}: the dataset's own section is not listed"
    assert set(listed) <= {"params.yaml"}
    for key in listed.get("params.yaml", []):
        assert _holds(shared, key), f"params.yaml lacks {key} ({step})"
    for name in shared["datasets"]:
        entry = yaml.safe_load((tmp_path / "datasets" / f"{name}.yaml").read_text())
        for key in catalog_keys:
            assert _holds(entry, key), f"datasets/{name}.yaml lacks {key} ({step})"


def test_top_level_plots_and_artifacts_cover_every_dataset(tmp_path: Path) -> None:
    datasets = yaml.safe_load(copy_shipped(tmp_path).read_text())["datasets"]
    plotted = [path.split("/")[1] for plot in SPEC["plots"] for spec in plot.values() for path in spec["y"]]
    assert sorted(plotted) == sorted(datasets)
    assert not any("${" in str(plot) for plot in SPEC["plots"])  # top-level entries are not templated
    artifacts = SPEC["artifacts"]
    assert {a["path"] for a in artifacts.values()} == {f"models/{d}/model.keras" for d in datasets}
    assert all(a["type"] == "model" and a["desc"] and a["labels"] for a in artifacts.values())


_RESOLVE = """
import json, sys
from dvc.repo import Repo
with Repo(sys.argv[1]) as repo:
    stages = {s.name: {"cmd": s.cmd, "outs": [str(o.def_path) for o in s.outs],
                       "deleted_before_run": [str(o.def_path) for o in s.outs if not o.persist],
                       "params": {str(d.def_path): d.params for d in s.deps if hasattr(d, "params")}}
              for s in repo.index.stages}
    artifacts = [str(a.path) for a in repo.artifacts.read()["dvc.yaml"].values()]
print(json.dumps({"stages": stages, "artifacts": artifacts}))
"""


def test_dvc_resolves_one_stage_per_step_and_dataset(tmp_path: Path) -> None:
    """DVC's own resolution of the shipped dvc.yaml (in a child process: DVC's logging stays out of pytest's)."""
    project = tmp_path / "project"
    copy_shipped(project)
    shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=project, check=True)
    out = subprocess.run([sys.executable, "-c", _RESOLVE, str(project)], capture_output=True, text=True,
                         check=True).stdout
    resolved = json.loads(out)
    datasets = yaml.safe_load((project / "params.yaml").read_text())["datasets"]
    stages = resolved["stages"]
    assert set(stages) == {f"{step}@{d}" for step in STEPS for d in datasets}
    train = stages["train@malaria"]
    assert "--model-dir models/malaria" in train["cmd"] and "--dataset malaria" in train["cmd"]
    assert train["params"] == {"params.yaml": ["train"],
                               "datasets/malaria.yaml": ["dataset.allow_flips", "dataset.labels",
                                                         "dataset.class_names", "train"]}
    assert {"models/malaria/model.keras", "models/malaria/checkpoints"} <= set(train["outs"])
    # every output (outs, metrics, plots) persists: a failed run never costs the last good one (issue 12); but
    # the published image store, hard links that DVC would copy out of its hardlinked cache before each resize
    # (deleted instead: links only, linked again from the store)
    deleted = {name: s["deleted_before_run"] for name, s in stages.items() if s["deleted_before_run"]}
    assert deleted == {f"resize@{d}": [f"data/processed/{d}/images"] for d in datasets}
    assert set(resolved["artifacts"]) == {f"models/{d}/model.keras" for d in datasets}

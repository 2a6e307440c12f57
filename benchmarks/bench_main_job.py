"""The main job end to end: `dvc repro evaluate@pneumonia` on the shared Kermany folder, stage by stage.

Builds a throw-away checkout of the pipeline with ../shared/data/chest_xray (1,566 images) in its inbox and
runs the pipeline one stage at a time (`dvc repro --single-item <stage>@pneumonia`, in DAG order), timing
each, for two recipes side by side:

- ``default``: this checkout's defaults (params.yaml and datasets/pneumonia.yaml as committed: 224 px);
- ``fast``: the documented fast variant (128 px, per-image normalization, at most 20 epochs).

With ``--external`` (default ../shared/data/chest_xray_external, copied into data/external/pneumonia/) the
evaluate stage also scores that set, and the table gives its ROC AUC. Goal: the main job in at most 10 minutes
on a 2-core CPU. Prints one table per variant and the ratio of the totals.

    uv run python benchmarks/bench_main_job.py [--variants default fast] [--data DIR] [--external DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from dvc_project import BIN, DVC, ROOT, copy_pipeline

STAGES = ["download", "extract", "manifest", "filter", "resize", "split", "validate", "train", "evaluate"]
# the fast variant, where it differs from the defaults (README, "Generalization")
FAST: dict[str, dict[str, Any]] = {
    "resize": {"size": 128},
    "train": {"normalize": "per_image", "epochs": 20},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _project(dest: Path, data: Path, external: Path | None, variant: str) -> None:
    copy_pipeline(dest)
    shutil.copytree(data, dest / "data/inbox/pneumonia" / data.name)
    entry_path = dest / "datasets/pneumonia.yaml"
    entry = yaml.safe_load(entry_path.read_text())
    if variant == "fast":  # the catalog entry's overrides win over params.yaml: set them there
        for section, values in FAST.items():
            entry[section] = entry.get(section) or {}
            _merge(entry[section], values)
    if external is not None:
        shutil.copytree(external, dest / "data/external/pneumonia" / external.name)
        entry["evaluate"] = {**(entry.get("evaluate") or {}), "external": [f"data/external/pneumonia/{external.name}"]}
    entry_path.write_text(yaml.safe_dump(entry, sort_keys=False))
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit",
                                        "-qm", "bench"]):  # DVCLive needs a commit to start from
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)


def _run_stages(project: Path) -> dict[str, float]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    seconds = {}
    for stage in STAGES:
        start = time.perf_counter()
        run = subprocess.run([DVC, "repro", "--single-item", f"{stage}@pneumonia"], cwd=project, env=env,
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{stage} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        seconds[stage] = time.perf_counter() - start
        print(f"  {stage}: {seconds[stage]:.1f} s", file=sys.stderr, flush=True)
    return seconds


def _value(x: Any) -> float:
    return float(x["value"] if isinstance(x, dict) else x)


def _block(name: str, block: dict[str, Any]) -> str:
    auc = block["roc_auc"]
    return (f"{name} AUC {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f}), sensitivity "
            f"{_value(block['sensitivity']):.3f}, specificity {_value(block['specificity']):.3f}, ECE "
            f"{_value(block['ece']):.3f}")


def _quality(project: Path) -> list[str]:
    m = json.loads((project / "reports/pneumonia/evaluation/metrics.json").read_text())
    train = json.loads((project / "reports/pneumonia/train/metrics.json").read_text())
    lines = [f"kept epoch {train.get('epoch')} of {train.get('epochs_run')}, val loss {train['val']['loss']:.6f}",
             _block("test", m["test"])]
    return lines + [_block(name, block) for name, block in (m.get("external") or {}).items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=["default", "fast"], default=["default", "fast"])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray")
    parser.add_argument("--external", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray_external")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data with a folder of class subfolders")
    external = args.external if args.external.is_dir() else None
    totals = {}
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            project = Path(tmp) / "project"
            _project(project, args.data, external, variant)
            print(f"{variant}:", file=sys.stderr)
            seconds = _run_stages(project)
            quality = _quality(project)
        totals[variant] = sum(seconds.values())
        print(f"\n### {variant}\n\n| stage | seconds |\n|---|---|")
        for stage, s in seconds.items():
            print(f"| {stage} | {s:.1f} |")
        print(f"| **total** | **{totals[variant]:.1f}** ({totals[variant] / 60:.1f} min; goal <= 10 min) |")
        print("\n" + "\n".join(f"- {line}" for line in quality))
    if len(totals) == 2:
        print(f"\nratio default / fast (total wall time): {totals['default'] / totals['fast']:.2f}x")


if __name__ == "__main__":
    main()

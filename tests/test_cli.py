import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from medflow.catalog import STAGE_SECTIONS
from medflow.cli import STEPS, main
from medflow.io import read_csv

MEDFLOW = [sys.executable, "-m", "medflow.cli"]


def _catalog(tmp_path: Path) -> Path:
    """A checkout's params.yaml beside a two-dataset catalog: xray (A 0, B 1) and cells (C 0, D 1)."""
    (tmp_path / "datasets").mkdir()
    for name, labels in (("xray", {"A": 0, "B": 1}), ("cells", {"C": 0, "D": 1})):
        entry = {"dataset": {"sources": [], "labels": labels, "class_names": list(labels),
                             "group_rule": "filename", "channels": 1, "allow_flips": False, "card": {}},
                 **{s: {} for s in STAGE_SECTIONS}}
        (tmp_path / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(entry))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": ["xray", "cells"]}))
    return params


def _medflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEDFLOW, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_step_has_help(step: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([step, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--params" in out and "--dataset" in out


def test_dataset_picks_the_catalog_entry(tmp_path: Path) -> None:
    params = _catalog(tmp_path)
    for cls in "ABCD":
        (tmp_path / "images" / cls).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "images" / cls / f"{cls.lower()}1.png"), np.full((40, 40), 100, np.uint8))
    (tmp_path / "roots.json").write_text(json.dumps([{"root": str(tmp_path / "images")}]))
    run = _medflow("manifest", "--dataset", "cells", "--params", str(params), "--roots-json", "roots.json",
                   "--out", "m", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = read_csv(tmp_path / "m")
    assert dict(zip(manifest["class_name"], manifest["label"], strict=True)) == {"C": 0, "D": 1}


def test_unknown_dataset_lists_the_catalog(tmp_path: Path) -> None:
    params = _catalog(tmp_path)
    run = _medflow("split", "--dataset", "xrya", "--params", str(params), "--clean", "c.csv", "--out", "o.csv",
                   "--summary", "s.json", "--rejects", "r.csv", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "unknown dataset 'xrya'" in run.stderr and "describes: cells, xray" in run.stderr


def test_step_without_a_dataset_names_the_choices(tmp_path: Path) -> None:
    params = _catalog(tmp_path)
    run = _medflow("split", "--params", str(params), "--clean", "c.csv", "--out", "o.csv", "--summary", "s.json",
                   "--rejects", "r.csv", cwd=tmp_path)
    assert run.returncode == 2
    assert "name a dataset of the catalog (--dataset NAME): xray, cells" in run.stderr


def test_self_contained_params_with_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("dataset: {name: t, labels: {A: 0, B: 1}}\n")
    run = _medflow("manifest", "--params", "p.yaml", "--dataset", "t", "--roots-json", "r.json", "--out", "m.csv",
                   cwd=tmp_path)
    assert run.returncode == 2 and "holds its own dataset: block" in run.stderr and "use one or the other" in (
        run.stderr)


def test_predict_needs_a_dataset_or_a_model(tmp_path: Path) -> None:
    params = _catalog(tmp_path)
    run = _medflow("predict", "x.png", "--params", str(params), cwd=tmp_path)
    assert run.returncode == 2
    assert "--dataset NAME" in run.stderr and "cells, xray" in run.stderr
    run = _medflow("predict", "x.png", "--params", str(params), "--dataset", "nope", cwd=tmp_path)
    assert run.returncode == 2 and "unknown dataset 'nope'" in run.stderr


def test_evaluate_takes_the_dataset_recorded_with_the_model(tmp_path: Path) -> None:
    from medflow.cli import _build_parser, _model_config

    params = _catalog(tmp_path)
    model = tmp_path / "models" / "cells"
    model.mkdir(parents=True)
    (model / "metadata.json").write_text(json.dumps({"task": "cells"}))
    args = _build_parser().parse_args(["evaluate", "--params", str(params), "--model", str(model), "--images", "d"])
    assert _model_config(args).dataset.labels == {"C": 0, "D": 1}
    args = _build_parser().parse_args(["evaluate", "--params", str(params), "--model", str(model), "--images", "d",
                                       "--dataset", "xray"])
    assert _model_config(args).dataset.name == "xray"  # --dataset wins


def test_watch_without_a_dataset_lists_the_catalog(tmp_path: Path) -> None:
    run = subprocess.run([*MEDFLOW, "watch", "--once"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2 and "name a dataset of the catalog (--dataset NAME)" in run.stderr


def test_bad_params_exit_2_naming_the_key(tmp_path: Path) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("dataset: {name: t, labels: {A: 0, B: 1}}\nresize: {size: big}\n")
    run = subprocess.run([*MEDFLOW, "split", "--params", str(params), "--clean", "c.csv", "--out", "o.csv",
                          "--summary", "s.json", "--rejects", "r.csv"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert "resize.size" in run.stderr and "Traceback" not in run.stderr


def test_step_error_is_one_line(tmp_path: Path) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("dataset: {name: t, labels: {A: 0, B: 1}}\n")
    run = subprocess.run([*MEDFLOW, "manifest", "--params", str(params), "--roots-json", "missing.json",
                          "--out", "m.csv"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("medflow manifest: error: missing.json: not found")
    assert not (tmp_path / "m.csv").exists()


def test_step_outside_a_project_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEDFLOW_PROJECT"}
    (tmp_path / "p.yaml").write_text("dataset: {name: t, labels: {A: 0, B: 1}}\n")
    run = subprocess.run([*MEDFLOW, "manifest", "--params", "p.yaml", "--roots-json", "r.json", "--out", "m.csv"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 2
    assert "not inside a medflow project" in run.stderr and str(tmp_path) in run.stderr


def test_steps_load_from_the_project_not_the_wheel() -> None:
    from medflow.cli import load_project_module

    module = load_project_module("tasks.manifest")
    assert Path(module.__file__).resolve().parent == Path(__file__).resolve().parents[1] / "tasks"


def test_atomic_outputs_get_ordinary_file_modes(tmp_path: Path) -> None:
    from medflow.io import atomic_dir, write_json

    old = os.umask(0o022)
    os.umask(old)
    write_json(tmp_path / "out.json", {"a": 1})
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~old
    with atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("x")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~old


_EXIT = '''
import atexit, sys, threading
from medflow.cli import exit_without_teardown


class Freed:
    def __del__(self) -> None:
        sys.stderr.write("module teardown ran\\n")


KEPT = Freed()  # freed when the interpreter tears this module down
atexit.register(lambda: open(sys.argv[1], "w").write("exit handlers ran"))
sys.stdout.write("buffered, no newline")
if sys.argv[2:] == ["thread"]:
    threading.Thread(target=threading.Event().wait, args=(0.3,)).start()  # not a daemon
if sys.argv[2:] == ["profiled"]:
    sys.setprofile(lambda *_: None)
exit_without_teardown(3)
sys.exit(4)  # the normal exit
'''


def test_a_finished_step_exits_without_the_interpreter_teardown(tmp_path: Path) -> None:
    """Exit handlers run and buffered output is flushed; the module teardown (1.2-1.5 s after Great
    Expectations' imports) is skipped, and the exit status is the step's."""
    marker = tmp_path / "atexit.txt"
    done = subprocess.run([sys.executable, "-c", _EXIT, str(marker)], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert marker.read_text() == "exit handlers ran"
    assert "module teardown ran" not in done.stderr


@pytest.mark.parametrize("why", ["thread", "profiled"])
def test_a_thread_still_running_or_a_profiler_gets_the_normal_exit(tmp_path: Path, why: str) -> None:
    """A non-daemon thread left running is joined by the normal exit, not cut off; a profiler (cProfile writes
    its file when the script returns) or a tracer gets its end too."""
    marker = tmp_path / "atexit.txt"
    done = subprocess.run([sys.executable, "-c", _EXIT, str(marker), why], capture_output=True, text=True)
    assert done.returncode == 4, done.stderr
    assert done.stdout == "buffered, no newline"
    assert marker.read_text() == "exit handlers ran"
    if why == "thread":  # (the profile function set here sees the teardown's calls instead)
        assert "module teardown ran" in done.stderr

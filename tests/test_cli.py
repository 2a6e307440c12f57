import os
import subprocess
import sys
from pathlib import Path

import pytest

from medflow.cli import STEPS, main

MEDFLOW = [sys.executable, "-m", "medflow.cli"]


@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_step_has_help(step: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([step, "--help"])
    assert e.value.code == 0
    assert "--params" in capsys.readouterr().out


def test_bad_params_exit_2_naming_the_key(tmp_path: Path) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("dataset: {name: t, labels: {A: 0, B: 1}}\nresize: {size: big}\n")
    run = subprocess.run([*MEDFLOW, "split", "--params", str(params), "--clean", "c.csv", "--out", "o.csv",
                          "--summary", "s.json"],
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

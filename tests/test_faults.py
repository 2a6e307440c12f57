"""Faults injected for real (issue 19): a SIGKILLed DVC, a full disk (a small tmpfs), a damaged champion.

Each test checks what the user reads, that no process is left, and that the next plain run reaches the
state an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from conftest import output_bytes
from resize_helpers import config_for, save_image, texture

from medflow.config import parse_config
from medflow.errors import StepError
from medflow.imaging.store import save_array
from medflow.io import ImageStore, sha256_file, write_csv, write_json
from medflow.schema import CLEAN_COLUMNS, MANIFEST_COLUMNS
from tasks import resize

BIN = Path(sys.executable).parent  # medflow and dvc of this environment


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _clean_csv(dest: Path, paths: list[Path]) -> Path:
    """A clean.csv naming ``paths`` with distinct digests and no header facts (the step probes them)."""
    rows = [{"path": str(p), "relpath": p.name, "root": str(p.parent), "class_name": "a", "label": 0,
             "group": p.stem, "source_split": "", "sha256": f"{i:064x}", "bytes": 1, "width": "",
             "height": "", "mode": "", "format": "", "phash": "0" * 16, "dup_group": ""}
            for i, p in enumerate(paths)]
    write_csv(dest, pd.DataFrame(rows, columns=CLEAN_COLUMNS))
    return dest


def _images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct small PNGs."""
    return [save_image(folder / f"img_{i:03d}.png", texture(40, 48, seed=i)) for i in range(n)]


def _params(dest: Path, workers: int) -> Path:
    dest.write_text(yaml.safe_dump({"dataset": {"name": "t", "sources": ["x"], "labels": {"a": 0, "b": 1},
                                                "channels": 1}, "resize": {"size": 16, "workers": workers}}))
    return dest


# --- a SIGKILLed DVC takes its stage's command and that command's worker processes with it ------------------
N_POOL = 70  # over parallel.POOL_MIN_IMAGES: the step starts worker processes


def _dvc_project(root: Path, images: list[Path]) -> Path:
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True, env=_env())
    _clean_csv(root / "clean.csv", images)
    _params(root / "params.yaml", workers=2)
    (root / "roots.json").write_text("[]\n")  # every image path is a plain one
    cmd = ("medflow resize --params params.yaml --clean clean.csv --out images --stats stats.json "
           "--cache cache --roots-json roots.json")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"resize": {
        "cmd": cmd, "deps": ["clean.csv", "roots.json"], "params": [{"params.yaml": ["resize"]}],
        "outs": ["images", "stats.json"]}}}))
    return root


def _wait_for_decoders(dvc: psutil.Process) -> list[psutil.Process]:
    """DVC's descendants once the step's worker process has started: the shell (where it does not exec),
    medflow, its resource tracker and fork server, and the worker (the fork server's child)."""
    while True:
        procs = dvc.children(recursive=True)
        if any("forkserver" in " ".join(p.cmdline()) for p in procs) and len(procs) >= 4:
            return procs
        with contextlib.suppress(psutil.TimeoutExpired):
            dvc.wait(0.2)
            raise AssertionError("dvc repro ended before the step started its workers")


@pytest.mark.slow  # two dvc repro runs and a worker pool: about 25 s on 2 busy cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_dvc_kills_the_step_and_its_workers_and_a_rerun_completes(tmp_path: Path) -> None:
    fifos = [tmp_path / "in" / f"img_{i:03d}.png" for i in range(N_POOL)]
    fifos[0].parent.mkdir()
    for f in fifos:
        os.mkfifo(f)  # reading blocks: the step hangs in its decoders until it is killed
    project = _dvc_project(tmp_path / "p", fifos)
    env = {**_env(), "SHELL": "/bin/sh"}  # DVC's shell where $SHELL is unset (CI): dash forks, it does not exec
    proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dvc = psutil.Process(proc.pid)
        procs = _wait_for_decoders(dvc)
        step = next(p for p in procs if "resize" in p.cmdline() and p.name() != "sh")
        assert "resize" in " ".join(step.cmdline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(procs, timeout=60)  # bounded, so that a regression fails, not hangs
        assert not alive, f"left running after dvc was killed: {[p.cmdline() for p in alive]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (project / "images").exists()  # (a decoder blocked in a read keeps the SIGTERM cleanup
    # from finishing: the step kills itself after lifeline.GRACE_S, leaving its part files in the store)
    for f, src in zip(fifos, _images(tmp_path / "real", N_POOL), strict=True):
        f.unlink()
        f.write_bytes(src.read_bytes())
    rerun = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert ImageStore(project / "images").shape == (N_POOL, 16, 16, 1)
    assert "resize" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert not [p.name for p in (project / "cache" / "shards").iterdir() if p.name.startswith(".")], \
        "the rerun removes what the killed step left"


def test_every_stage_command_is_one_command_the_shell_execs() -> None:
    """DVC runs ``$SHELL -c CMD``: medflow follows a shell parent to the shell's own parent
    (:mod:`medflow.lifeline`), but ``a && b`` or a pipe would leave commands that do not."""
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        for cmd in body["cmd"] if isinstance(body["cmd"], list) else [body["cmd"]]:
            assert cmd.startswith("medflow "), (name, cmd)
            assert not any(op in cmd for op in ("&&", "||", ";", "|", "&", "$(", "`")), (name, cmd)


# --- a full disk (a small tmpfs: real ENOSPC) names its cause and the path --------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only: skipped where mounting is not permitted), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _resize(tmp_path: Path, out_dir: Path, files: list[Path], cache: Path) -> None:
    """The resize step in this process (what ``medflow resize`` runs; the CLI prints its StepError)."""
    resize.run(config_for(size=128, channels=3), clean=_clean_csv(tmp_path / "clean.csv", files),
               out=out_dir / "images", stats=out_dir / "stats.json", cache=cache)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "decoded"])
def test_resize_on_a_full_disk_says_no_space_and_names_the_output(tmp_path: Path, small_disk: Path,
                                                                  cached: bool) -> None:
    files = _images(tmp_path / "img", 30)  # 30 x 128 x 128 x 3 bytes: 1.4 MiB, over the 1 MiB disk
    cache = tmp_path / "cache"
    if cached:  # every image in the store: its shards are copied (another filesystem: no hard link)
        _resize(tmp_path, tmp_path / "first", files, cache)
    with pytest.raises(StepError, match=f"^{small_disk}/.*: cannot write the output: No space left on device"):
        _resize(tmp_path, small_disk, files, cache)
    assert not any(small_disk.iterdir()), "nothing is left on the full disk"
    _resize(tmp_path, tmp_path / "again", files, cache)  # space again: the run completes
    assert ImageStore(tmp_path / "again" / "images").shape == (30, 128, 128, 3)


def _fill(disk: Path) -> None:
    """Take every free byte of ``disk``."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
        f.write(b"\0" * (2 << 20))


def test_extract_on_a_full_disk_says_no_space_and_names_the_folder(tmp_path: Path, small_disk: Path) -> None:
    from tasks import extract

    rng = np.random.default_rng(0)
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # stored: 1.5 MiB to write, over the 1 MiB disk
        for i in range(3):
            zf.writestr(f"set/A/img_{i}.png", rng.integers(0, 256, 500_000, dtype=np.uint8).tobytes())
    sources = tmp_path / "sources.json"
    write_json(sources, [{"url": str(archive), "path": str(archive), "kind": "archive", "index": 0,
                          "sha256": sha256_file(archive)}])
    cfg = parse_config({"dataset": {"name": "t", "sources": [str(archive)], "labels": {"A": 0, "B": 1}}})
    with pytest.raises(StepError, match=f"^{small_disk}/.*: cannot write: No space left on device"):
        extract.run(cfg, sources_json=sources, out_dir=small_disk / "ex", roots_json=tmp_path / "roots.json")
    assert list((small_disk / "ex").iterdir()) == [], "the half-extracted folder is removed"
    summary = extract.run(cfg, sources_json=sources, out_dir=tmp_path / "ex", roots_json=tmp_path / "roots.json")
    assert summary["extracted"] == 1  # with space again the step completes


def test_filter_on_a_full_disk_says_no_space_and_names_the_output(tmp_path: Path, small_disk: Path) -> None:
    from tasks import filter as step

    files = _images(tmp_path / "raw" / "A", 4)
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, pd.DataFrame([{"path": str(p), "relpath": f"A/{p.name}", "root": str(tmp_path / "raw"),
                                       "class_name": "A", "label": 0, "group": p.stem, "source_split": None,
                                       "sha256": sha256_file(p), "bytes": p.stat().st_size, "width": 48,
                                       "height": 40, "mode": "RGB", "format": "PNG"} for p in files],
                                     columns=MANIFEST_COLUMNS))
    cfg = parse_config({"dataset": {"name": "t", "sources": ["x"], "labels": {"A": 0, "B": 1}},
                        "filter": {"workers": 1}})

    def run(out: Path) -> dict[str, object]:
        return step.run(cfg, manifest=manifest, clean=out / "clean", rejects=out / "rejects.csv",
                        summary=out / "filter.json", cache=out / "cache")
    _fill(small_disk)
    with pytest.raises(StepError, match=f"^{small_disk}/.*No space left on device"):
        run(small_disk)
    assert [p.name for p in small_disk.iterdir() if p.name != "cache"] == ["filler"]
    assert run(tmp_path / "out")["clean"] == 4


@pytest.mark.slow  # trains (1 epoch, 32 images): TensorFlow's start dominates
def test_train_on_a_full_disk_says_no_space_and_names_the_file(tmp_path: Path, small_disk: Path) -> None:
    from conftest import write_split_csv

    from tasks import train

    rng = np.random.default_rng(0)
    n = 32
    save_array(tmp_path / "images", rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8))
    split = write_split_csv(tmp_path / "split.csv", paths=[f"img{i}.png" for i in range(n)],
                            labels=[i % 2 for i in range(n)], splits=["train"] * 16 + ["val"] * 8 + ["test"] * 8,
                            groups=[f"p{i}" for i in range(n)])
    cfg = parse_config({"dataset": {"name": "t", "labels": {"NEG": 0, "POS": 1}, "channels": 1},
                        "resize": {"size": 32},
                        "train": {"model": "tutorial_cnn", "epochs": 1, "batch_size": 8,  # the smaller graph
                                  "early_stopping_patience": 0, "reduce_lr_patience": 0}})

    def run(model_dir: Path) -> object:
        return train.run(cfg, images=tmp_path / "images", split=split, model_dir=model_dir,
                         live_dir=tmp_path / "live")
    _fill(small_disk)
    with pytest.raises(StepError, match=f"^{small_disk}/.*No space left on device"):
        run(small_disk / "model")
    run(tmp_path / "model")  # with space again the step completes
    assert (tmp_path / "model" / "model.keras").is_file()


def test_stale_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    from medflow.io import atomic_dir, atomic_path, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dest = tmp_path / "images.npy"
    left = tmp_path / f".images.npy.tmp.{dead}.abc.tmp"  # a SIGKILLed writer's file, as atomic_path names it
    left.write_bytes(b"x" * 100)
    left_dir = tmp_path / f".images.npy.tmp.{dead}.def.tmp"
    (left_dir / "part").mkdir(parents=True)
    other = tmp_path / f".other.npy.tmp.{dead}.x.tmp"  # another output's: only named outputs are cleaned
    other.write_bytes(b"")
    with atomic_dir(tmp_path / "extracted") as live_dir:
        assert live_dir.name.startswith(f".extracted.tmp.{os.getpid()}.")  # folders are named alike
    with atomic_path(dest) as live:
        assert live.name.startswith(f".images.npy.tmp.{os.getpid()}.")
        live.write_bytes(b"y")
        assert sorted(remove_stale_temps([dest])) == sorted([left, left_dir])
        assert live.exists() and other.exists()  # a live writer's file, and another output's, stay
    assert dest.read_bytes() == b"y"


# --- a SIGKILLed filter step takes its decoding workers with it; the re-run is an uninterrupted run's -------
def _wait_for_workers(step: psutil.Process) -> list[psutil.Process]:
    """The step's descendants once a decoding worker (a child of its fork server) has started."""
    while True:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs = step.children(recursive=True)
            servers = [p for p in procs if "forkserver" in " ".join(p.cmdline())]
            if any(s.children() for s in servers):
                return step.children(recursive=True)
        with contextlib.suppress(psutil.TimeoutExpired):
            step.wait(0.02)
            raise AssertionError("the filter step ended before it started its workers")


@pytest.mark.slow  # three filter runs over 140 real X-rays (one killed), two CLI starts: about 10 s on 2 cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_filter_step_kills_its_workers_and_the_rerun_is_identical(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import shared_dataset

    from tasks import filter as filter_step
    from tasks import manifest as manifest_step

    full, small = shared_dataset("chest_xray_fullres"), shared_dataset("chest_xray")
    src = tmp_path / "p" / "src"
    # 140 distinct files, over quality._INLINE_MAX (the step starts worker processes); 40 full-size X-rays keep
    # the workers busy for a second or more, the time to kill the step while they decode
    picked = sorted(full.rglob("*.jpeg"))[::3] + sorted(small.rglob("*.jpeg"))[::15][:100]
    for i, f in enumerate(picked):
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(f, src / f.parent.name / f"{i:03d}_{f.name}")
    project = src.parent
    monkeypatch.chdir(project)
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump({"dataset": {"name": "t", "labels": {"NORMAL": 0, "PNEUMONIA": 1},
                                                  "channels": 1}, "filter": {"workers": 2}}))
    cfg = parse_config(yaml.safe_load(params.read_text()))
    write_json(project / "roots.json", [{"root": "src", "source": "src", "kind": "folder"}])
    manifest_step.run(cfg, roots_json=project / "roots.json", out=project / "manifest")
    outs = ("clean", "rejects.csv", "filter.json")

    def args(folder: str) -> dict[str, Path]:
        return {"manifest": project / "manifest", "clean": project / folder / outs[0],
                "rejects": project / folder / outs[1], "summary": project / folder / outs[2],
                "cache": project / folder / "cache"}

    filter_step.run(cfg, **args("ref"))  # the uninterrupted run
    cmd = [str(BIN / "medflow"), "filter", "--params", "params.yaml", "--roots-json", "roots.json",
           *(x for k, v in args("out").items() for x in (f"--{k}", str(v.relative_to(project))))]
    proc = subprocess.Popen(cmd, cwd=project, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        procs = _wait_for_workers(psutil.Process(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        gone, alive = psutil.wait_procs(procs, timeout=60)  # bounded, so that a regression fails, not hangs
        assert not alive, f"left running after the filter step was killed: {[p.cmdline() for p in alive]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not any((project / "out" / name).exists() for name in outs)  # killed while decoding
    rerun = subprocess.run(cmd, cwd=project, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in outs[:2]:
        assert output_bytes(project / "out" / name) == output_bytes(project / "ref" / name), name
    summaries = [json.loads((project / d / outs[2]).read_text()) for d in ("ref", "out")]
    def counts_aside(s: dict) -> dict:  # what was decoded and what came from the cache differs, nothing else
        return {k: v for k, v in s.items() if k not in ("decoded", "cached")}

    assert counts_aside(summaries[1]) == counts_aside(summaries[0])
    assert summaries[1]["decoded"] == summaries[0]["decoded"] > 128  # the killed run saved no verdicts
    assert not [p for p in (project / "out").rglob("*") if ".tmp" in p.name], "temporary files left behind"

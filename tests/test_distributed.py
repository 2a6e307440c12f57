"""Distributed training on this CPU machine: mirrored over 2 logical CPUs, 2 local multi-worker processes,
and JAX data parallelism over 2 forced host devices (where JAX is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from test_train import _synthetic, _write_dataset

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "tests" / "scripts" / "train_distributed.py"


def _data(tmp_path: Path) -> Path:
    x, y = _synthetic(48)
    _write_dataset(tmp_path / "data", x, y, ["train"] * 32 + ["val"] * 8 + ["test"] * 8)
    return tmp_path / "data"


def _run(strategy: str, data: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), strategy, str(data), str(out)], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _summary(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mirrored_over_two_logical_cpus(tmp_path: Path) -> None:
    summary = _summary(_run("mirrored", _data(tmp_path), tmp_path / "w.npz"))
    assert summary["global_batch"] == 8  # 4 per replica x 2 replicas
    meta = json.loads((tmp_path / "model-w" / "metadata.json").read_text())
    assert meta["placement"] == {"strategy": "mirrored", "replicas": 2, "global_batch": 8}


def test_multi_worker_two_local_processes_end_identical(tmp_path: Path) -> None:
    data = _data(tmp_path)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    procs = [_run("multi_worker", data, tmp_path / f"w{i}.npz",
                  {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    summaries = [_summary(p) for p in procs]
    assert summaries[0]["global_batch"] == 8
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(w0.files) > 10  # every trainable weight: all-reduced gradients, same best epoch restored
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key])
    assert (tmp_path / "model-w0" / "model.keras").exists()  # the chief writes the model
    assert not (tmp_path / "model-w1" / "model.keras").exists()


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_jax_data_parallel_two_host_devices(tmp_path: Path) -> None:
    env = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    summary = _summary(_run("data_parallel", _data(tmp_path), tmp_path / "w.npz", env))
    assert summary["global_batch"] == 8
    meta = json.loads((tmp_path / "model-w" / "metadata.json").read_text())
    assert meta["placement"]["strategy"] == "data_parallel" and meta["placement"]["replicas"] == 2
    assert summary["loaded_jit_compile"] is True  # evaluate/predict on JAX: jitted despite the affine layers


PLACE = """import json, jax
from medflow.training.distribute import place
p = place("data_parallel", "jax")
print(json.dumps({"replicas": p.replicas, "chief": p.is_chief, "processes": jax.process_count()}))"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_jax_multi_host_two_local_processes_join_one_mesh(tmp_path: Path) -> None:
    """What each host of a JAX cluster runs (README, "Training across machines"), as two processes on 127.0.0.1
    with 2 CPU devices each: both join the coordinator and place data_parallel over all 4 devices."""
    base = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "2",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}"}
    procs = [subprocess.Popen([sys.executable, "-c", PLACE], cwd=ROOT, env={**base, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    summaries = [_summary(p) for p in procs]
    assert summaries == [{"replicas": 4, "chief": True, "processes": 2},  # process 0 writes the model
                         {"replicas": 4, "chief": False, "processes": 2}]


@pytest.mark.parametrize(("env", "message"), [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "JAX_COORDINATOR_ADDRESS='10.0.0.1': expected host:port"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two': expected an integer >= 1"),
    ({"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID='-1': expected an integer >= 0"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 is not below JAX_NUM_PROCESSES=2"),
])
def test_jax_cluster_settings_are_checked_before_joining(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                         message: str) -> None:
    from medflow.errors import StepError
    from medflow.training.distribute import jax_cluster

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StepError, match=message.replace("(", r"\(")):
        jax_cluster()


def test_jax_cluster_reads_the_three_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from medflow.training.distribute import jax_cluster

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert jax_cluster() is None  # one host
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert jax_cluster() == ("10.0.0.1:1234", None, None)  # left to JAX's cluster detection (SLURM, MPI, ...)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert jax_cluster() == ("10.0.0.1:1234", 2, 1)

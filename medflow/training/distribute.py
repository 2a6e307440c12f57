"""Where training runs: one device, mirrored GPUs, a TPU, several workers, or JAX data parallelism.

``train.strategy`` picks it explicitly; ``auto`` means a TPU if one is configured, else every local GPU
mirrored (TensorFlow) or data parallel (JAX), else one device. Nothing falls back silently: a strategy
that cannot be set up raises :class:`StepError` saying why. The global batch is always
``batch_size * replicas`` and is returned, so the trainer can log it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import keras

from medflow.errors import StepError

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """The chosen strategy: how many replicas, and the scope models and optimizers are built in."""

    kind: str  # one_device | mirrored | multi_worker | tpu | data_parallel
    replicas: int
    tf_strategy: Any = None  # a tf.distribute.Strategy on the TensorFlow backend, else None
    is_chief: bool = True
    _scope: Callable[[], contextlib.AbstractContextManager[Any]] = field(default=contextlib.nullcontext)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with self._scope():
            yield

    def global_batch(self, per_replica: int) -> int:
        return per_replica * self.replicas


def _tf() -> Any:
    import tensorflow as tf  # only on the TensorFlow backend

    return tf


def _tf_placement(strategy: str) -> Placement:
    tf = _tf()
    if strategy == "auto":
        if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
            strategy = "tpu"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            strategy = "mirrored"
        else:
            strategy = "one_device"
    if strategy == "one_device":
        return Placement("one_device", 1)
    if strategy == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        s = tf.distribute.MirroredStrategy(devices=devices)
        return Placement("mirrored", s.num_replicas_in_sync, s, True, s.scope)
    if strategy == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.NotFoundError) as e:
            raise StepError(f"train.strategy: tpu, but no TPU could be reached ({e})") from None
        s = tf.distribute.TPUStrategy(resolver)
        return Placement("tpu", s.num_replicas_in_sync, s, True, s.scope)
    if strategy == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise StepError("train.strategy: multi_worker needs the TF_CONFIG environment variable "
                            "(cluster and task of this worker)")
        s = tf.distribute.MultiWorkerMirroredStrategy()
        task = json.loads(os.environ["TF_CONFIG"]).get("task", {})
        chief = task.get("type") in ("chief", None) or (task.get("type") == "worker" and task.get("index") == 0)
        return Placement("multi_worker", s.num_replicas_in_sync, s, chief, s.scope)
    raise StepError(f"train.strategy: {strategy} is not available on the tensorflow backend")


def _env_int(name: str, minimum: int) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise StepError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return value


def jax_cluster() -> tuple[str, int | None, int | None] | None:
    """JAX multi-host settings from the environment, or None when ``JAX_COORDINATOR_ADDRESS`` is unset.

    ``JAX_COORDINATOR_ADDRESS`` is ``host:port`` of process 0 (it serves the coordinator there), the same on
    every host; ``JAX_NUM_PROCESSES`` the number of processes and ``JAX_PROCESS_ID`` this one's rank
    (0 .. n-1). Left unset, the two are detected by JAX on the clusters it knows (SLURM, Open MPI, ...).
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StepError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port of process 0")
    num, rank = _env_int("JAX_NUM_PROCESSES", 1), _env_int("JAX_PROCESS_ID", 0)
    if num is not None and rank is not None and rank >= num:
        raise StepError(f"JAX_PROCESS_ID={rank} is not below JAX_NUM_PROCESSES={num}")
    return address, num, rank


def _jax_placement(strategy: str) -> Placement:
    import jax

    cluster = jax_cluster()
    if cluster and not jax.distributed.is_initialized():
        # Multi-host: before any JAX computation, every process joins the coordinator; jax.devices() is then
        # every process's devices, and DataParallel spans them all.
        address, num, rank = cluster
        try:
            jax.distributed.initialize(address, num_processes=num, process_id=rank)
        except (RuntimeError, ValueError) as e:
            raise StepError(f"could not join the JAX cluster at JAX_COORDINATOR_ADDRESS={address} ({e})") from None
    devices = jax.devices()
    if strategy == "auto":
        strategy = "data_parallel" if len(devices) > 1 else "one_device"
    if strategy == "one_device":
        return Placement("one_device", 1)
    if strategy == "data_parallel":
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return Placement("data_parallel", len(devices), None, jax.process_index() == 0)
    raise StepError(f"train.strategy: {strategy} needs the tensorflow backend; on jax use auto, one_device "
                    "or data_parallel")


def place(strategy: str, backend: str | None = None) -> Placement:
    """Set up ``train.strategy`` for the current Keras backend."""
    backend = backend or keras.backend.backend()
    if backend == "tensorflow":
        placement = _tf_placement(strategy)
    elif backend == "jax":
        placement = _jax_placement(strategy)
    elif strategy in ("auto", "one_device"):
        placement = Placement("one_device", 1)
    else:
        raise StepError(f"train.strategy: {strategy} is not available on the {backend} backend")
    log.info("training placement: %s with %d replica(s) on the %s backend", placement.kind, placement.replicas,
             backend)
    return placement

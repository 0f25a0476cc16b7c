"""Multi-process start-up: the one place that calls `jax.distributed.initialize`.

A single-process run (a laptop, one GPU, the tests) never initialises anything. A multi-process
run asks for it, either with `VASA_DISTRIBUTED=1` (then JAX auto-detects the cluster: Cloud
TPU, Slurm, Open MPI, Kubernetes) or by naming the coordinator explicitly:

    VASA_COORDINATOR=10.0.0.1:1234 VASA_NUM_PROCESSES=4 VASA_PROCESS_ID=2 python train.py ...

`VASA_LOCAL_DEVICE_IDS=0,1` optionally restricts which local accelerators this process uses
(one process per GPU setups). `maybe_initialize()` must run before anything touches the
backend (`jax.devices()`, the first array), so entry points call it first.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental import multihost_utils

ENV_FLAG = "VASA_DISTRIBUTED"
ENV_COORDINATOR = "VASA_COORDINATOR"
ENV_NUM_PROCESSES = "VASA_NUM_PROCESSES"
ENV_PROCESS_ID = "VASA_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "VASA_LOCAL_DEVICE_IDS"

_TRUE = ("1", "true", "yes")
_FALSE = ("", "0", "false", "no")


def _env_int(environ, name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize_kwargs(environ=None) -> dict | None:
    """Reads the environment and returns `jax.distributed.initialize` kwargs, or None.

    None means "single process, do not initialise". An empty dict means "initialise and let
    JAX auto-detect the cluster". Raises ValueError for an incomplete or malformed setting.
    """
    environ = os.environ if environ is None else environ
    flag = environ.get(ENV_FLAG, "").strip().lower()
    if flag not in _TRUE + _FALSE:
        raise ValueError(f"{ENV_FLAG} must be one of {_TRUE + _FALSE}, got {flag!r}")
    explicit = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if environ.get(n)]
    if not explicit:
        return {} if flag in _TRUE else None
    if len(explicit) != 3:
        raise ValueError(
            f"explicit multi-process setup needs all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} "
            f"and {ENV_PROCESS_ID}; only {explicit} are set"
        )
    kwargs = dict(
        coordinator_address=environ[ENV_COORDINATOR],
        num_processes=_env_int(environ, ENV_NUM_PROCESSES),
        process_id=_env_int(environ, ENV_PROCESS_ID),
    )
    if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
        raise ValueError(
            f"{ENV_PROCESS_ID}={kwargs['process_id']} is outside [0, {kwargs['num_processes']})"
        )
    if environ.get(ENV_LOCAL_DEVICE_IDS):
        ids = environ[ENV_LOCAL_DEVICE_IDS].split(",")
        try:
            kwargs["local_device_ids"] = [int(i) for i in ids]
        except ValueError:
            raise ValueError(
                f"{ENV_LOCAL_DEVICE_IDS} must be comma-separated integers, got {ids}"
            ) from None
    return kwargs


def maybe_initialize(environ=None) -> bool:
    """Initialises jax.distributed if the environment asks for it; idempotent.

    Returns True when this is (now) a jax.distributed run, False for a plain single process.
    """
    kwargs = initialize_kwargs(environ)
    if jax.distributed.is_initialized():
        logging.info("jax.distributed already initialised")
    elif kwargs is None:
        return False
    else:
        jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    return True


def is_main_process() -> bool:
    """True on the process that writes logs, summaries and exported files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)

"""Multi-process start-up: call jax.distributed.initialize before anything touches a device.

Detection, in order:
  1. explicit arguments (main.py's --coordinator_address / --num_processes / --process_id);
  2. JAX_COORDINATOR_ADDRESS in the environment (with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or auto-detection);
  3. a multi-task SLURM job step (SLURM_NTASKS > 1), an Open MPI launch (OMPI_COMM_WORLD_SIZE > 1) or a multi-host
     Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several hosts): jax.distributed.initialize() with no arguments,
     whose cluster auto-detection reads those variables.
Otherwise the run is single-process and nothing is initialised.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def multi_process_environment() -> bool:
    if (_int_env("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialises jax.distributed when the run spans several processes; returns whether it did."""
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _int_env("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_env("JAX_PROCESS_ID")
    if coordinator_address:
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif multi_process_environment():
        jax.distributed.initialize()
    else:
        return False
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True

"""Multi-host runs (TPU pods, GPU clusters): joining the job, and which process writes files.

Every host runs the same command. `initialize("auto")` calls `jax.distributed.initialize()` when the
environment says this is one process of several (a TPU pod slice, SLURM/Open MPI with several tasks, or
explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Meshes then span every host's
devices; the host-side work (E-step CRF, mask clean-up) is deterministic, so every process computes the
same masks and no broadcast is needed. Checkpoints are written by all processes together (Orbax), so the
run folder must be on storage every host sees at the same path (a bucket mounted with gcsfuse, an NFS
share; URLs are refused); every other file is written by process 0 only.
"""

from __future__ import annotations

import os

import jax
import numpy as np

MODES = ("auto", "on", "off")


def _env_says_multi_process() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return True  # a TPU pod slice: one process per host
    for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(env.get(count, "1") or 1) > 1:
            return True
    return False


def initialize(mode: str = "auto") -> bool:
    """Join the multi-host job when `mode` (auto/on/off) says so; returns whether this is one of several
    processes. Must run before anything touches a JAX device."""
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not _env_says_multi_process()):
        return False
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        if env.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes (tests): no backend may start before this
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()  # TPU pods, SLURM, Open MPI: the cluster is detected
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0 writes the run folder's files (all processes take part in computing and checkpointing)."""
    return jax.process_index() == 0


def to_host(tree):
    """numpy copies of a pytree of arrays; arrays split over other hosts' devices are gathered first (a
    collective: every process must call it)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)

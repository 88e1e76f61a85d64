"""Several processes, one run: JAX's multi-controller runtime (TPU pod slices, multi-node GPUs).

Every process runs the same program on its own devices; jitted computations over the global mesh
are collective. This module holds what the rest of the code needs for that:

* :func:`initialize`: ``jax.distributed.initialize`` from flags or the environment, before any
  computation (on Cloud TPU and SLURM JAX finds the cluster itself); on CPU it selects the gloo
  collectives, so a multi-process run can be tested on one machine.
* :func:`is_main`: process 0 prints, logs and writes results, plots, metrics and TensorBoard.
* :func:`agree_max`, :func:`broadcast`, :func:`barrier`: decisions that every process must take
  together (save now, stop now, which checkpoint to resume, a file moved aside), so that no process
  ever waits alone in a collective.
* :func:`gather_rows`: a batch-sharded array as one host array on every process.

With one process every function is local and costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

ENV = {"coordinator_address": "SDCIL_COORDINATOR_ADDRESS", "num_processes": "SDCIL_NUM_PROCESSES",
       "process_id": "SDCIL_PROCESS_ID"}


def initialize(*, distributed: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start JAX's distributed runtime when asked; returns True if it was started.

    Asked means ``distributed=True`` (JAX detects Cloud TPU / SLURM / the ``JAX_*`` variables), or a
    coordinator address from the arguments or ``SDCIL_COORDINATOR_ADDRESS`` (then the process count
    and id come from the arguments or ``SDCIL_NUM_PROCESSES`` / ``SDCIL_PROCESS_ID``).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"]) or None
    if num_processes is None and os.environ.get(ENV["num_processes"]):
        num_processes = int(os.environ[ENV["num_processes"]])
    if process_id is None and os.environ.get(ENV["process_id"]):
        process_id = int(os.environ[ENV["process_id"]])
    if not (distributed or coordinator_address):
        return False
    if _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def _cpu_only() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or ""
    return platforms.strip().lower() == "cpu"


def is_main() -> bool:
    """True on the process that prints and writes (process 0)."""
    return jax.process_index() == 0


def multi() -> bool:
    return jax.process_count() > 1


def agree_max(values: Sequence[int]) -> list[int]:
    """Element-wise maximum of ``values`` over all processes (the same answer everywhere); e.g.
    ``[signal number or 0, save due]`` so that one process's SIGTERM stops every process."""
    local = np.asarray([int(v) for v in values], np.int64)
    if not multi():
        return [int(v) for v in local]
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(local))
    return [int(v) for v in every.reshape(-1, len(local)).max(axis=0)]


def broadcast(value: Any) -> Any:
    """Process 0's ``value`` (a pytree of numbers / numpy arrays) on every process."""
    if not multi():
        return value
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name``."""
    if multi():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_rows(x: jax.Array) -> np.ndarray:
    """A (batch-sharded or replicated) global array as a host array on every process."""
    if not multi() or getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def broadcast_text(text: str | None) -> str | None:
    """Process 0's string (or None) on every process."""
    if not multi():
        return text
    data = np.frombuffer(("" if text is None else "\x01" + text).encode("utf-8"), np.uint8)
    length = int(broadcast(np.int64(len(data))))
    buf = np.zeros((length,), np.uint8)
    if is_main():
        buf[:] = data
    out = bytes(np.asarray(broadcast(buf), np.uint8)).decode("utf-8") if length else ""
    return out[1:] if out else None

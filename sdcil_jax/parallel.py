"""Device mesh helpers: training is data-parallel with ``jax.jit`` over a 1-D ``data`` mesh.

Why jit + mesh rather than pmap for training: the same code runs on 1 device, many local devices and
many processes (``jax.process_count() > 1``), and batch-norm statistics are computed over the global
batch (the average of the per-device statistics) without any explicit collective in the model.
Stable Diffusion generation, in contrast, is pmapped (see ``sdcil_jax.generation``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full (e.g. batch indices) with ``sharding``.

    Each process only transfers the slices its own devices need, so this also works multi-host.
    """
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_replicated(tree, mesh: Mesh):
    """Replicate a pytree of host arrays on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: put_global(np.asarray(x), sharding), tree)


def fetch(tree):
    """Bring a (possibly replicated or sharded) pytree back to host numpy arrays."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)

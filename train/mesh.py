"""The training mesh and where batches live on it.

The mesh has the axes of :data:`lmzoo.sharding.MESH_AXES` (data, fsdp, tensor); params follow
:data:`lmzoo.sharding.LOGICAL_RULES` (the one rules table), batches are split on their leading (batch)
dimension over the ``batch`` rule (data x fsdp). On several hosts each host builds only its rows of the
global batch and :func:`global_batch` assembles the global array without any host seeing the rest.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmzoo.sharding import LOGICAL_RULES, make_mesh

from .config import MeshSection, TrainConfigError

__all__ = ["initialize_distributed", "mesh_from_config", "batch_spec", "batch_sharding", "global_batch", "host_rows"]

_initialized = False


def initialize_distributed() -> None:
    """``jax.distributed.initialize()`` once (coordinator and process ids come from the environment)."""
    global _initialized
    if not _initialized:
        jax.distributed.initialize()
        _initialized = True


def mesh_from_config(m: MeshSection, devices=None) -> Mesh:
    if m.distributed:
        initialize_distributed()
    try:
        return make_mesh({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}, devices=devices)
    except ValueError as e:
        raise TrainConfigError(f"mesh: {e}") from None


def batch_spec(ndim: int) -> PartitionSpec:
    """Leading dim over the mesh axes the ``batch`` logical name maps to; the rest replicated."""
    axes = dict(LOGICAL_RULES)["batch"]
    return PartitionSpec(axes, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def batch_shards(mesh: Mesh) -> int:
    axes = dict(LOGICAL_RULES)["batch"]
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def host_rows(global_batch_size: int) -> tuple[int, int]:
    """[start, stop) of this host's rows of the global batch (hosts take equal contiguous slices)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise TrainConfigError(f"data.batch_size {global_batch_size} is not divisible by {n} hosts")
    per = global_batch_size // n
    return i * per, (i + 1) * per


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], global_batch_size: int) -> dict[str, jax.Array]:
    """Assemble this host's rows into global arrays split over the batch axes of ``mesh``."""
    out: dict[str, Any] = {}
    for k, v in local.items():
        v = np.asarray(v)
        shape = (global_batch_size,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, shape)
    return out

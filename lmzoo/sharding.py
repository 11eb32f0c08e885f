"""Logical axis names and the one table that maps them onto mesh axes (``data``, ``fsdp``, ``tensor``).

Every parameter is created with logical names (``nn.with_logical_partitioning``); activations are
constrained with ``nn.with_logical_constraint``. ``LOGICAL_RULES`` decides where each name lives.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES",
    "LOGICAL_RULES",
    "make_mesh",
    "logical_to_sharding",
    "param_shardings",
    "shard_params",
]

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (None = replicated). Batch is split over data and fsdp; weights are
# split over fsdp on their embed side and over tensor on their heads/mlp/vocab side.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("kv_length", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("heads", "tensor"),
    ("kv", None),
    ("joined_kv", "tensor"),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("vocab", "tensor"),
    ("act_vocab", "tensor"),
    ("relpos_buckets", None),
    ("positions", None),
    ("layers", None),
    ("classes", None),
    ("norm", None),
)


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); ``shape`` may omit axes (size 1), -1 takes the rest."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if shape is None:
        shape = {"data": devices.size}
    if not isinstance(shape, dict):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = devices.size // rest
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {devices.size}")
    return Mesh(devices.reshape(sizes), MESH_AXES)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Map a pytree of logical PartitionSpecs to NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide the dimension (tiny test models, odd vocab sizes)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = tuple(a for a in names if dim % mesh.shape[a] == 0 and mesh.shape[a] > 1)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*out)


def param_shardings(abstract_params: Any, logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for params, given their shapes and logical specs (axes that don't divide are dropped)."""
    mesh_specs = nn.logical_to_mesh(logical_specs, list(rules))
    return jax.tree.map(
        lambda a, s: NamedSharding(mesh, _fit(s, tuple(a.shape), mesh)),
        abstract_params,
        mesh_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_params(params: Any, logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    shardings = param_shardings(params, logical_specs, mesh, rules)
    return jax.tree.map(lambda p, s: jax.device_put(p, s), params, shardings)

"""The train step: one jit-compiled function with explicit in/out shardings and a donated state.

The state is a plain dict ``{params, opt_state, step, rng}``. Params are placed by the model's logical
specs and :data:`lmzoo.sharding.LOGICAL_RULES`; optimizer moments that have a param's shape follow that
param's sharding (so fsdp/tensor split them too), the rest (counts, factored Adafactor rows) are
replicated. Batches are split on their leading dimension over the ``batch`` rule.

Gradient accumulation scans over micro-batches inside the step. Objectives return sums and a count,
so the update divides once by the global count and equals a single big batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmzoo.sharding import LOGICAL_RULES

from .config import OptimSection
from .mesh import batch_shards, batch_sharding
from .optim import make_optimizer, make_schedule

__all__ = ["Trainer"]


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


class Trainer:
    """Compiles and runs the train and eval steps of ``objective`` on ``model`` over ``mesh``."""

    def __init__(self, model, objective, optim: OptimSection, mesh: Mesh, *, total_steps: int, z_loss: float = 0.0):
        self.model, self.objective, self.mesh = model, objective, mesh
        self.optim = optim
        self.tx = make_optimizer(optim, total_steps)
        self.schedule = make_schedule(optim, total_steps)
        self.accum = int(optim.accum_steps)
        self.z_loss = float(z_loss)
        self.param_shardings = model.param_shardings(mesh)
        abstract_params = model.abstract_params()
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        rep = _replicated(mesh)
        opt_shardings = optax.tree_map_params(
            self.tx,
            lambda leaf, p, s: s if tuple(leaf.shape) == tuple(p.shape) else rep,
            abstract_opt,
            abstract_params,
            self.param_shardings,
            transform_non_params=lambda _: rep,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
        self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings, "step": rep, "rng": rep}
        self._abstract_state = {
            "params": abstract_params,
            "opt_state": abstract_opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        }
        self._train_compiled: dict = {}
        self._eval_compiled: dict = {}
        self.flops_per_step: Optional[float] = None

    # -- state ---------------------------------------------------------------------------------
    def abstract_state(self) -> dict:
        """ShapeDtypeStructs carrying this mesh's shardings (the restore target when resharding)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self._abstract_state,
            self.state_shardings,
        )

    def init_state(self, params: Any = None, seed: int = 0, *, copy: bool = True) -> dict:
        """The step-0 state. The state is donated to each step, so by default params are copied and the
        caller's stay alive; ``copy=False`` hands them over (no second copy of a large model)."""
        params = self.model.params if params is None else params
        params = jax.device_put(params, self.param_shardings, may_alias=not copy)
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        rep = _replicated(self.mesh)
        return {
            "params": params,
            "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
            "rng": jax.device_put(jax.random.PRNGKey(seed), rep),
        }

    # -- the step ------------------------------------------------------------------------------
    def _sums(self, params, batch, rng):
        with nn.logical_axis_rules(LOGICAL_RULES):
            sums = self.objective.loss(self.model, params, batch, rng, z_loss=self.z_loss)
        return sums["loss"], sums

    def _train_step(self, state, batch):
        params = state["params"]
        rng, step_rng = jax.random.split(state["rng"])
        grad_fn = jax.value_and_grad(self._sums, has_aux=True)
        if self.accum == 1:
            (_, sums), grads = grad_fn(params, batch, step_rng)
        else:
            A = self.accum
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // A, A) + x.shape[1:]), 0, 1), batch)

            def body(carry, xs):
                g_acc, s_acc = carry
                mb, k = xs
                (_, s), g = grad_fn(params, mb, jax.random.fold_in(step_rng, k))
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

            first = jax.tree.map(lambda x: x[0], micro)
            sums_shape = jax.eval_shape(lambda: self._sums(params, first, step_rng)[1])
            zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
            (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(A)))
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = self._ratios(sums)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = self.schedule(state["step"])
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        return new_state, metrics

    @staticmethod
    def _ratios(sums: Mapping[str, jax.Array]) -> dict:
        count = jnp.maximum(sums["count"], 1.0)
        out = {k: v / count for k, v in sums.items() if k not in ("count",)}
        if "correct" in out:
            out["accuracy"] = out.pop("correct")
        out["count"] = sums["count"]
        return out

    def _batch_shardings(self, batch):
        return {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def _check_batch(self, batch):
        n = next(iter(batch.values())).shape[0]
        shards = batch_shards(self.mesh) * self.accum
        if n % shards:
            raise ValueError(f"global batch {n} must be divisible by the batch shards x accum_steps ({shards})")

    def compile_train(self, batch) -> Any:
        key = tuple((k, tuple(np.shape(v)), str(np.asarray(v).dtype) if not isinstance(v, jax.Array) else str(v.dtype)) for k, v in sorted(batch.items()))
        fn = self._train_compiled.get(key)
        if fn is None:
            self._check_batch(batch)
            jitted = jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self._batch_shardings(batch)),
                out_shardings=(self.state_shardings, _replicated(self.mesh)),
                donate_argnums=(0,),
            )
            abstract_batch = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in batch.items()}
            with jax.set_mesh(self.mesh):
                fn = jitted.lower(self._abstract_state, abstract_batch).compile()
            try:
                cost = fn.cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                self.flops_per_step = float(cost.get("flops", 0.0)) or None
            except Exception:  # cost analysis is best effort (not every backend provides it)
                self.flops_per_step = None
            self._train_compiled[key] = fn
        return fn

    def train_step(self, state, batch):
        """One optimiser step on a global batch (dict of jax arrays or numpy); returns (state, metrics)."""
        fn = self.compile_train(batch)
        with jax.set_mesh(self.mesh):
            return fn(state, batch)

    def eval_step(self, params, batch) -> dict:
        key = tuple((k, tuple(np.shape(v))) for k, v in sorted(batch.items()))
        fn = self._eval_compiled.get(key)
        if fn is None:
            self._check_batch(batch)
            fn = jax.jit(
                lambda p, b: self._sums(p, b, jax.random.PRNGKey(0))[1],
                in_shardings=(self.param_shardings, self._batch_shardings(batch)),
                out_shardings=_replicated(self.mesh),
            )
            self._eval_compiled[key] = fn
        with jax.set_mesh(self.mesh):
            return fn(params, batch)

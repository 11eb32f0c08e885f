"""Shared layers: linears, embeddings and norms with logical axis names, attention, relative buckets.

Family files compose these and state only what differs. Params are plain arrays named ``kernel``
([in, out], i.e. the transpose of a torch ``Linear.weight``), ``bias``, ``embedding``, ``scale``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Linear",
    "Embed",
    "RMSNorm",
    "LayerNorm",
    "ACTIVATIONS",
    "dot_product_attention",
    "t5_relative_position_bucket",
    "constrain",
]

Array = jax.Array
default_init = nn.initializers.normal(stddev=0.02)


def constrain(x: Array, names: Sequence[Optional[str]]) -> Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(names))


# Rows (a decoding step's batch x beams) in this range count as "few": on CPU, XLA's matmul kernels run
# ``x @ w`` with few rows of x at ~40 % of the speed of ``(w' @ x.T).T`` with the weight stored out-major
# (w' [out, in], the input dimension contiguous) — T5-base, 8 rows: 768x3072 0.80 -> 0.47 ms, the tied LM
# head 768x32128 12.3 -> 5.7 ms. One row (a matrix-vector product) gains less but still gains: T5-base's
# twelve decoder layers read their matrices at ~19-23 GB/s in ``x @ w`` and ~25-31 GB/s out-major. From
# ~48 rows on the two forms take about the same time.
FEW_ROWS = (1, 32)


def few_rows(rows: int) -> bool:
    """Whether a matmul with this many rows should take the out-major form (CPU, 1 to 32 rows)."""
    return jax.default_backend() == "cpu" and FEW_ROWS[0] <= rows <= FEW_ROWS[1]


def few_rows_dot(x: Array, w_out_in: Array) -> Array:
    """``x @ w_out_in.T`` for x [..., K] and an out-major weight [N, K], computed as ``(w_out_in @ x.T).T``.

    The matmul's own [N, rows] result is kept behind an optimisation barrier and transposed afterwards
    (left alone, XLA folds the transpose back into the matmul and runs the slow ``x @ w`` form).
    """
    lead = x.shape[:-1]
    yt = jax.lax.dot_general(w_out_in, x.reshape(-1, x.shape[-1]), (((1,), (1,)), ((), ())))
    return jax.lax.optimization_barrier(yt).T.reshape(lead + (w_out_in.shape[0],))


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)`` with kernel [in, out] carrying logical axes ``axes``.

    Given an out-major copy ``kernel_t`` [out, in] beside the kernel (made by the decoding loop for steps with
    few rows, see :func:`few_rows_dot`), it multiplies by that instead; the result is the same product.
    """

    features: int
    axes: tuple[str, str] = ("embed", "mlp")
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = default_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        if self.has_variable("params", "kernel_t"):  # an [out, in] copy made for few-row decoding steps
            y = few_rows_dot(x.astype(self.dtype), self.get_variable("params", "kernel_t").astype(self.dtype))
        else:
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)), (self.features,), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """Token embedding table [num, features]; ``attend`` multiplies by its transpose (tied heads)."""

    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Callable = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        if few_rows(math.prod(x.shape[:-1])):  # the table is already out-major ([vocab, features])
            return few_rows_dot(x.astype(self.dtype), self.embedding.astype(self.dtype))
        return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


class RMSNorm(nn.Module):
    """T5 LayerNorm: ``w * x / sqrt(mean(x^2) + eps)``, statistics in float32, no bias, no centring."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.epsilon)
        return (y.astype(self.param_dtype) * scale).astype(self.dtype)


class LayerNorm(nn.Module):
    """Standard LayerNorm with weight and bias; statistics in float32."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def gelu_new(x):
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": gelu_exact,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu_fast": gelu_new,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


F32_MIN = float(np.finfo(np.float32).min)  # transformers' fill for masked attention scores


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    bias: Optional[Array] = None,
    mask: Optional[Array] = None,
    scale: float = 1.0,
    dtype: Any = jnp.float32,
    mask_value: Optional[float] = None,
    kv_layout: str = "blhd",
) -> tuple[Array, Array]:
    """Plain XLA attention. q [B,Lq,H,D], k/v [B,Lk,H,D]; bias/mask broadcast to [B,H,Lq,Lk].

    Masked scores are replaced by ``mask_value`` (default: the float32 minimum, as transformers
    does, so a fully masked row attends uniformly instead of producing NaN). Softmax in float32.
    ``kv_layout`` names how k and v are laid out: "blhd" (above), "bhld" or "bhdl", or a pair
    (k layout, v layout) — decoding keeps its caches head-major so that every step's matmuls read them
    without a transpose.

    The values are weighted by the unnormalised ``exp(s - max)`` and the result divided by the row sums
    afterwards (one division per output element instead of one per score). On CPU XLA then fuses the
    exponential, the sums and the matmul into one kernel that runs on every core; normalising first
    gave a slower single-threaded matmul (T5-base, batch 8 x 256 tokens: ~1.2-1.7x the attention time).
    With the default fill the mask is *added* (0 or the float32 minimum) instead of selected: that is the
    same number for every score below 2**103 in magnitude (the minimum absorbs it), and an addition, unlike
    a select, lets XLA's CPU backend fuse the scores' matmul with the softmax's maximum and exponential,
    which runs it on every core too (~2x for the whole attention at the T5-base shapes above).
    Returns (out [B,Lq,H,D], probs [B,H,Lq,Lk]); the probabilities cost nothing unless used.
    """
    kv = KV_LAYOUTS[kv_layouts(kv_layout)[0]]
    scores = jnp.einsum(f"bqhd,{kv}->bhqk", q.astype(dtype) * jnp.asarray(scale, dtype) if scale != 1.0 else q.astype(dtype), k.astype(dtype))
    scores = scores.astype(jnp.float32)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    fill = F32_MIN if mask_value is None else float(mask_value)
    out = softmax_weighted_values(scores, mask, v, fill, _values_equation(kv_layout), jnp.dtype(dtype))
    return _head_major_output(out), jax.nn.softmax(_masked(scores, mask, fill), axis=-1)


def _masked(scores: Array, mask: Optional[Array], fill: float) -> Array:
    """Masked scores replaced by ``fill``."""
    return scores if mask is None else jnp.where(mask, scores, fill)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def softmax_weighted_values(scores: Array, mask: Optional[Array], v: Array, fill: float, equation: str, dtype) -> Array:
    """``einsum(equation, softmax(scores with masked ones replaced by fill), v)``, the masked scores added
    the float32 minimum instead when that is the fill, and the division by the row sums done last (see
    :func:`dot_product_attention`). Differentiated (training), it is the replace-then-softmax-first form,
    values and derivatives: the two differ by rounding only, and gradients keep the form they always had
    (a masked score gets none, also in a row with every key masked)."""
    if mask is not None and fill == F32_MIN:
        scores = scores + jnp.where(mask, 0.0, fill).astype(scores.dtype)
    else:
        scores = _masked(scores, mask, fill)
    e = jnp.exp(scores - scores.max(-1, keepdims=True))
    out = jnp.einsum(equation, e.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
    return (out / e.sum(-1, keepdims=True)).astype(dtype)


@softmax_weighted_values.defjvp
def _softmax_weighted_values_jvp(fill, equation, dtype, primals, tangents):
    scores, mask, v = primals
    d_scores, _, d_v = tangents

    def softmax_first(scores, v):
        probs = jax.nn.softmax(_masked(scores, mask, fill), axis=-1)
        return jnp.einsum(equation, probs.astype(dtype), v.astype(dtype))

    return jax.jvp(softmax_first, (scores, v), (d_scores, d_v))


def weighted_values(probs: Array, v: Array, *, kv_layout: str = "blhd", dtype: Any = jnp.float32) -> Array:
    """``sum_k probs[b,h,q,k] v[b,k,h,:]`` as [B,Lq,H,D] (v laid out as ``kv_layout`` names)."""
    out = jnp.einsum(_values_equation(kv_layout), probs.astype(dtype), v.astype(dtype))
    return _head_major_output(out)


def _values_equation(kv_layout) -> str:
    """einsum of weights [B,H,Lq,Lk] with values laid out as ``kv_layout`` names, giving [B,H,Lq,D]."""
    return f"bhqk,{KV_LAYOUTS[kv_layouts(kv_layout)[1]]}->bhqd"


def _head_major_output(out: Array) -> Array:
    """[B,H,Lq,D] -> [B,Lq,H,D], transposed after the matmul that made it."""
    if jax.default_backend() == "cpu":
        # Keep the matmul's own [B,H,Lq,D] output and transpose it afterwards: left alone, XLA's CPU layout
        # assignment folds the transpose into the matmul, which then runs several times slower (the
        # attention of a T5-base forward at batch 8 took 1.8x as long). The values are the same.
        out = jax.lax.optimization_barrier(out)
    return jnp.swapaxes(out, 1, 2)


# einsum operand spelling (k: key index) of each key/value layout dot_product_attention accepts
KV_LAYOUTS = {"blhd": "bkhd", "bhld": "bhkd", "bhdl": "bhdk"}


KV_LENGTH_AXIS = {"blhd": 1, "bhld": 2, "bhdl": 3}


def kv_layouts(kv_layout) -> tuple[str, str]:
    """(k layout, v layout) from one layout name for both or a pair; unknown names raise ValueError."""
    pair = (kv_layout, kv_layout) if isinstance(kv_layout, str) else tuple(kv_layout)
    if len(pair) != 2 or any(x not in KV_LAYOUTS for x in pair):
        raise ValueError(f"kv_layout must be one of {sorted(KV_LAYOUTS)} or a (k, v) pair of them, got {kv_layout!r}")
    return pair


# Decoding keeps keys [N, H, d, S] and values [N, H, S, d], the layouts a step's q·k and weighted sum read as
# they are (with [N, S, H, d] caches XLA transposes every cache in every step).
DECODE_KV_LAYOUT = ("bhdl", "bhld")


def decode_kv(k: Array, v: Array) -> tuple[Array, Array]:
    """k, v [N, L, H, d] in the decoding layouts (:data:`DECODE_KV_LAYOUT`)."""
    return jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))


def empty_decode_cache(layers: int, n: int, heads: int, head_dim: int, length: int, dtype) -> list:
    """Per layer an all-zero (k, v) cache of ``length`` positions in the decoding layouts."""
    k = jnp.zeros((n, heads, head_dim, length), dtype)
    v = jnp.zeros((n, heads, length, head_dim), dtype)
    return [(k, v) for _ in range(layers)]


def write_decode_cache(cache, k: Array, v: Array, index) -> tuple[Array, Array]:
    """The (k, v) cache (decoding layouts) with one new position's k, v [N, 1, H, d] written at ``index``."""
    kc, vc = cache
    k, v = decode_kv(k, v)
    return (jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), index, axis=3),
            jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), index, axis=2))


def t5_relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of ``rel = key_pos - query_pos`` (transformers ``_relative_position_bucket``).

    Works on numpy or jax integer arrays; the log is taken in float32 and truncated toward zero.
    """
    xp = jnp if isinstance(relative_position, jax.Array) else np
    rel = relative_position
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (rel > 0).astype(xp.int32) * num_buckets
        rel = xp.abs(rel)
    else:
        rel = -xp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    relf = xp.maximum(rel, 1).astype(xp.float32)
    large = xp.log(relf / xp.float32(max_exact)) / xp.float32(math.log(max_distance / max_exact)) * xp.float32(
        num_buckets - max_exact
    )
    large = max_exact + large.astype(xp.int32)
    large = xp.minimum(large, num_buckets - 1)
    return buckets + xp.where(is_small, rel, large).astype(xp.int32)

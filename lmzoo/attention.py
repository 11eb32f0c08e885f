"""One attention entry point for every family: the XLA reference or the Pallas block-sparse kernel.

``attend`` takes the mask and relative-position bias in factored form — key mask [B, Lk], causal with a
query offset, GLM's per-example prefix, a small bias table [num_buckets, H] plus a bucket function of
``rel = key_pos - query_pos`` — and either materialises them for the plain XLA path
(``attention_impl="xla"``, the numerical reference) or hands them to the Pallas kernel
(``attention_impl="pallas"``), which computes masks and bias in-kernel and never builds an Lq x Lk
array. Masked scores get the float32 minimum added, as the originals' additive masks do, so a fully
masked row attends uniformly in both paths. Packed rows (several examples per row, T5X-style) pass
segment ids: a key is visible only to queries of its own segment.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from .layers import F32_MIN, KV_LENGTH_AXIS, dot_product_attention, kv_layouts, weighted_values

__all__ = ["attend", "kernel_block", "segment_positions", "check_segment_pair"]


def kernel_block(length: int, preferred: int = 128) -> int:
    """Kernel block size for a sequence: ``preferred`` for long inputs, a power of two >= 16 for short."""
    b = 16
    while b < min(length, preferred):
        b *= 2
    return b


def segment_positions(segment_ids):
    """[B, L] int32: each token's index within its run of equal segment ids (0, 1, ... restarting at every
    segment), the positions an unpacked row would give it."""
    seg = jnp.asarray(segment_ids)
    idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def check_segment_pair(segment_ids, decoder_segment_ids) -> None:
    """Packed encoder-decoder rows need both: cross-attention matches each decoder segment to its encoder one."""
    if (segment_ids is None) != (decoder_segment_ids is None):
        raise ValueError("packed rows need segment_ids and decoder_segment_ids together (cross-attention matches "
                         "each decoder segment to its encoder segment)")


@functools.lru_cache(maxsize=64)
def _layout(kind: str, lq: int, lk: int, bq: int, bk: int):
    from lmzoo.kernels.block_sparse_attention import causal_layout, dense_layout

    if kind == "causal":
        return causal_layout(lq, lk, bq, bk, q_offset=max(lk - lq, 0))
    return dense_layout(lq, lk, bq, bk)


def attend(
    q,
    k,
    v,
    *,
    impl: str = "xla",
    scale: float = 1.0,
    key_mask=None,
    causal: bool = False,
    q_offset=0,
    prefix_len=None,
    bias_table=None,
    bucket_fn: Optional[Callable] = None,
    mask_value: Optional[float] = F32_MIN,
    probs_fn: Optional[Callable] = None,
    dtype=jnp.float32,
    replace_masked: bool = False,
    q_segment_ids=None,
    kv_segment_ids=None,
    kv_layout: str = "blhd",
):
    """Softmax attention of q [B,Lq,H,D] over k/v [B,Lk,H,D]; returns [B,Lq,H,D] in ``dtype``.

    key_mask: [B, Lk] truthy = visible. causal: key j visible to query i iff j <= q_offset + i, or (with
    prefix_len [B]) j < prefix_len[b]. bias_table [num_buckets, H] with bucket_fn(rel int32 array) ->
    bucket ids adds ``bias_table[bucket_fn(j - (q_offset + i))]`` to the scores. q_offset is an int or a
    traced int32 scalar (KV-cache decoding). mask_value: a float is added to masked scores in the kernel
    and replaces them in the XLA path (a fully masked row attends uniformly in both); None gives hard
    masking in the kernel (such a row outputs 0) and the float32 minimum in the XLA path, the two agreeing
    on every row with a visible key. probs_fn (XLA path only, e.g. attention dropout) maps the
    probabilities [B,H,Lq,Lk] before they weight v; the kernel has none and refuses it.

    q_segment_ids [B, Lq] / kv_segment_ids [B, Lk] (int, given together): packed rows. Key j is visible
    to query i only if their ids are equal, on top of every other rule (key mask, causal). By convention
    0 marks padding and real examples are numbered 1, 2, ... in each row, so padding keys are hidden from
    every real query even without a key mask (padding queries see only padding; their outputs are
    meaningless, as for any padded position). Relative positions stay ``j - (q_offset + i)``: within one
    segment that is the distance an unpacked row would see.

    replace_masked: the original *replaces* masked scores by a constant (GLM's -65504, PALM's -1e18), so
    masked scores get no gradient, also in a fully masked row (which attends uniformly over all Lk keys).
    The XLA path does that already; the kernel then runs with hard masking (a fully masked row outputs 0
    with zero gradients) and such rows, found in O(B·(Lq+Lk)) from the factored masks, get the mean of all
    values, whose gradient reaches v only, as the original's does. (Adding the float32 minimum gives the
    same forward, but its backward passes a softmax gradient to the scores of a fully masked row.)

    kv_layout: "blhd" (k/v [B,Lk,H,D]), "bhld" or "bhdl", or a pair (k layout, v layout). Decoding loops
    keep their caches head-major in the layouts the XLA step's matmuls read as they are (keys [.., D, Lk]
    for q·k, values [.., Lk, D] or [.., D, Lk] for the weighted sum), so no cache is transposed in every
    step.
    """
    B, Lq, H, _ = q.shape
    k_layout, v_layout = kv_layouts(kv_layout)
    Lk = k.shape[KV_LENGTH_AXIS[k_layout]]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids go together")
    if q_segment_ids is not None and replace_masked:
        raise ValueError("segment ids with replace_masked are not supported (no family packs rows that need it)")
    if impl == "pallas":
        if probs_fn is not None:
            raise ValueError("attention_impl='pallas' has no attention-probability dropout; run deterministic, "
                             "set the attention dropout to 0, or use attention_impl='xla'")
        from lmzoo.kernels.block_sparse_attention import block_sparse_attention, relative_positions

        order = {"blhd": (0, 1, 2, 3), "bhld": (0, 2, 1, 3), "bhdl": (0, 3, 1, 2)}  # the kernel reads [B, L, H, D]
        k, v = jnp.transpose(k, order[k_layout]), jnp.transpose(v, order[v_layout])

        bq, bk = kernel_block(Lq), kernel_block(Lk)
        # decoding with a cache: q_offset is traced; the causal layout must cover every offset
        layout = _layout("causal" if causal and prefix_len is None and isinstance(q_offset, int) else "dense", Lq, Lk, bq, bk)
        buckets = None
        if bias_table is not None:
            q_off_max = Lk if not isinstance(q_offset, int) else q_offset
            buckets = bucket_fn(jnp.asarray(relative_positions(Lq, Lk, q_off_max)))
        qo = q_offset if isinstance(q_offset, int) else jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
        out = block_sparse_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), layout, scale=scale, causal=causal, q_offset=qo,
            prefix_len=prefix_len, key_mask=key_mask, bias_table=bias_table, bias_buckets=buckets,
            mask_value=None if replace_masked else mask_value, qkv_layout="blhd",
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        )
        if replace_masked:
            empty = _rows_without_visible_key(B, Lq, Lk, key_mask, causal, q_offset, prefix_len)
            if empty is not None:
                uniform = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)  # [B,1,H,D]
                out = jnp.where(empty[:, :, None, None], uniform, out)
        return out.astype(dtype)
    if impl != "xla":
        raise ValueError(f"attention_impl must be 'xla' or 'pallas', got {impl!r}")
    qpos = q_offset + jnp.arange(Lq)
    kpos = jnp.arange(Lk)
    bias = None
    if bias_table is not None:
        rel = kpos[None, :] - qpos[:, None]
        bias = jnp.transpose(jnp.take(bias_table, bucket_fn(rel), axis=0), (2, 0, 1))[None].astype(jnp.float32)
    mask = None
    if causal:
        vis = kpos[None, :] <= qpos[:, None]
        vis = vis[None, None]
        if prefix_len is not None:
            vis = vis | (kpos[None, None, None, :] < prefix_len[:, None, None, None])
        mask = vis
    if key_mask is not None:
        km = key_mask[:, None, None, :].astype(bool)
        mask = km if mask is None else mask & km
    if q_segment_ids is not None:
        same = jnp.asarray(q_segment_ids)[:, None, :, None] == jnp.asarray(kv_segment_ids)[:, None, None, :]
        mask = same if mask is None else mask & same
    if probs_fn is None:
        out, _ = dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, dtype=dtype, mask_value=mask_value, kv_layout=kv_layout
        )
        return out
    if (k_layout, v_layout) != ("blhd", "blhd"):
        raise ValueError("probs_fn takes keys and values as [B, L, H, D] (kv_layout='blhd')")
    qs = q.astype(dtype) * jnp.asarray(scale, dtype) if scale != 1.0 else q.astype(dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", qs, k.astype(dtype)).astype(jnp.float32)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, F32_MIN if mask_value is None else mask_value)
    probs = probs_fn(jax.nn.softmax(scores, axis=-1))
    return weighted_values(probs, v, dtype=dtype)


def _rows_without_visible_key(B, Lq, Lk, key_mask, causal, q_offset, prefix_len):
    """[B, Lq] bool: query rows that see no key under the factored masks (None when none can be empty).

    Visibility is monotone in the key index for every rule (a prefix, ``j <= q_offset + i``), so a row sees
    some key iff it sees the first key the key mask allows.
    """
    if key_mask is None and not causal:
        return None
    if key_mask is None:
        first = jnp.zeros((B,), jnp.int32)
        has_key = jnp.ones((B,), bool)
    else:
        km = jnp.asarray(key_mask).astype(bool)
        first = jnp.argmax(km, axis=1).astype(jnp.int32)
        has_key = jnp.any(km, axis=1)
    seen = jnp.broadcast_to(has_key[:, None], (B, Lq))
    if causal:
        qpos = jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1, 1)) + jnp.arange(Lq, dtype=jnp.int32)[None]
        ok = first[:, None] <= qpos
        if prefix_len is not None:
            ok = ok | (first < jnp.asarray(prefix_len, jnp.int32))[:, None]
        seen = seen & ok
    return ~seen

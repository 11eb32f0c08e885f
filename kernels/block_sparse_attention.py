"""Flash-style block-sparse attention: one Pallas kernel and its plain-jnp reference.

`block_sparse_attention` (Pallas) and `block_sparse_attention_reference` (jnp) take the same arguments and
compute the same thing: softmax attention of every query over

  * the *main* keys, restricted to a static block layout (`BlockLayout`: for each query block the key
    blocks it visits), with masks computed inside the visited blocks (causal with a query offset, GLM's
    prefix rule, key padding, segment ids) and an optional relative-position bias read from a small
    `[num_buckets, H]` table through an O(L) bucket-per-distance vector;
  * optional *extra* keys attended by every query (LSG global tokens);
  * optional *block-extra* keys attended by one group of query blocks each (LSG sparse tokens);

all under one softmax. Neither implementation ever builds an Lq x Lk score, mask or bias array: the
kernel keeps an online softmax per query block, the reference gathers each query block's visited key
blocks. Forward and backward of the kernel are Pallas kernels (`jax.custom_vjp`: one kernel for dq and
the bias-table gradient, one per key stream for dk/dv). The kernels lower to Triton (GPU) and Mosaic
(TPU); on TPU, block sizes Mosaic cannot tile fall back to the reference. See docs/kernels.md for the
conventions and what has been checked on which backend.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

__all__ = [
    "BlockLayout",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "causal_layout",
    "dense_layout",
    "local_layout",
    "lsg_layout",
    "prefix_layout",
    "relative_positions",
]

# ----------------------------------------------------------------------------------------------------
# Static block layouts
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block visits.

    indices: int32 [Hl, nq, max_count]: key-block numbers of query block i (head h, or all heads when
      Hl == 1) in entries [0, counts[h, i]); later entries repeat the last valid one and are never read.
    counts: int32 [Hl, nq]: the number of valid entries per query block.
    Query block i covers query rows [i * block_q, (i + 1) * block_q); key block j covers key rows
    [j * block_k, (j + 1) * block_k). The arrays are numpy (static): the kernel's loop over a query
    block runs `counts[h, i]` times, so blocks not listed cost nothing.
    """

    indices: np.ndarray
    counts: np.ndarray
    block_q: int
    block_k: int
    num_k_blocks: int

    def __post_init__(self):
        idx = np.asarray(self.indices, np.int32)
        cnt = np.asarray(self.counts, np.int32)
        if idx.ndim != 3 or cnt.shape != idx.shape[:2]:
            raise ValueError(f"layout indices must be [Hl, nq, max_count] and counts [Hl, nq]; got "
                             f"{idx.shape} and {cnt.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_k_blocks):
            raise ValueError("layout indices out of range [0, num_k_blocks)")
        if cnt.size and (cnt.min() < 0 or cnt.max() > idx.shape[2]):
            raise ValueError("layout counts out of range [0, max_count]")
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "counts", cnt)

    @property
    def num_heads(self) -> int:
        return self.indices.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.indices.shape[1]

    @property
    def max_count(self) -> int:
        return self.indices.shape[2]

    @classmethod
    def from_block_mask(cls, block_mask, block_q: int, block_k: int) -> "BlockLayout":
        """Builds the layout from a boolean [nq, nk] or [Hl, nq, nk] block mask (True = visit)."""
        m = np.asarray(block_mask, bool)
        if m.ndim == 2:
            m = m[None]
        hl, nq, nk = m.shape
        counts = m.sum(-1).astype(np.int32)
        max_count = max(int(counts.max()) if counts.size else 0, 1)
        indices = np.zeros((hl, nq, max_count), np.int32)
        for h in range(hl):
            for i in range(nq):
                cols = np.nonzero(m[h, i])[0]
                if len(cols):
                    indices[h, i, :len(cols)] = cols
                    indices[h, i, len(cols):] = cols[-1]
        return cls(indices, counts, block_q, block_k, nk)

    def block_mask(self) -> np.ndarray:
        """The boolean [Hl, nq, nk] block mask this layout visits."""
        hl, nq, _ = self.indices.shape
        m = np.zeros((hl, nq, self.num_k_blocks), bool)
        for h in range(hl):
            for i in range(nq):
                m[h, i, self.indices[h, i, :self.counts[h, i]]] = True
        return m

    def transpose(self) -> "BlockLayout":
        """For each key block, the query blocks that visit it (block sizes swapped)."""
        t = np.swapaxes(self.block_mask(), 1, 2)
        return BlockLayout.from_block_mask(t, self.block_k, self.block_q)

    def _key(self):
        return (self.indices.tobytes(), self.indices.shape, self.counts.tobytes(), self.block_q,
                self.block_k, self.num_k_blocks)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, BlockLayout) and self._key() == other._key()


def _block_ranges(length: int, block: int):
    n = -(-length // block)
    start = np.arange(n) * block
    return n, start, np.minimum(start + block, length) - 1


def dense_layout(lq: int, lk: int, block_q: int = 128, block_k: int = 128) -> BlockLayout:
    """Every query block visits every key block."""
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    return BlockLayout.from_block_mask(np.ones((nq, nk), bool), block_q, block_k)


def causal_layout(lq: int, lk: int, block_q: int = 128, block_k: int = 128,
                  q_offset: int = 0) -> BlockLayout:
    """Key blocks holding at least one key j <= q_offset + i for some query i of the block."""
    nq, _, q_last = _block_ranges(lq, block_q)
    nk, k_first, _ = _block_ranges(lk, block_k)
    m = k_first[None, :] <= (q_offset + q_last)[:, None]
    return BlockLayout.from_block_mask(m, block_q, block_k)


def local_layout(lq: int, lk: int, block_q: int = 128, block_k: int = 128, window_left: int = 128,
                 window_right: int = 128, q_offset: int = 0) -> BlockLayout:
    """A band: query block [q0, q1] visits key blocks meeting [q0 - window_left, q1 + window_right]
    (positions in tokens, query i at position q_offset + i)."""
    nq, q_first, q_last = _block_ranges(lq, block_q)
    nk, k_first, k_last = _block_ranges(lk, block_k)
    lo = (q_offset + q_first - window_left)[:, None]
    hi = (q_offset + q_last + window_right)[:, None]
    m = (k_last[None, :] >= lo) & (k_first[None, :] <= hi)
    return BlockLayout.from_block_mask(m, block_q, block_k)


def prefix_layout(lq: int, lk: int, block_q: int = 128, block_k: int = 128, max_prefix: int = 0,
                  q_offset: int = 0) -> BlockLayout:
    """GLM: the causal blocks plus every key block meeting [0, max_prefix) (bidirectional prefix).

    max_prefix bounds the per-example `prefix_len` passed to the attention call; the in-kernel rule
    (key j visible iff j < prefix_len[b] or j <= q position) does the exact masking.
    """
    causal = causal_layout(lq, lk, block_q, block_k, q_offset).block_mask()[0]
    _, k_first, _ = _block_ranges(lk, block_k)
    m = causal | (k_first < max_prefix)[None, :]
    return BlockLayout.from_block_mask(m, block_q, block_k)


def lsg_layout(num_tokens: int, lsg_block: int, block_q: Optional[int] = None,
               block_k: Optional[int] = None) -> BlockLayout:
    """The local part of LSG attention over the token part (globals and sparse keys are extra keys).

    LSG query block i (tokens [i*B, (i+1)*B), B = lsg_block) sees the local window of tokens
    [(i-1)*B, (i+2)*B). Kernel blocks default to the LSG block; smaller blocks that divide it are
    allowed (each visits the window of its LSG block, 3*B/block_k key blocks).
    """
    block_q = block_q or lsg_block
    block_k = block_k or lsg_block
    if lsg_block % block_q or lsg_block % block_k:
        raise ValueError(f"kernel blocks ({block_q}, {block_k}) must divide the LSG block {lsg_block}")
    nq, q_first, _ = _block_ranges(num_tokens, block_q)
    nk, k_first, k_last = _block_ranges(num_tokens, block_k)
    g = q_first // lsg_block
    lo, hi = ((g - 1) * lsg_block)[:, None], ((g + 2) * lsg_block - 1)[:, None]
    m = (k_last[None, :] >= lo) & (k_first[None, :] <= hi)
    return BlockLayout.from_block_mask(m, block_q, block_k)


def relative_positions(lq: int, lk: int, q_offset_max: int = 0) -> np.ndarray:
    """The relative distances rel = key_pos - query_pos that a bias-bucket vector must cover, in order.

    Apply the family's bucket function to this vector to get `bias_buckets`:
    `bias_buckets[t]` is the bucket of rel = t - (len(bias_buckets) - lk). With queries at positions
    q_offset + i (q_offset <= q_offset_max) every distance that occurs lies inside this range.
    """
    return np.arange(-(lq - 1 + q_offset_max), lk, dtype=np.int32)


# ----------------------------------------------------------------------------------------------------
# Input canonicalisation shared by the kernel and the reference
# ----------------------------------------------------------------------------------------------------


class _Static(NamedTuple):
    """Hashable description of one call (everything the kernels are specialised on)."""
    batch: int
    heads: int
    head_dim: int
    lq: int
    lk: int
    qkv_layout: str
    layout: BlockLayout
    scale: float
    mask_value: Optional[float]
    causal: bool
    has_prefix: bool
    has_segments: bool
    num_buckets: int  # 0: no bias
    num_rel: int
    has_extra: bool
    extra_len: int  # padded
    extra_block: int
    extra_mask_heads: int
    has_block_extra: bool
    block_extra_len: int  # padded S
    block_extra_groups: int
    block_extra_mask_heads: int
    interpret: Any
    backend: str
    debug: bool


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _seq_axis(qkv_layout: str) -> int:
    return 2 if qkv_layout == "bhld" else 1


def _pad_seq(x, length: int, qkv_layout: str):
    ax = _seq_axis(qkv_layout)
    if x.shape[ax] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[ax] = (0, length - x.shape[ax])
    return jnp.pad(x, pad)


def _key_mask_array(mask, batch: int, heads: int, length: int, padded: int, name: str):
    """A user key mask ([B, L] or [B, H, L], truthy = visible) as int32 [B, Hm, padded]:
    1 visible, 0 masked, -1 absent (padding added here)."""
    if mask is None:
        m = jnp.ones((batch, 1, length), jnp.int32)
    else:
        m = jnp.asarray(mask)
        if m.ndim == 2:
            m = m[:, None, :]
        if m.ndim != 3 or m.shape[0] != batch or m.shape[1] not in (1, heads) or m.shape[2] != length:
            raise ValueError(f"{name} must be [B, {length}] or [B, H, {length}]; got {m.shape}")
        m = (m != 0).astype(jnp.int32)
    if padded > length:
        m = jnp.pad(m, ((0, 0), (0, 0), (0, padded - length)), constant_values=-1)
    return m


def _bucket_runs(buckets):
    """Run-length form of a bucket-per-distance vector: run_of [NR], run_start [NR+1], run_bucket [NR]."""
    nr = buckets.shape[0]
    change = jnp.concatenate([jnp.ones((1,), bool), buckets[1:] != buckets[:-1]])
    run_of = (jnp.cumsum(change.astype(jnp.int32)) - 1).astype(jnp.int32)
    run_start = jnp.nonzero(change, size=nr + 1, fill_value=nr)[0].astype(jnp.int32)
    run_bucket = buckets[jnp.minimum(run_start[:nr], nr - 1)].astype(jnp.int32)
    return run_of, run_start, run_bucket


def _prepare(q, k, v, layout, *, scale, causal, q_offset, prefix_len, kv_lengths, key_mask,
             q_segment_ids, kv_segment_ids, bias_table, bias_buckets, extra_k, extra_v, extra_mask,
             block_extra_k, block_extra_v, block_extra_mask, mask_value, qkv_layout, interpret, debug):
    """Validates the arguments and returns (static description, dict of canonical arrays)."""
    if qkv_layout not in ("bhld", "blhd"):
        raise ValueError(f"qkv_layout must be 'bhld' or 'blhd', not {qkv_layout!r}")
    if not isinstance(layout, BlockLayout):
        raise TypeError("layout must be a BlockLayout")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v must be rank 4 with k.shape == v.shape; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if qkv_layout == "bhld":
        batch, heads, lq, d = q.shape
        lk = k.shape[2]
        kshape = (batch, heads, lk, d)
    else:
        batch, lq, heads, d = q.shape
        lk = k.shape[1]
        kshape = (batch, lk, heads, d)
    if k.shape != kshape:
        raise ValueError(f"k/v shape {k.shape} does not match q {q.shape} in layout {qkv_layout}")
    bq, bk = layout.block_q, layout.block_k
    nq, nk = -(-lq // bq), -(-lk // bk)
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend not in ("gpu", "tpu")
    triton = backend == "gpu" and not interpret
    mosaic = backend == "tpu" and not interpret
    if triton and any(x < 16 or x & (x - 1) for x in (bq, bk, d)):
        raise ValueError(f"the Triton kernel needs block_q, block_k and head_dim to be powers of two "
                         f">= 16; got {bq}, {bk}, {d}")

    def seg_block(n: int) -> int:
        """Rows of an extra-key block: Triton tiles are powers of two >= 16; Mosaic wants whole
        sublane tiles (16 rows covers f32 and bf16)."""
        if triton:
            return max(16, 1 << (n - 1).bit_length())
        return _round_up(n, 16 if mosaic else 8)

    if layout.num_q_blocks != nq or layout.num_k_blocks != nk:
        raise ValueError(f"layout has {layout.num_q_blocks}x{layout.num_k_blocks} blocks, inputs need "
                         f"{nq}x{nk} (block_q={bq}, block_k={bk}, Lq={lq}, Lk={lk})")
    if layout.num_heads not in (1, heads):
        raise ValueError(f"layout has {layout.num_heads} heads; must be 1 or {heads}")
    lqp, lkp = nq * bq, nk * bk
    arrays = {"q": _pad_seq(q, lqp, qkv_layout), "k": _pad_seq(k, lkp, qkv_layout),
              "v": _pad_seq(v, lkp, qkv_layout)}

    km = _key_mask_array(key_mask, batch, heads, lk, lk, "key_mask")
    if km.shape[1] != 1:
        raise ValueError("key_mask of the main keys must be [B, Lk] (shared by the heads)")
    if kv_lengths is not None:
        lens = jnp.asarray(kv_lengths, jnp.int32).reshape(batch)
        km = jnp.where(jnp.arange(lk)[None, None, :] < lens[:, None, None], km, 0)
    arrays["key_mask"] = jnp.pad(km, ((0, 0), (0, 0), (0, lkp - lk)), constant_values=-1)

    qo = jnp.asarray(q_offset, jnp.int32)
    arrays["q_offset"] = jnp.broadcast_to(qo, (batch,)) if qo.ndim == 0 else qo.reshape(batch)
    has_prefix = prefix_len is not None
    if has_prefix:
        if not causal:
            raise ValueError("prefix_len (GLM's rule) needs causal=True")
        arrays["prefix_len"] = jnp.asarray(prefix_len, jnp.int32).reshape(batch)
    has_segments = q_segment_ids is not None or kv_segment_ids is not None
    if has_segments:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids go together")
        qs = jnp.asarray(q_segment_ids, jnp.int32)
        ks = jnp.asarray(kv_segment_ids, jnp.int32)
        if qs.shape != (batch, lq) or ks.shape != (batch, lk):
            raise ValueError(f"segment ids must be [B, Lq] and [B, Lk]; got {qs.shape}, {ks.shape}")
        arrays["q_segment_ids"] = jnp.pad(qs, ((0, 0), (0, lqp - lq)))
        arrays["kv_segment_ids"] = jnp.pad(ks, ((0, 0), (0, lkp - lk)))

    num_buckets = num_rel = 0
    if (bias_table is None) != (bias_buckets is None):
        raise ValueError("bias_table and bias_buckets go together")
    if bias_table is not None:
        if bias_table.ndim != 2 or bias_table.shape[1] != heads:
            raise ValueError(f"bias_table must be [num_buckets, {heads}]; got {bias_table.shape}")
        buckets = jnp.asarray(bias_buckets, jnp.int32)
        if buckets.ndim != 1 or buckets.shape[0] < lk:
            raise ValueError(f"bias_buckets must be a vector of at least Lk={lk} entries")
        num_buckets, num_rel = bias_table.shape[0], buckets.shape[0]
        arrays["bias_table"] = bias_table
        arrays["bias_buckets"] = jnp.clip(buckets, 0, num_buckets - 1)

    def extra_shape(length):
        return (batch, heads, length, d) if qkv_layout == "bhld" else (batch, length, heads, d)

    has_extra = extra_k is not None
    extra_len = extra_block = extra_mask_heads = 0
    if has_extra:
        e = extra_k.shape[_seq_axis(qkv_layout)]
        if extra_k.shape != extra_shape(e) or extra_v is None or extra_v.shape != extra_k.shape:
            raise ValueError(f"extra_k/extra_v must both be {extra_shape('E')}")
        extra_block = min(seg_block(e), bk)
        extra_len = _round_up(e, extra_block)
        arrays["extra_k"] = _pad_seq(extra_k, extra_len, qkv_layout)
        arrays["extra_v"] = _pad_seq(extra_v, extra_len, qkv_layout)
        em = _key_mask_array(extra_mask, batch, heads, e, extra_len, "extra_mask")
        arrays["extra_mask"], extra_mask_heads = em, em.shape[1]
    elif extra_v is not None or extra_mask is not None:
        raise ValueError("extra_v / extra_mask given without extra_k")

    has_block_extra = block_extra_k is not None
    be_len = be_groups = be_mask_heads = 0
    if has_block_extra:
        x = block_extra_k
        if qkv_layout == "bhld":
            ok = x.ndim == 5 and x.shape[:2] == (batch, heads) and x.shape[4] == d
            be_groups, s = (x.shape[2], x.shape[3]) if ok else (0, 0)
        else:
            ok = x.ndim == 5 and x.shape[0] == batch and x.shape[3:] == (heads, d)
            be_groups, s = (x.shape[1], x.shape[2]) if ok else (0, 0)
        if not ok or block_extra_v is None or block_extra_v.shape != x.shape:
            raise ValueError("block_extra_k/v must both be [B, H, G, S, D] ('bhld') or [B, G, S, H, D] "
                             "('blhd')")
        if be_groups == 0 or nq % be_groups:
            raise ValueError(f"block_extra has {be_groups} groups; it must divide the {nq} query blocks")
        be_len = seg_block(s)

        def flat(y):
            if qkv_layout == "bhld":
                y = jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, be_len - s), (0, 0)))
                return y.reshape(batch, heads, be_groups * be_len, d)
            y = jnp.pad(y, ((0, 0), (0, 0), (0, be_len - s), (0, 0), (0, 0)))
            return y.reshape(batch, be_groups * be_len, heads, d)

        arrays["block_extra_k"], arrays["block_extra_v"] = flat(block_extra_k), flat(block_extra_v)
        if block_extra_mask is None:
            bm = jnp.ones((batch, 1, be_groups, s), jnp.int32)
        else:
            bm = jnp.asarray(block_extra_mask)
            if bm.ndim == 3:
                bm = bm[:, None]
            if bm.shape[0] != batch or bm.shape[1] not in (1, heads) or bm.shape[2:] != (be_groups, s):
                raise ValueError(f"block_extra_mask must be [B, G, S] or [B, H, G, S]; got {bm.shape}")
            bm = (bm != 0).astype(jnp.int32)
        bm = jnp.pad(bm, ((0, 0), (0, 0), (0, 0), (0, be_len - s)), constant_values=-1)
        be_mask_heads = bm.shape[1]
        arrays["block_extra_mask"] = bm.reshape(batch, be_mask_heads, be_groups * be_len)
    elif block_extra_v is not None or block_extra_mask is not None:
        raise ValueError("block_extra_v / block_extra_mask given without block_extra_k")

    st = _Static(batch, heads, d, lq, lk, qkv_layout, layout, float(scale),
                 None if mask_value is None else float(mask_value), bool(causal), has_prefix,
                 has_segments, num_buckets, num_rel, has_extra, extra_len, extra_block, extra_mask_heads,
                 has_block_extra, be_len, be_groups, be_mask_heads, interpret, backend, bool(debug))
    return st, arrays


_DIFF_NAMES = ("q", "k", "v", "extra_k", "extra_v", "block_extra_k", "block_extra_v", "bias_table")


def _crop_out(st: _Static, out):
    ax = _seq_axis(st.qkv_layout)
    return lax.slice_in_dim(out, 0, st.lq, axis=ax)


# ----------------------------------------------------------------------------------------------------
# Plain-jnp reference: gathers each query block's visited key blocks (no Lq x Lk array)
# ----------------------------------------------------------------------------------------------------


def _to_bhld(x, qkv_layout):
    return x if qkv_layout == "bhld" else jnp.swapaxes(x, 1, 2)


def _reference_core(st: _Static, a):
    lay = st.layout
    bq, bk = lay.block_q, lay.block_k
    nq, hl, maxc = lay.num_q_blocks, lay.num_heads, lay.max_count
    b, h, d = st.batch, st.heads, st.head_dim
    f32 = jnp.float32
    q = _to_bhld(a["q"], st.qkv_layout).reshape(b, h, nq, bq, d)
    qpos = a["q_offset"][:, None, None] + jnp.arange(nq * bq).reshape(1, nq, bq)  # [B, nq, bq]

    logits, keeps, values = [], [], []

    def add(s, vis, exists, vals):
        # s [B,H,nq,bq,K] f32, vis/exists broadcastable bool, vals [B,H,nq,K,D]
        if st.mask_value is None:
            keep = jnp.broadcast_to(vis & exists, s.shape)
            adj = s
        else:
            keep = jnp.broadcast_to(exists, s.shape)
            adj = jnp.where(vis, s, s + st.mask_value)
        logits.append(jnp.where(keep, adj, -jnp.inf))
        keeps.append(keep)
        values.append(vals)

    def qk(qq, kk):
        return jnp.einsum("bhnqd,bhnkd->bhnqk", qq, kk, preferred_element_type=f32) * st.scale

    # main keys
    k = _to_bhld(a["k"], st.qkv_layout)
    v = _to_bhld(a["v"], st.qkv_layout)
    idx = jnp.asarray(lay.indices)  # [Hl, nq, maxc]
    valid = jnp.arange(maxc)[None, None, :] < jnp.asarray(lay.counts)[:, :, None]
    kpos = (idx[..., None] * bk + jnp.arange(bk)).reshape(hl, nq, maxc * bk)  # [Hl, nq, K]
    kvalid = jnp.repeat(valid, bk, axis=-1)
    if hl == 1:
        kg, vg = jnp.take(k, kpos[0], axis=2), jnp.take(v, kpos[0], axis=2)  # [B,H,nq,K,D]
    else:
        kg = jax.vmap(lambda kh, ph: jnp.take(kh, ph, axis=1), in_axes=(1, 0), out_axes=1)(k, kpos)
        vg = jax.vmap(lambda vh, ph: jnp.take(vh, ph, axis=1), in_axes=(1, 0), out_axes=1)(v, kpos)
    s = qk(q, kg)
    kp = kpos[None, :, :, None, :]  # [1, Hl, nq, 1, K]
    qp = qpos[:, None, :, :, None]  # [B, 1, nq, bq, 1]
    km = jnp.take(a["key_mask"][:, 0], kpos, axis=1)[:, :, :, None, :]  # [B, Hl, nq, 1, K]
    exists = (km >= 0) & kvalid[None, :, :, None, :]
    vis = km == 1
    if st.causal:
        rule = kp <= qp
        if st.has_prefix:
            rule = rule | (kp < a["prefix_len"][:, None, None, None, None])
        vis = vis & rule
    if st.has_segments:
        qs = a["q_segment_ids"].reshape(b, 1, nq, bq, 1)
        ks = jnp.take(a["kv_segment_ids"], kpos, axis=1)[:, :, :, None, :]
        vis = vis & (qs == ks)
    if st.num_buckets:
        rel = jnp.clip(kp - qp + (st.num_rel - st.lk), 0, st.num_rel - 1)  # [B, Hl, nq, bq, K]
        bucket = a["bias_buckets"][rel]
        heads_ix = jnp.arange(h).reshape(1, h, 1, 1, 1)
        s = s + a["bias_table"].astype(f32).T[heads_ix, bucket]  # [B, H, nq, bq, K]
    add(s, vis, exists, vg)

    if st.has_extra:
        ek = _to_bhld(a["extra_k"], st.qkv_layout)
        ev = _to_bhld(a["extra_v"], st.qkv_layout)
        s = jnp.einsum("bhnqd,bhkd->bhnqk", q, ek, preferred_element_type=f32) * st.scale
        em = a["extra_mask"][:, :, None, None, :]
        e_len = ek.shape[2]
        add(s, em == 1, em >= 0, jnp.broadcast_to(ev[:, :, None], (b, h, nq, e_len, d)))

    if st.has_block_extra:
        g, sl = st.block_extra_groups, st.block_extra_len
        bek = _to_bhld(a["block_extra_k"], st.qkv_layout).reshape(b, h, g, sl, d)
        bev = _to_bhld(a["block_extra_v"], st.qkv_layout).reshape(b, h, g, sl, d)
        grp = np.arange(nq) // (nq // g)
        bek, bev = bek[:, :, grp], bev[:, :, grp]
        bm = a["block_extra_mask"].reshape(b, -1, g, sl)[:, :, grp][:, :, :, None, :]
        add(qk(q, bek), bm == 1, bm >= 0, bev)

    s = jnp.concatenate(logits, axis=-1)
    keep = jnp.concatenate(keeps, axis=-1)
    vals = jnp.concatenate(values, axis=-2)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(keep, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(vals.dtype), vals, preferred_element_type=f32)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    o = o.reshape(b, h, nq * bq, d).astype(a["q"].dtype)
    return o if st.qkv_layout == "bhld" else jnp.swapaxes(o, 1, 2)


# ----------------------------------------------------------------------------------------------------
# Pallas kernels
# ----------------------------------------------------------------------------------------------------


class _Stream(NamedTuple):
    """One set of keys attended under the shared softmax, with its own block layout."""
    k: str
    v: str
    mask: str
    layout: BlockLayout
    mask_heads: int
    is_main: bool


@functools.lru_cache(maxsize=256)
def _streams(st: _Static) -> tuple:
    lay = st.layout
    nq, bq = lay.num_q_blocks, lay.block_q
    out = [_Stream("k", "v", "key_mask", lay, 1, True)]
    if st.has_extra:
        ne = st.extra_len // st.extra_block
        extra = BlockLayout.from_block_mask(np.ones((nq, ne), bool), bq, st.extra_block)
        out.append(_Stream("extra_k", "extra_v", "extra_mask", extra, st.extra_mask_heads, False))
    if st.has_block_extra:
        g = st.block_extra_groups
        m = np.arange(nq)[:, None] // (nq // g) == np.arange(g)[None, :]
        be = BlockLayout.from_block_mask(m, bq, st.block_extra_len)
        out.append(_Stream("block_extra_k", "block_extra_v", "block_extra_mask", be,
                           st.block_extra_mask_heads, False))
    return tuple(out)


def _dot(a, b, trans_a=False, trans_b=False):
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _seq_spec(st: _Static, block: Optional[int], length: int, index):
    """BlockSpec of a [B, H, L, D] / [B, L, H, D] array: `block` rows at block `index(grid)` of the
    sequence, or the whole sequence when block is None. The kernel sees a [rows, D] ref either way."""
    d = st.head_dim
    rows = length if block is None else block
    if st.qkv_layout == "bhld":
        return pl.BlockSpec((None, None, rows, d), lambda b, h, i: (b, h, index(b, h, i), 0))
    return pl.BlockSpec((None, rows, None, d), lambda b, h, i: (b, index(b, h, i), h, 0))


# Small per-row operands are laid out so that every block's last two dims are whole or tile-aligned
# (Mosaic's (8, 128) rule) and so that the kernel never slices the lane dim dynamically:
#   * per-query values (softmax statistics, delta, query segment ids) are columns [..., Lq, 1]: a query
#     block is a [block_q, 1] slice along the sublane dim, already in the broadcast shape of a score tile;
#   * per-key values (key masks, key segment ids) are [..., num_blocks, 1, block_k]: one [1, block_k]
#     row per key block, picked by an index on a leading dim.
# Interpret mode and Triton use the same layout, so the CPU tests run the TPU kernels' indexing.


def _key_rows(x, block: int):
    """A per-key array [..., L] as [..., L / block, 1, block]."""
    return x.reshape(x.shape[:-1] + (x.shape[-1] // block, 1, block))


def _mask_spec(stream: "_Stream", per_block: bool):
    """BlockSpec of a stream's key mask [B, Hm, nk, 1, bk]: all of the row's blocks, or (per_block) the
    program's key block."""
    nk, bk = stream.layout.num_k_blocks, stream.layout.block_k
    if per_block:
        if stream.mask_heads > 1:
            return pl.BlockSpec((None, None, None, 1, bk), lambda b, h, i: (b, h, i, 0, 0))
        return pl.BlockSpec((None, None, None, 1, bk), lambda b, h, i: (b, 0, i, 0, 0))
    if stream.mask_heads > 1:
        return pl.BlockSpec((None, None, nk, 1, bk), lambda b, h, i: (b, h, 0, 0, 0))
    return pl.BlockSpec((None, None, nk, 1, bk), lambda b, h, i: (b, 0, 0, 0, 0))


def _col_spec(rows: int, per_block: bool, heads: bool = True):
    """BlockSpec of a per-query column [B, H, Lq, 1] (heads) or [B, Lq, 1]: `rows` rows at the
    program's query block, or the whole column."""
    if heads:
        return pl.BlockSpec((None, None, rows, 1),
                            (lambda b, h, i: (b, h, i, 0)) if per_block else (lambda b, h, i: (b, h, 0, 0)))
    return pl.BlockSpec((None, rows, 1),
                        (lambda b, h, i: (b, i, 0)) if per_block else (lambda b, h, i: (b, 0, 0)))


def _segment_inputs(st: "_Static", arrays, per_q_block: bool):
    """(specs, args) of the query / key segment ids, for a program per query block (per_q_block) or per
    main key block."""
    lay = st.layout
    bq, bk, nk = lay.block_q, lay.block_k, lay.num_k_blocks
    qs, ks = arrays["q_segment_ids"][..., None], _key_rows(arrays["kv_segment_ids"], bk)
    if per_q_block:
        specs = [_col_spec(bq, True, heads=False),
                 pl.BlockSpec((None, nk, 1, bk), lambda b, h, i: (b, 0, 0, 0))]
    else:
        specs = [_col_spec(lay.num_q_blocks * bq, False, heads=False),
                 pl.BlockSpec((None, None, 1, bk), lambda b, h, i: (b, i, 0, 0))]
    return specs, [qs, ks]


def _small_spec(st: _Static):
    """Whole-array spec for small int/scalar tables (read with scalar loads)."""
    if st.backend == "tpu" and not st.interpret:
        from jax.experimental.pallas import tpu as pltpu
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.no_block_spec


def _compiler_params(st: _Static):
    if st.interpret:
        return None
    if st.backend == "gpu":
        from jax.experimental.pallas import triton as pltriton
        bk = st.layout.block_k
        return pltriton.CompilerParams(num_warps=4 if bk <= 64 else 8, num_stages=2)
    if st.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    return None


def _q_positions(refs, b, first_row, rows):
    """(positions [rows, 1] of `rows` consecutive queries from `first_row`, the first one as a scalar)."""
    q_lo = refs["q_offset"][b] + first_row
    return q_lo + lax.broadcasted_iota(jnp.int32, (rows, 1), 0), q_lo


class _Tile(NamedTuple):
    logits: Any  # [bq, bk] f32, -inf where not kept
    keep: Any  # [bq, bk] bool: takes part in the softmax
    rel: Any  # [bq, bk] int32 index into the bucket vector (main stream with bias), else None
    run_lo: Any
    run_hi: Any


def _tile(st: _Static, stream: _Stream, refs, b, h, q, k, kb, km, qpos, q_lo, qseg, kseg) -> _Tile:
    """Scores of one (query block, key block) tile with every mask and the bias applied in-kernel.

    qpos: [bq, 1] positions of the tile's (consecutive) queries, q_lo the first as a scalar; km, kseg:
    [1, bk] key mask / segment ids; qseg: [bq, 1]."""
    bk = stream.layout.block_k
    s = _dot(q, k, trans_b=True) * st.scale
    exists = km >= 0
    vis = km == 1
    rel = run_lo = run_hi = None
    if stream.is_main:
        kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        if st.causal:
            rule = kpos <= qpos
            if st.has_prefix:
                rule = rule | (kpos < refs["prefix_len"][b])
            vis = vis & rule
        if st.has_segments:
            vis = vis & (qseg == kseg)
        if st.num_buckets:
            off, last = st.num_rel - st.lk, st.num_rel - 1
            rel = jnp.clip(kpos - qpos + off, 0, last)
            rows = q.shape[0]
            lo = jnp.clip(kb * bk - (q_lo + rows - 1) + off, 0, last)
            hi = jnp.clip(kb * bk + bk - 1 - q_lo + off, 0, last)
            run_of, run_start, run_bucket = refs["run_of"], refs["run_start"], refs["run_bucket"]
            table = refs["bias_table"]
            run_lo, run_hi = run_of[lo], run_of[hi]
            first = table[h, run_bucket[run_lo]]

            def paint(r, bias):  # runs are sorted: later runs overwrite from their start onwards
                return jnp.where(rel >= run_start[r], table[h, run_bucket[r]], bias)

            bias = lax.fori_loop(run_lo + 1, run_hi + 1, paint,
                                 jnp.full(s.shape, first, jnp.float32))
            s = s + bias
    if st.mask_value is None:
        keep = vis & exists
        adj = s
    else:
        keep = jnp.broadcast_to(exists, s.shape)
        adj = jnp.where(vis, s, s + st.mask_value)
    return _Tile(jnp.where(keep, adj, -jnp.inf), keep, rel, run_lo, run_hi)


def _layout_head(layout: BlockLayout, h):
    return h if layout.num_heads > 1 else 0


def _ref_dict(names, refs):
    return dict(zip(names, refs))


def _kernel_args(st: _Static, arrays, layouts):
    """The small whole-array inputs shared by every kernel: layouts, offsets, prefix, bias runs."""
    names, args = [], []
    for j, lay in enumerate(layouts):
        names += [f"idx{j}", f"cnt{j}"]
        args += [jnp.asarray(lay.indices), jnp.asarray(lay.counts)]
    names.append("q_offset")
    args.append(arrays["q_offset"])
    if st.has_prefix:
        names.append("prefix_len")
        args.append(arrays["prefix_len"])
    if st.num_buckets:
        run_of, run_start, run_bucket = _bucket_runs(arrays["bias_buckets"])
        nbp = _num_buckets_padded(st)
        table = jnp.pad(arrays["bias_table"].astype(jnp.float32).T, ((0, 0), (0, nbp - st.num_buckets)))
        names += ["bias_table", "run_of", "run_start", "run_bucket"]
        args += [table, run_of, run_start, run_bucket]
    return names, args


def _num_buckets_padded(st: _Static) -> int:
    return max(8, 1 << (st.num_buckets - 1).bit_length())


def _forward_call(st: _Static, arrays):
    """Runs the forward kernel: returns (out [q layout, padded], (row max, 1 / row sum) as
    [B, H, Lqp, 1] f32 columns, visits [B, H, nq] or None)."""
    lay = st.layout
    bq, nq = lay.block_q, lay.num_q_blocks
    lqp = nq * bq
    streams = _streams(st)
    small_names, small_args = _kernel_args(st, arrays, [s.layout for s in streams])
    small = _small_spec(st)

    names = ["q"]
    specs = [_seq_spec(st, bq, lqp, lambda b, h, i: i)]
    args = [arrays["q"]]
    for s in streams:
        length = s.layout.num_k_blocks * s.layout.block_k
        names += [s.k, s.v, s.mask]
        specs += [_seq_spec(st, None, length, lambda b, h, i: 0)] * 2 + [_mask_spec(s, False)]
        args += [arrays[s.k], arrays[s.v], _key_rows(arrays[s.mask], s.layout.block_k)]
    if st.has_segments:
        names += ["q_segment_ids", "kv_segment_ids"]
        seg_specs, seg_args = _segment_inputs(st, arrays, per_q_block=True)
        specs += seg_specs
        args += seg_args
    names += small_names
    specs += [small] * len(small_args)
    args += small_args

    col = jax.ShapeDtypeStruct((st.batch, st.heads, lqp, 1), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct(arrays["q"].shape, arrays["q"].dtype), col, col]
    out_specs = [_seq_spec(st, bq, lqp, lambda b, h, i: i), _col_spec(bq, True), _col_spec(bq, True)]
    if st.debug:
        out_shape.append(jax.ShapeDtypeStruct((st.batch, st.heads, nq, 1, 1), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, None, 1, 1), lambda b, h, i: (b, h, i, 0, 0)))

    def kernel(*refs):
        r = _ref_dict(names, refs[:len(names)])
        o_ref, m_ref, inv_l_ref = refs[len(names):len(names) + 3]
        b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        q = r["q"][...]
        qpos, q_lo = _q_positions(r, b, i * bq, bq)
        qseg = r["q_segment_ids"][...] if st.has_segments else None
        d = q.shape[-1]
        carry = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
                 jnp.zeros((bq, d), jnp.float32), jnp.zeros((1, 1), jnp.int32))
        for j, s in enumerate(streams):
            bk = s.layout.block_k
            hl = _layout_head(s.layout, h)
            idx_ref = r[f"idx{j}"]

            def body(t, carry, s=s, bk=bk, hl=hl, idx_ref=idx_ref):
                m, l, acc, visits = carry
                kb = idx_ref[hl, i, t]
                start = pl.multiple_of(kb * bk, bk)
                k = r[s.k][pl.ds(start, bk), :]
                v = r[s.v][pl.ds(start, bk), :]
                km = r[s.mask][kb]
                kseg = r["kv_segment_ids"][kb] if s.is_main and st.has_segments else None
                tile = _tile(st, s, r, b, h, q, k, kb, km, qpos, q_lo, qseg, kseg)
                m_new = jnp.maximum(m, jnp.max(tile.logits, axis=1, keepdims=True))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp(m - m_safe)
                p = jnp.where(tile.keep, jnp.exp(tile.logits - m_safe), 0.0)
                l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
                acc = alpha * acc + _dot(p.astype(v.dtype), v)
                return m_new, l, acc, visits + (1 if s.is_main else 0)

            carry = lax.fori_loop(0, r[f"cnt{j}"][hl, i], body, carry)
        m, l, acc, visits = carry
        # The softmax statistics are kept as (max, 1/sum), not log-sum-exp: with additive masks of
        # finfo.min, m + log(l) would round back to m.
        inv_l = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
        o_ref[...] = (acc * inv_l).astype(o_ref.dtype)
        m_ref[...] = jnp.where(m == -jnp.inf, 0.0, m)
        inv_l_ref[...] = inv_l
        if st.debug:
            refs[len(names) + 3][...] = visits

    outs = pl.pallas_call(
        kernel, grid=(st.batch, st.heads, nq), in_specs=specs, out_specs=out_specs,
        out_shape=out_shape, interpret=st.interpret, compiler_params=_compiler_params(st),
        name="block_sparse_attention_fwd")(*args)
    return outs[0], (outs[1], outs[2]), (outs[3].reshape(st.batch, st.heads, nq) if st.debug else None)


def _dq_call(st: _Static, arrays, do, stats, delta):
    """dq and the per-query-block partial gradients of the bias table ([B, H, nq, 1, NBp])."""
    lay = st.layout
    bq, nq = lay.block_q, lay.num_q_blocks
    lqp = nq * bq
    streams = _streams(st)
    small_names, small_args = _kernel_args(st, arrays, [s.layout for s in streams])

    names = ["q", "do", "m", "inv_l", "delta"]
    qspec = _seq_spec(st, bq, lqp, lambda b, h, i: i)
    colspec = _col_spec(bq, True)
    specs = [qspec, qspec, colspec, colspec, colspec]
    args = [arrays["q"], do, stats[0], stats[1], delta]
    for s in streams:
        length = s.layout.num_k_blocks * s.layout.block_k
        names += [s.k, s.v, s.mask]
        specs += [_seq_spec(st, None, length, lambda b, h, i: 0)] * 2 + [_mask_spec(s, False)]
        args += [arrays[s.k], arrays[s.v], _key_rows(arrays[s.mask], s.layout.block_k)]
    if st.has_segments:
        names += ["q_segment_ids", "kv_segment_ids"]
        seg_specs, seg_args = _segment_inputs(st, arrays, per_q_block=True)
        specs += seg_specs
        args += seg_args
    names += small_names
    specs += [_small_spec(st)] * len(small_args)
    args += small_args
    nbp = _num_buckets_padded(st) if st.num_buckets else 8

    def kernel(*refs):
        r = _ref_dict(names, refs[:len(names)])
        dq_ref, dtab_ref = refs[len(names)], refs[len(names) + 1]
        b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        q, do_ = r["q"][...], r["do"][...]
        m_, inv_l_, delta_ = r["m"][...], r["inv_l"][...], r["delta"][...]
        qpos, q_lo = _q_positions(r, b, i * bq, bq)
        qseg = r["q_segment_ids"][...] if st.has_segments else None
        bucket_ids = lax.broadcasted_iota(jnp.int32, (1, nbp), 1)
        carry = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((1, nbp), jnp.float32))
        for j, s in enumerate(streams):
            bk = s.layout.block_k
            hl = _layout_head(s.layout, h)
            idx_ref = r[f"idx{j}"]

            def body(t, carry, s=s, bk=bk, hl=hl, idx_ref=idx_ref):
                dq, dtab = carry
                kb = idx_ref[hl, i, t]
                start = pl.multiple_of(kb * bk, bk)
                k = r[s.k][pl.ds(start, bk), :]
                v = r[s.v][pl.ds(start, bk), :]
                km = r[s.mask][kb]
                kseg = r["kv_segment_ids"][kb] if s.is_main and st.has_segments else None
                tile = _tile(st, s, r, b, h, q, k, kb, km, qpos, q_lo, qseg, kseg)
                p = jnp.where(tile.keep, jnp.exp(tile.logits - m_) * inv_l_, 0.0)
                dp = _dot(do_, v, trans_b=True)
                ds = p * (dp - delta_)
                dq = dq + _dot(ds.astype(k.dtype), k) * st.scale
                if tile.rel is not None:
                    run_start, run_bucket = r["run_start"], r["run_bucket"]

                    def collect(rr, dtab):
                        inside = (tile.rel >= run_start[rr]) & (tile.rel < run_start[rr + 1])
                        g = jnp.where(inside, ds, 0.0)  # reduced to [1, 1]: no vector-to-scalar step
                        g = jnp.sum(jnp.sum(g, axis=1, keepdims=True), axis=0, keepdims=True)
                        return dtab + jnp.where(bucket_ids == run_bucket[rr], g, 0.0)

                    dtab = lax.fori_loop(tile.run_lo, tile.run_hi + 1, collect, dtab)
                return dq, dtab

            carry = lax.fori_loop(0, r[f"cnt{j}"][hl, i], body, carry)
        dq_ref[...] = carry[0].astype(dq_ref.dtype)
        dtab_ref[...] = carry[1]

    out_shape = [jax.ShapeDtypeStruct(arrays["q"].shape, arrays["q"].dtype),
                 jax.ShapeDtypeStruct((st.batch, st.heads, nq, 1, nbp), jnp.float32)]
    out_specs = [qspec, pl.BlockSpec((None, None, None, 1, nbp), lambda b, h, i: (b, h, i, 0, 0))]
    dq, dtab = pl.pallas_call(
        kernel, grid=(st.batch, st.heads, nq), in_specs=specs, out_specs=out_specs,
        out_shape=out_shape, interpret=st.interpret, compiler_params=_compiler_params(st),
        name="block_sparse_attention_dq")(*args)
    return dq, dtab


def _dkv_call(st: _Static, arrays, stream: _Stream, do, stats, delta):
    """dk, dv of one key stream: one program per key block, looping over the query blocks visiting it."""
    lay = st.layout
    bq, nq = lay.block_q, lay.num_q_blocks
    lqp = nq * bq
    tlay = stream.layout.transpose()  # key block -> query blocks
    bk, nk = stream.layout.block_k, stream.layout.num_k_blocks
    small_names, small_args = _kernel_args(st, arrays, [tlay])

    full_q = _seq_spec(st, None, lqp, lambda b, h, i: 0)
    full_col = _col_spec(lqp, False)
    kspec = _seq_spec(st, bk, nk * bk, lambda b, h, i: i)
    names = ["q", "do", "m", "inv_l", "delta", "k", "v", "mask"]
    specs = [full_q, full_q, full_col, full_col, full_col, kspec, kspec, _mask_spec(stream, True)]
    args = [arrays["q"], do, stats[0], stats[1], delta, arrays[stream.k], arrays[stream.v],
            _key_rows(arrays[stream.mask], bk)]
    if stream.is_main and st.has_segments:
        names += ["q_segment_ids", "kv_segment_ids"]
        seg_specs, seg_args = _segment_inputs(st, arrays, per_q_block=False)
        specs += seg_specs
        args += seg_args
    names += small_names
    specs += [_small_spec(st)] * len(small_args)
    args += small_args

    def kernel(*refs):
        r = _ref_dict(names, refs[:len(names)])
        dk_ref, dv_ref = refs[len(names)], refs[len(names) + 1]
        b, h, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        k, v = r["k"][...], r["v"][...]
        km = r["mask"][...]
        kseg = r["kv_segment_ids"][...] if stream.is_main and st.has_segments else None
        hl = _layout_head(tlay, h)

        def body(t, carry):
            dk, dv = carry
            qi = r["idx0"][hl, kb, t]
            start = pl.multiple_of(qi * bq, bq)
            q = r["q"][pl.ds(start, bq), :]
            do_ = r["do"][pl.ds(start, bq), :]
            m_ = r["m"][pl.ds(start, bq), :]
            inv_l_ = r["inv_l"][pl.ds(start, bq), :]
            delta_ = r["delta"][pl.ds(start, bq), :]
            qpos, q_lo = _q_positions(r, b, start, bq)
            qseg = (r["q_segment_ids"][pl.ds(start, bq), :]
                    if stream.is_main and st.has_segments else None)
            tile = _tile(st, stream, r, b, h, q, k, kb, km, qpos, q_lo, qseg, kseg)
            p = jnp.where(tile.keep, jnp.exp(tile.logits - m_) * inv_l_, 0.0)
            dv = dv + _dot(p.astype(do_.dtype), do_, trans_a=True)
            dp = _dot(do_, v, trans_b=True)
            ds = p * (dp - delta_)
            dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True) * st.scale
            return dk, dv

        zero = jnp.zeros(k.shape, jnp.float32)
        dk, dv = lax.fori_loop(0, r["cnt0"][hl, kb], body, (zero, zero))
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)

    shape = arrays[stream.k].shape
    out_shape = [jax.ShapeDtypeStruct(shape, arrays[stream.k].dtype),
                 jax.ShapeDtypeStruct(shape, arrays[stream.v].dtype)]
    return pl.pallas_call(
        kernel, grid=(st.batch, st.heads, nk), in_specs=specs, out_specs=[kspec, kspec],
        out_shape=out_shape, interpret=st.interpret, compiler_params=_compiler_params(st),
        name="block_sparse_attention_dkv")(*args)


# ----------------------------------------------------------------------------------------------------
# custom_vjp plumbing and the public functions
# ----------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, diff, rest):
    out, _, _ = _forward_call(st, {**diff, **rest})
    return out


def _attention_fwd(st, diff, rest):
    out, stats, _ = _forward_call(st, {**diff, **rest})
    return out, (diff, rest, out, stats)


def _attention_bwd(st, res, g):
    diff, rest, out, stats = res
    arrays = {**diff, **rest}
    spec = st.qkv_layout
    delta = jnp.einsum(f"{spec},{spec}->bhl", out.astype(jnp.float32), g.astype(jnp.float32))[..., None]
    do = g.astype(arrays["q"].dtype)
    dq, dtab = _dq_call(st, arrays, do, stats, delta)
    grads = {"q": dq}
    for s in _streams(st):
        dk, dv = _dkv_call(st, arrays, s, do, stats, delta)
        grads[s.k], grads[s.v] = dk, dv
    if st.num_buckets:
        dt = jnp.sum(dtab[..., 0, :st.num_buckets], axis=(0, 2)).T  # [NB, H]
        grads["bias_table"] = dt.astype(diff["bias_table"].dtype)
    dgrads = {name: grads[name] for name in diff}
    drest = jax.tree_util.tree_map(lambda x: None, rest)
    return dgrads, drest


_attention.defvjp(_attention_fwd, _attention_bwd)


def _sublane_rows(dtype) -> int:
    """Rows of one Mosaic sublane tile: 8 for 32-bit dtypes, 16 for 16-bit ones."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _mosaic_plan(layout: BlockLayout, q_dtype, k_dtype):
    """(the layout the Mosaic kernel runs, None), or (None, why the TPU path falls back).

    Mosaic tiles the last two dims of every block by (sublanes, 128 lanes) unless the block spans the
    whole dim. The kernels slice q/k/v blocks of block_q / block_k rows, so each must be a multiple of
    the sublane tile of its dtype, unless there is a single block: then it is padded up (the extra rows
    are padding, cropped or masked like any other), e.g. a 1-query decoding step becomes 16 rows.
    """
    bq, bk = layout.block_q, layout.block_k
    rq, rk = _sublane_rows(q_dtype), _sublane_rows(k_dtype)
    if layout.num_q_blocks == 1:
        bq = _round_up(bq, rq)
    if layout.num_k_blocks == 1:
        bk = _round_up(bk, rk)
    if bq % rq or bk % rk:
        return None, (f"the Mosaic TPU kernel needs block_q and block_k to be multiples of the sublane "
                      f"tile ({rq} rows for {jnp.dtype(q_dtype).name}, {rk} for "
                      f"{jnp.dtype(k_dtype).name}) when there are several blocks; got {bq}, {bk}")
    if (bq, bk) != (layout.block_q, layout.block_k):
        layout = BlockLayout(layout.indices, layout.counts, bq, bk, layout.num_k_blocks)
    return layout, None


def _split(arrays):
    diff = {n: arrays[n] for n in _DIFF_NAMES if n in arrays}
    rest = {n: x for n, x in arrays.items() if n not in diff}
    return diff, rest


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale: float = 1.0, causal: bool = False,
                           q_offset=0, prefix_len=None, kv_lengths=None, key_mask=None,
                           q_segment_ids=None, kv_segment_ids=None, bias_table=None, bias_buckets=None,
                           extra_k=None, extra_v=None, extra_mask=None, block_extra_k=None,
                           block_extra_v=None, block_extra_mask=None, mask_value=None,
                           qkv_layout: str = "bhld", interpret=None, debug: bool = False):
    """Block-sparse attention with an online softmax, as a Pallas kernel (see the module docstring).

    q: [B, H, Lq, D] (qkv_layout "bhld") or [B, Lq, H, D] ("blhd"); k, v: the same with Lk.
    layout: BlockLayout of ceil(Lq/block_q) x ceil(Lk/block_k) blocks (shared or per head).
    scale: multiplies q.k (1.0 for T5; 1/sqrt(D) for BERT/BART/GLM).
    causal: key j visible to query i only if j <= q_offset + i; with prefix_len [B] also if
      j < prefix_len[b] (GLM). q_offset: int or [B].
    kv_lengths [B] / key_mask [B, Lk] (truthy = visible): key padding.
    q_segment_ids [B, Lq], kv_segment_ids [B, Lk]: attend only within equal ids.
    bias_table [num_buckets, H] with bias_buckets [NR] int (NR >= Lk): adds
      bias_table[bias_buckets[j - (q_offset + i) + NR - Lk], h] (index clamped to [0, NR)) to the
      main keys' scores; build bias_buckets by applying the bucket function to `relative_positions`.
    extra_k, extra_v: [B, H, E, D] ("bhld") or [B, E, H, D]: keys seen by every query; extra_mask
      [B, E] or [B, H, E].
    block_extra_k, block_extra_v: [B, H, G, S, D] ("bhld") or [B, G, S, H, D]: group g is seen by query
      blocks [g*r, (g+1)*r), r = num_q_blocks / G; block_extra_mask [B, G, S] or [B, H, G, S].
    mask_value: None: masked keys are removed; a row with no visible key outputs 0. A float (e.g.
      finfo(float32).min): masked scores get this added, as the originals' additive masks do, so a
      fully masked row averages the values of every key it visits, as theirs do over all keys.
    interpret: None picks by jax.default_backend(): Triton on GPU, Mosaic on TPU, interpret elsewhere.
    debug: also return int32 [B, H, num_q_blocks]: main-layout key blocks each program visited
      (forward only, not differentiable).
    Returns the output in q's layout and dtype.

    On TPU (Mosaic) a layout dimension with a single block is padded to whole sublane tiles (8 rows for
    32-bit, 16 for 16-bit dtypes; e.g. Lq = 1 decoding runs a 16-row query block). block_q / block_k
    that are not such multiples while the dimension has several blocks cannot be tiled by Mosaic: the
    call then warns and runs `block_sparse_attention_reference` (same result, XLA).
    """
    kwargs = dict(scale=scale, causal=causal, q_offset=q_offset, prefix_len=prefix_len,
                  kv_lengths=kv_lengths, key_mask=key_mask, q_segment_ids=q_segment_ids,
                  kv_segment_ids=kv_segment_ids, bias_table=bias_table, bias_buckets=bias_buckets,
                  extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, block_extra_k=block_extra_k,
                  block_extra_v=block_extra_v, block_extra_mask=block_extra_mask, mask_value=mask_value,
                  qkv_layout=qkv_layout, debug=debug)
    if jax.default_backend() == "tpu" and not interpret and isinstance(layout, BlockLayout):
        tpu_layout, why = _mosaic_plan(layout, q.dtype, k.dtype)
        if tpu_layout is None:
            warnings.warn(f"block_sparse_attention: {why}; running block_sparse_attention_reference",
                          stacklevel=2)
            return block_sparse_attention_reference(q, k, v, layout, **kwargs)
        layout = tpu_layout
    st, arrays = _prepare(q, k, v, layout, interpret=interpret, **kwargs)
    to_bhld = st.backend == "tpu" and not st.interpret and st.qkv_layout == "blhd"
    if to_bhld:  # Mosaic TPU tiles the last two dims: give it [.., L, D] blocks
        arrays = {n: (jnp.swapaxes(x, 1, 2) if n in _DIFF_NAMES and n != "bias_table" else x)
                  for n, x in arrays.items()}
        st = st._replace(qkv_layout="bhld")
    if st.debug:
        out, _, visits = _forward_call(st, arrays)
    else:
        out = _attention(st, *_split(arrays))
    if to_bhld:
        out = jnp.swapaxes(out, 1, 2)
        st = st._replace(qkv_layout="blhd")
    out = _crop_out(st, out)
    return (out, visits) if st.debug else out


def block_sparse_attention_reference(q, k, v, layout: BlockLayout, *, scale: float = 1.0,
                                     causal: bool = False, q_offset=0, prefix_len=None,
                                     kv_lengths=None, key_mask=None, q_segment_ids=None,
                                     kv_segment_ids=None, bias_table=None, bias_buckets=None,
                                     extra_k=None, extra_v=None, extra_mask=None, block_extra_k=None,
                                     block_extra_v=None, block_extra_mask=None, mask_value=None,
                                     qkv_layout: str = "bhld", interpret=None, debug: bool = False):
    """Plain-jnp block_sparse_attention (same arguments and result; differentiable by autodiff).

    Each query block's visited key blocks are gathered, so memory is O(Lq * max_count * block_k), not
    O(Lq * Lk). `interpret` is ignored; with debug the visit counts come from the layout.
    """
    st, arrays = _prepare(q, k, v, layout, scale=scale, causal=causal, q_offset=q_offset,
                          prefix_len=prefix_len, kv_lengths=kv_lengths, key_mask=key_mask,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                          bias_table=bias_table, bias_buckets=bias_buckets, extra_k=extra_k,
                          extra_v=extra_v, extra_mask=extra_mask, block_extra_k=block_extra_k,
                          block_extra_v=block_extra_v, block_extra_mask=block_extra_mask,
                          mask_value=mask_value, qkv_layout=qkv_layout, interpret=True, debug=debug)
    out = _crop_out(st, _reference_core(st, arrays))
    if not debug:
        return out
    counts = np.broadcast_to(layout.counts, (st.heads, layout.num_q_blocks))
    return out, jnp.broadcast_to(jnp.asarray(counts), (st.batch,) + counts.shape)

"""LSG (Local + Sparse + Global) encoder self-attention, as ``LSGBartEncoderSelfAttention`` computes it.

Queries, keys and values are ``[n, H, T, dh]`` with ``T = G + t``: the first G rows are the learned global
tokens, the rest the (block-padded) token part. Global queries attend to everything; token query block i
(tokens ``[iB, (i+1)B)``) attends, under one softmax, to the G global keys, the sparse keys around its
window (§1.8 of the spec) and the local window ``[(i-1)B, (i+2)B)``. Short inputs (``t <= 2B``) fall back
to dense attention over all ``G + t`` tokens, as the original does.

Everything is gathered with static index tables, so no ``t x t`` array is ever built. Two
implementations compute the same function: ``impl="xla"`` (einsums over gathered blocks) and
``impl="pallas"`` (the block-sparse Pallas kernel of ``lmzoo.kernels``, with the globals as extra keys
and the sparse keys as per-block extra keys).

Masks are additive float32 arrays holding 0 or ``MIN`` (the float32 minimum), as in the original; a
masked score is ``s + MIN == MIN`` exactly in float32, and no row is fully masked (globals never are).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SPARSITY_TYPES",
    "MIN",
    "lsg_attention",
    "sparse_window_indices",
    "sparse_tokens",
    "lsh_projection_shapes",
    "check_lsg_geometry",
]

SPARSITY_TYPES = (None, "none", "norm", "lsh", "pooling", "stride", "block_stride", "bos_pooling")
MIN = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------------------------------
# Static index tables
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def sparse_window_indices(t: int, block_size: int, sparse_block_size: int, sparsity_factor: int):
    """Sparse-token indices seen by each query block, and their validity: ([nb, S], [nb, S]) numpy.

    Reproduces ``reshape_to_sparse_block`` (pad by ``s_pad``, unfold windows of ``6*SBS`` with stride
    ``B/sf``, drop the last window when the stride is odd, keep two column slices with Python slice
    semantics). Indices outside ``[0, t/sf)`` are the zero padding of the original (mask MIN).
    """
    B, sbs, sf = block_size, sparse_block_size, sparsity_factor
    ts = t // sf
    step = B // sf
    size2 = 6 * sbs
    odd = step % 2
    s_pad = (size2 - step) // 2 + odd
    length = ts + 2 * s_pad
    nw = (length - size2) // step + 1 if length >= size2 else 0
    if odd:
        nw -= 1
    u = (size2 - B * 3 // sf) // 2 + odd
    u_ = u + odd
    cols = list(range(size2))[u - sbs:u] + list(range(size2))[-u_:-u_ + sbs]
    nb = t // B
    if nw != nb:
        raise ValueError(
            f"LSG sparse windows: block_size={B}, sparse_block_size={sbs}, sparsity_factor={sf} give {nw} "
            f"sparse windows for {nb} blocks of a {t}-token input (the original code fails on this geometry)"
        )
    idx = (np.arange(nw) * step - s_pad)[:, None] + np.asarray(cols, np.int64)[None, :]
    valid = (idx >= 0) & (idx < ts)
    return np.clip(idx, 0, max(ts - 1, 0)).astype(np.int32), valid


def check_lsg_geometry(t: int, block_size: int, sparse_block_size: int, sparsity_factor: int, sparsity_type):
    """Raise ValueError (naming the fields) where the original would fail on a t-token block path."""
    B = block_size
    if t % B:
        raise ValueError(f"LSG block path needs a multiple of block_size={B} tokens, got {t} (set adaptive=True)")
    if _has_sparse(sparse_block_size, sparsity_factor, sparsity_type) and sparsity_factor > 1:
        if sparsity_type in ("norm", "lsh"):
            bs = min(B, sparse_block_size)
            if t % bs:
                raise ValueError(
                    f"sparsity_type={sparsity_type!r}: min(block_size, sparse_block_size)={bs} must divide the "
                    f"{t}-token input"
                )
        sparse_window_indices(t, B, sparse_block_size, sparsity_factor)


def _has_sparse(sparse_block_size, sparsity_factor, sparsity_type) -> bool:
    return bool(sparse_block_size) and sparsity_factor > 0 and sparsity_type not in (None, "none")


def _stride_indices(t: int, heads: int, sf: int) -> np.ndarray:
    """stride: head h takes tokens j*sf + (h mod sf)."""
    return (np.arange(t // sf)[None, :] * sf + (np.arange(heads) % sf)[:, None]).astype(np.int32)


def _block_stride_indices(t: int, heads: int, block_size: int, sf: int) -> np.ndarray:
    """block_stride: in block b, head h takes offsets (r + h*w) mod B, r < w = B/sf."""
    w = block_size // sf
    r = (np.arange(w)[None, :] + np.arange(heads)[:, None] * w) % block_size  # [H, w]
    idx = r[:, None, :] + (np.arange(t // block_size) * block_size)[None, :, None]  # [H, nb, w]
    return idx.reshape(heads, -1).astype(np.int32)


def lsh_projection_shapes(heads: int, head_dim: int, block_size: int, sparse_block_size: int, sparsity_factor: int,
                          num_pre_rounds: int) -> list[tuple[int, ...]]:
    """Shapes of the random matrices one lsh layer draws (``torch.randn(1, h, 1, d, n_hashes)`` per round)."""
    bs = min(block_size, sparse_block_size)
    sizes = [bs] * num_pre_rounds + [bs // sparsity_factor]
    return [(1, heads, 1, head_dim, s // 2) for s in sizes]


# ----------------------------------------------------------------------------------------------------
# Sparse token selection (get_sparse_elements)
# ----------------------------------------------------------------------------------------------------


def _gather_tokens(x, idx):
    """x [n,H,t,d], idx [H,S] static -> [n,H,S,d]."""
    return jnp.take_along_axis(x, jnp.asarray(idx)[None, :, :, None], axis=2)


def sparse_tokens(q, k, v, mask, *, block_size: int, sparse_block_size: int, sparsity_factor: int,
                  sparsity_type: str, lsh_projections: Optional[Sequence[jax.Array]] = None,
                  lsh_num_pre_rounds: int = 1, mask_dtype=jnp.float32):
    """The sparse keys, values and additive mask of the token part: ([n,H,t/sf,d], [n,H,t/sf,d], [n,Hm,t/sf]).

    q, k, v [n, H, t, d] (token part only); mask [n, t] additive (0 / MIN).
    """
    n, H, t, d = k.shape
    sf = sparsity_factor
    if sf == 1:
        return k, v, mask[:, None, :]
    keep = mask == 0  # [n, t]
    if sparsity_type == "norm":
        bs = min(block_size, sparse_block_size)
        top = bs // sf
        norm = jnp.sqrt(jnp.sum(jnp.square(jax.lax.stop_gradient(k).astype(jnp.float32)), axis=-1))
        norm = norm * keep[:, None, :]
        order = jnp.argsort(norm.reshape(n, H, t // bs, bs), axis=-1)[..., bs - top:]  # ascending, keep largest
        idx = (order + (jnp.arange(t // bs) * bs)[None, None, :, None]).reshape(n, H, -1)
        ks = jnp.take_along_axis(k, idx[..., None], axis=2)
        vs = jnp.take_along_axis(v, idx[..., None], axis=2)
        ms = jnp.take_along_axis(jnp.broadcast_to(mask[:, None, :], (n, H, t)), idx, axis=2)
        return ks, vs, ms
    if sparsity_type == "pooling":
        kr = k.reshape(n, H, t // sf, sf, d)
        vr = v.reshape(n, H, t // sf, sf, d)
        kp = keep.reshape(n, 1, t // sf, sf, 1)
        cnt = jnp.sum(kp, axis=3).astype(jnp.float32)  # [n,1,t/sf,1]
        den = cnt + jnp.float32(1e-6)
        ks = (jnp.sum(kr * kp.astype(k.dtype), axis=3) / den).astype(k.dtype)
        vs = (jnp.sum(vr * kp.astype(v.dtype), axis=3) / den).astype(v.dtype)
        ms = (1.0 - jnp.clip(cnt, 0, 1)) * jnp.float32(MIN)
        return ks, vs, ms[..., 0]
    if sparsity_type == "stride":
        idx = _stride_indices(t, H, sf)
        ms = mask[:, jnp.asarray(idx)]  # [n,H,t/sf]
        return _gather_tokens(k, idx), _gather_tokens(v, idx), ms
    if sparsity_type == "block_stride":
        idx = _block_stride_indices(t, H, block_size, sf)
        return _gather_tokens(k, idx), _gather_tokens(v, idx), mask[:, jnp.asarray(idx)]
    if sparsity_type == "bos_pooling" or (sparsity_type == "lsh" and sf == sparse_block_size):
        return _bos_pooling(q, k, v, mask, sf, mask_dtype)
    if sparsity_type == "lsh":
        if lsh_projections is None:
            raise ValueError("sparsity_type='lsh' needs random projections: pass lsh_key (a jax PRNG key)")
        return _lsh(k, v, keep, block_size, sparse_block_size, sf, lsh_projections, lsh_num_pre_rounds)
    raise ValueError(f"unknown sparsity_type {sparsity_type!r}; expected one of {SPARSITY_TYPES}")


def _bos_pooling(q, k, v, mask, sf, mask_dtype):
    n, H, t, d = k.shape
    kr = k.reshape(n, H, t // sf, sf, d)
    vr = v.reshape(n, H, t // sf, sf, d)
    mr = mask.reshape(n, 1, t // sf, sf)
    s = jnp.einsum("nhd,nhgjd->nhgj", q[:, :, 0], kr).astype(jnp.float32) / jnp.float32(math.sqrt(d)) + mr
    w = jax.nn.softmax(s, axis=-1).astype(k.dtype)
    ks = jnp.einsum("nhgj,nhgjd->nhgd", w, kr)
    vs = jnp.einsum("nhgj,nhgjd->nhgd", w, vr)
    if jnp.dtype(mask_dtype) == jnp.float16:
        # In float16 the group mean of MIN does not overflow, so fully padded groups stay masked.
        ms = jnp.where(jnp.all(mr == MIN, axis=-1), jnp.float32(MIN), jnp.float32(0))
    else:
        # float32/bfloat16: the mean of MIN values overflows to -inf != MIN, so the original sets it to 0.
        ms = jnp.zeros((n, 1, t // sf), jnp.float32)
    return ks, vs, ms


def _lsh(k, v, keep, block_size, sparse_block_size, sf, projections, num_pre_rounds):
    n, H, t, d = k.shape
    bs = min(block_size, sparse_block_size)
    b = t // bs
    kp = keep.reshape(n, 1, b, bs, 1)
    keys = k.reshape(n, H, b, bs, d).astype(jnp.float32) * kp
    values = v.reshape(n, H, b, bs, d).astype(jnp.float32) * kp
    cnt = jnp.broadcast_to(kp.astype(jnp.float32), (n, H, b, bs, 1))
    sizes = [bs] * num_pre_rounds + [bs // sf]
    if len(projections) != len(sizes):
        raise ValueError(f"lsh needs {len(sizes)} projection matrices per layer, got {len(projections)}")
    for size, r in zip(sizes, projections):
        r = jnp.asarray(r, jnp.float32)
        if r.shape != (1, H, 1, d, size // 2):
            raise ValueError(f"lsh projection must have shape {(1, H, 1, d, size // 2)}, got {r.shape}")
        norm = jnp.sqrt(jnp.sum(jnp.square(keys), axis=-1, keepdims=True))
        unit = keys / jnp.maximum(norm, 1e-12)
        u = (unit * jnp.clip(cnt, 0, 1)) @ r  # [n,H,b,T,size//2]
        bucket = jnp.argmax(jnp.concatenate([u, -u], axis=-1), axis=-1)  # ties -> first, as torch
        onehot = jax.nn.one_hot(bucket, size, dtype=jnp.float32)  # [n,H,b,T,size]
        keys = jnp.einsum("nhbts,nhbtd->nhbsd", onehot, keys)
        values = jnp.einsum("nhbts,nhbtd->nhbsd", onehot, values)
        cnt = jnp.einsum("nhbts,nhbtd->nhbsd", onehot, cnt)
    keys = keys / (cnt + jnp.float32(1e-8))
    values = values / (cnt + jnp.float32(1e-8))
    ms = (1.0 - jnp.clip(cnt, 0, 1)) * jnp.float32(MIN)
    return (keys.reshape(n, H, -1, d).astype(k.dtype), values.reshape(n, H, -1, d).astype(v.dtype),
            ms.reshape(n, H, -1))


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def _softmax_attend(q, k, v, mask, equation_qk, equation_pv):
    d = q.shape[-1]
    s = jnp.einsum(equation_qk, q, k).astype(jnp.float32) / jnp.float32(math.sqrt(d))
    p = jax.nn.softmax(s + mask, axis=-1)
    return jnp.einsum(equation_pv, p.astype(v.dtype), v)


def _dense(q, k, v, mask):
    """q [n,H,Lq,d], k/v [n,H,Lk,d], mask additive broadcastable to [n,H,Lq,Lk]."""
    return _softmax_attend(q, k, v, mask, "nhqd,nhkd->nhqk", "nhqk,nhkd->nhqd")


def _dense_impl(q, k, v, full_mask, impl: str):
    """Dense attention of q over all keys with an additive key mask [n, Lk]: XLA, or the block-sparse kernel
    (dense layout) for ``impl="pallas"`` (global-token queries and the short-input fallback)."""
    if impl != "pallas":
        return _dense(q, k, v, full_mask[:, None, None, :])
    from .attention import attend

    sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [n,H,L,d] <-> [n,L,H,d]
    out = attend(sw(q), sw(k), sw(v), impl="pallas", scale=1.0 / math.sqrt(q.shape[-1]),
                 key_mask=(full_mask == 0).astype(jnp.int32), dtype=q.dtype)
    return sw(out)


def lsg_attention(q, k, v, mask, *, num_global_tokens: int, block_size: int, sparse_block_size: int,
                  sparsity_factor: int, sparsity_type: Optional[str], lsh_projections=None, lsh_num_pre_rounds: int = 1,
                  impl: str = "xla", mask_dtype=jnp.float32):
    """LSG self-attention context ``[n, H, G+t, dh]`` for q/k/v ``[n, H, G+t, dh]``.

    mask: additive float32 ``[n, t]`` (0 keep / MIN masked) over the token part; globals are never masked.
    lsh_projections: for ``sparsity_type="lsh"``, the random matrices of this layer
    (shapes from :func:`lsh_projection_shapes`), the ones the original draws with ``torch.randn``.
    """
    if impl not in ("xla", "pallas"):
        raise ValueError(f"impl must be 'xla' or 'pallas', got {impl!r}")
    n, H, T, d = q.shape
    G, B = num_global_tokens, block_size
    t = T - G
    mask = mask.astype(jnp.float32)
    full_mask = jnp.concatenate([jnp.zeros((n, G), jnp.float32), mask], axis=1)
    if t <= 2 * B:  # the original's full-attention fallback
        return _dense_impl(q, k, v, full_mask, impl)
    check_lsg_geometry(t, B, sparse_block_size, sparsity_factor, sparsity_type)
    qg, qt = q[:, :, :G], q[:, :, G:]
    kg, kt = k[:, :, :G], k[:, :, G:]
    vg, vt = v[:, :, :G], v[:, :, G:]
    ctx_g = _dense_impl(qg, k, v, full_mask, impl)

    sparse = None
    if _has_sparse(sparse_block_size, sparsity_factor, sparsity_type):
        ks, vs, ms = sparse_tokens(
            qt, kt, vt, mask, block_size=B, sparse_block_size=sparse_block_size, sparsity_factor=sparsity_factor,
            sparsity_type=sparsity_type, lsh_projections=lsh_projections, lsh_num_pre_rounds=lsh_num_pre_rounds,
            mask_dtype=mask_dtype,
        )
        idx, valid = sparse_window_indices(t, B, sparse_block_size, sparsity_factor)
        idx_j, valid_j = jnp.asarray(idx), jnp.asarray(valid)
        ksw = jnp.where(valid_j[None, None, :, :, None], jnp.take(ks, idx_j, axis=2), 0).astype(k.dtype)
        vsw = jnp.where(valid_j[None, None, :, :, None], jnp.take(vs, idx_j, axis=2), 0).astype(v.dtype)
        msw = jnp.where(valid_j[None, None], jnp.take(ms, idx_j, axis=2), jnp.float32(MIN))  # [n,Hm,nb,S]
        sparse = (ksw, vsw, msw)

    if impl == "pallas":
        ctx_t = _lsg_blocks_pallas(qt, kt, vt, mask, kg, vg, sparse, B)
    else:
        ctx_t = _lsg_blocks_xla(qt, kt, vt, mask, kg, vg, sparse, B)
    return jnp.concatenate([ctx_g, ctx_t.astype(ctx_g.dtype)], axis=2)


def _lsg_blocks_xla(qt, kt, vt, mask, kg, vg, sparse, B):
    """Token queries, one softmax over [globals | sparse keys | local window], computed piece by piece.

    The scores of each piece are kept apart (no concatenated key or score tensor): the row max and the
    normaliser are combined across pieces, and each piece's weights multiply its own values. The local
    window reads the previous / own / next block of a zero-padded block view of the keys.
    """
    n, H, t, d = qt.shape
    nb = t // B
    qb = qt.reshape(n, H, nb, B, d)
    kb = jnp.pad(kt.reshape(n, H, nb, B, d), ((0, 0), (0, 0), (1, 1), (0, 0), (0, 0)))
    vb = jnp.pad(vt.reshape(n, H, nb, B, d), ((0, 0), (0, 0), (1, 1), (0, 0), (0, 0)))
    mb = jnp.pad(mask.reshape(n, 1, nb, B), ((0, 0), (0, 0), (1, 1), (0, 0)), constant_values=MIN)
    inv = jnp.float32(1.0 / math.sqrt(d))

    def scores(eq, keys):
        return jnp.einsum(eq, qb, keys).astype(jnp.float32) * inv

    pieces = [(scores("nhbqd,nhgd->nhbqg", kg), vg, "nhbqg,nhgd->nhbqd")]
    if sparse is not None:
        ksw, vsw, msw = sparse
        pieces.append((scores("nhbqd,nhbsd->nhbqs", ksw) + msw[:, :, :, None, :], vsw, "nhbqs,nhbsd->nhbqd"))
    for o in range(3):  # blocks i-1, i, i+1
        s = scores("nhbqd,nhbkd->nhbqk", kb[:, :, o:o + nb]) + mb[:, :, o:o + nb, None, :]
        pieces.append((s, vb[:, :, o:o + nb], "nhbqk,nhbkd->nhbqd"))
    row_max = functools.reduce(jnp.maximum, [jax.lax.stop_gradient(s.max(-1, keepdims=True)) for s, _, _ in pieces])
    out, den = 0.0, 0.0
    for s, vals, eq in pieces:
        e = jnp.exp(s - row_max)
        den = den + e.sum(-1, keepdims=True)
        out = out + jnp.einsum(eq, e.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
    return (out / den).astype(qt.dtype).reshape(n, H, t, d)


def _lsg_blocks_pallas(qt, kt, vt, mask, kg, vg, sparse, B):
    """The token queries on the block-sparse Pallas kernel: local window as the block layout, the
    globals as extra keys, the sparse keys as per-block extra keys."""
    try:
        from lmzoo.kernels import block_sparse_attention as bsa
    except ImportError as e:  # pragma: no cover - the kernel ships with lmzoo
        raise NotImplementedError(f"attention_impl='pallas' needs lmzoo.kernels.block_sparse_attention ({e})") from None
    n, H, t, d = qt.shape
    layout = _pallas_layout(t, B)
    keep = mask == 0  # [n, t]
    kw = {}
    if sparse is not None:
        ksw, vsw, msw = sparse
        kw = dict(block_extra_k=ksw, block_extra_v=vsw, block_extra_mask=(msw == 0).astype(jnp.int32))
    return bsa.block_sparse_attention(
        qt, kt, vt, layout, scale=1.0 / math.sqrt(d), key_mask=keep.astype(jnp.int32),
        extra_k=kg, extra_v=vg, qkv_layout="bhld", **kw,
    )


@functools.lru_cache(maxsize=32)
def _pallas_layout(t: int, B: int):
    from lmzoo.kernels import block_sparse_attention as bsa

    return bsa.lsg_layout(t, B)

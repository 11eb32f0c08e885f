"""LSG (Local + Sparse + Global) encoder self-attention, as ``LSGBartEncoderSelfAttention`` computes it,
plus the relative-position bias of the encoders that have one (COCO-LM, T5/LongLM).

Queries, keys and values are ``[n, H, T, dh]`` with ``T = G + t``: the first G rows are the learned global
tokens, the rest the (block-padded) token part. Global queries attend to everything; token query block i
(tokens ``[iB, (i+1)B)``) attends, under one softmax, to the G global keys, the sparse keys around its
window (§1.8 of the spec) and the local window ``[(i-1)B, (i+2)B)``. Short inputs (``t <= 2B``) fall back
to dense attention over all ``G + t`` tokens, as the original does.

Relative-position bias (``bias_table`` [num_buckets, H] + ``bucket_fn`` of ``rel = key_pos - query_pos``,
the factored form of :func:`lmzoo.attention.attend`). The LSG authors' encoders have absolute positions
only, so they never had to place a bias; here every key gets the bias of an exact position in one
coordinate system:

* token j sits at position j; the G globals sit at positions ``-G .. -1``, i.e. they are a prefix of the
  sequence. In the short-input fallback the LSG encoder is therefore exactly the source encoder run on
  the sequence ``[globals; tokens]`` (globals as ordinary leading rows), bias included;
* local keys: the exact distance ``j - i``;
* sparse keys: the position of the token a key stands for: the selected token itself for ``norm``,
  ``stride`` and ``block_stride``; the middle of its group, rounded down, for the pooled kinds
  (``pooling`` / ``bos_pooling``: ``g*sf + (sf-1)//2``; ``lsh``: ``g*bs + (bs-1)//2`` of its group of
  ``bs = min(block_size, sparse_block_size)`` tokens). Sparse keys lie beyond the local window, so with
  the released bucket settings (T5: 128, COCO-LM: 128 / 256) and blocks of 128+ tokens they mostly fall
  in the saturated far buckets, where any position inside a group gives the same bias;
* global queries use the same positions (a global at ``g - G`` sees token j at distance ``j - g + G``).

Everything is gathered with static index tables, so no ``t x t`` array is ever built. Two
implementations compute the same function: ``impl="xla"`` (einsums over gathered blocks) and
``impl="pallas"`` (the block-sparse Pallas kernel of ``lmzoo.kernels``, with the globals as extra keys
and the sparse keys as per-block extra keys).

Masks are additive float32 arrays holding 0 or ``MIN`` (the float32 minimum), as in the original; a
masked score is ``s + MIN == MIN`` exactly in float32, and no row is fully masked (globals never are).
With a relative bias, ``impl="pallas"`` runs local + global attention (``sparsity_type`` "none") on the
kernel (globals as a key prefix at positions ``-G .. -1``, so the kernel's own bias covers them); the
kernel has no per-query bias for the sparse keys, so a sparse part with a bias is refused there.

:class:`LSGFields` holds the LSG config keys (the LSG authors' names, defaults and validation) for the
configs of the families that switch LSG on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .configuration import ConfigError
from .layers import F32_MIN, softmax_weighted_values

__all__ = [
    "SPARSITY_TYPES",
    "MIN",
    "LSG_CONFIG_KEYS",
    "LSGFields",
    "has_lsg_keys",
    "lsg_attention",
    "sparse_window_indices",
    "sparse_tokens",
    "lsh_projection_shapes",
    "draw_lsh_projections",
    "check_lsg_geometry",
]

SPARSITY_TYPES = (None, "none", "norm", "lsh", "pooling", "stride", "block_stride", "bos_pooling")
MIN = F32_MIN

# The config.json keys the LSG authors write (their LSG*Config defaults below).
LSG_CONFIG_KEYS = ("adaptive", "block_size", "lsh_num_pre_rounds", "mask_first_token", "num_global_tokens",
                   "pool_with_global", "sparse_block_size", "sparsity_factor", "sparsity_type")


def has_lsg_keys(hf: Mapping[str, Any]) -> bool:
    """Whether a config.json switches LSG attention on (it names block_size and sparsity_type)."""
    return all(k in hf for k in ("block_size", "sparsity_type"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSGFields:
    """The LSG config keys with the LSG authors' defaults and ``__init__`` validation; a family's LSG config
    is ``class LSGXConfig(LSGFields, XConfig)`` and names its head count in ``lsg_num_heads`` and whether it
    has a relative-position bias in ``lsg_relative_bias``."""

    adaptive: bool = True
    block_size: int = 128
    lsh_num_pre_rounds: int = 1
    mask_first_token: bool = False
    num_global_tokens: int = 1
    pool_with_global: bool = True
    sparse_block_size: int = 128
    sparsity_factor: int = 2
    sparsity_type: Optional[str] = "norm"

    def __post_init__(self):
        super().__post_init__()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.sparsity_type not in SPARSITY_TYPES:
            warnings.warn(f"sparsity_type {self.sparsity_type!r} not in {SPARSITY_TYPES}: sparse attention is skipped "
                          "(as the original does)")
            set_("sparsity_type", None)
        if self.num_global_tokens < 1:
            warnings.warn("num_global_tokens < 1 is not compatible, setting num_global_tokens=1")
            set_("num_global_tokens", 1)
        elif self.num_global_tokens > 512:
            warnings.warn("num_global_tokens > 512 is not allowed, setting num_global_tokens=512")
            set_("num_global_tokens", 512)
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.sparse_block_size < 0 or self.sparsity_factor < 0:
            raise ConfigError("sparse_block_size and sparsity_factor must be >= 0")
        if self.sparsity_factor > 0 and self.block_size % self.sparsity_factor:
            raise ConfigError(f"block_size={self.block_size} must be a multiple of sparsity_factor={self.sparsity_factor}")
        if self.sparsity_type in ("stride", "block_stride") and self.sparsity_factor > self.lsg_num_heads:
            warnings.warn("sparsity_factor > num_attention_heads is not recommended for stride/block_stride sparsity")
        if self.mask_first_token and not self.pool_with_global:
            warnings.warn("pool_with_global=False is not compatible with mask_first_token=True; setting pool_with_global=True")
            set_("pool_with_global", True)
        if self.attention_impl == "pallas" and self.lsg_relative_bias and self.lsg_has_sparse:
            raise ConfigError(
                f"attention_impl='pallas' runs LSG attention with a relative-position bias for the local and global "
                f"keys only; sparsity_type={self.sparsity_type!r} adds sparse keys whose bias the kernel cannot add: "
                "use attention_impl='xla', or sparsity_type='none'"
            )

    @property
    def is_lsg(self) -> bool:
        return True

    @property
    def lsg_has_sparse(self) -> bool:
        return _has_sparse(self.sparse_block_size, self.sparsity_factor, self.sparsity_type)

    @property
    def lsg_uses_lsh_projections(self) -> bool:
        """lsh draws random projections unless it reduces to bos_pooling (sf == sparse_block_size) or sf == 1."""
        return self.lsg_has_sparse and self.sparsity_type == "lsh" and self.sparsity_factor > 1 \
            and self.sparsity_factor != self.sparse_block_size

    @property
    def lsg_num_heads(self) -> int:  # pragma: no cover - each family names it
        raise NotImplementedError

    @property
    def lsg_relative_bias(self) -> bool:
        return False

    def lsg_attention_kwargs(self) -> dict:
        """The keyword arguments of :func:`lsg_attention` this config sets."""
        return dict(num_global_tokens=self.num_global_tokens, block_size=self.block_size,
                    sparse_block_size=self.sparse_block_size, sparsity_factor=self.sparsity_factor,
                    sparsity_type=self.sparsity_type, lsh_num_pre_rounds=self.lsh_num_pre_rounds,
                    impl=self.attention_impl, mask_dtype=self.compute_dtype)

    def lsg_padded_length(self, t: int) -> int:
        """The token count the encoder runs on: t, or t right-padded to a block multiple (``adaptive``)
        when the block path runs (t > 2 * block_size)."""
        B = self.block_size
        if t <= 2 * B or t % B == 0:
            return t
        if not self.adaptive:
            raise ValueError(f"input length {t} is not a multiple of block_size={B} and adaptive=False")
        return -(-t // B) * B


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


def draw_lsh_projections(key, num_layers: int, *, heads: int, head_dim: int, block_size: int, sparse_block_size: int,
                         sparsity_factor: int, num_pre_rounds: int) -> list[list[jax.Array]]:
    """Per-layer lists of the random matrices an lsh encoder draws on each forward, from a jax PRNG key
    (layer i uses ``fold_in(key, i)``, as LSG-BART does)."""
    if key is None:
        raise ValueError("this LSG model uses sparsity_type='lsh', which draws random projections on every "
                         "forward: pass lsh_key=jax.random.key(seed)")
    shapes = lsh_projection_shapes(heads, head_dim, block_size, sparse_block_size, sparsity_factor, num_pre_rounds)
    out = []
    for i in range(num_layers):
        keys = jax.random.split(jax.random.fold_in(key, i), len(shapes))
        out.append([jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)])
    return out


# ----------------------------------------------------------------------------------------------------
# Sparse token selection (get_sparse_elements)
# ----------------------------------------------------------------------------------------------------


def _gather_tokens(x, idx):
    """x [n,H,t,d], idx [H,S] static -> [n,H,S,d]."""
    return jnp.take_along_axis(x, jnp.asarray(idx)[None, :, :, None], axis=2)


def sparse_tokens(q, k, v, mask, *, block_size: int, sparse_block_size: int, sparsity_factor: int,
                  sparsity_type: str, lsh_projections: Optional[Sequence[jax.Array]] = None,
                  lsh_num_pre_rounds: int = 1, mask_dtype=jnp.float32, return_positions: bool = False):
    """The sparse keys, values and additive mask of the token part: ([n,H,t/sf,d], [n,H,t/sf,d], [n,Hm,t/sf]).

    q, k, v [n, H, t, d] (token part only); mask [n, t] additive (0 / MIN). With ``return_positions`` a
    fourth item gives the token position each sparse key stands for (the relative-bias rule of the module
    docstring), int32 broadcastable to [n, H, t/sf].
    """
    n, H, t, d = k.shape
    sf = sparsity_factor

    def out(ks, vs, ms, pos):
        return (ks, vs, ms, pos) if return_positions else (ks, vs, ms)

    def group_middle(size):  # one key per group of `size` consecutive tokens (or several, for lsh)
        per = size // sf
        g = np.arange(t // sf) // per
        return jnp.asarray((g * size + (size - 1) // 2).astype(np.int32))[None, None]

    if sf == 1:
        return out(k, v, mask[:, None, :], jnp.arange(t, dtype=jnp.int32)[None, None])
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
        return out(ks, vs, ms, idx.astype(jnp.int32))
    if sparsity_type == "pooling":
        kr = k.reshape(n, H, t // sf, sf, d)
        vr = v.reshape(n, H, t // sf, sf, d)
        kp = keep.reshape(n, 1, t // sf, sf, 1)
        cnt = jnp.sum(kp, axis=3).astype(jnp.float32)  # [n,1,t/sf,1]
        den = cnt + jnp.float32(1e-6)
        ks = (jnp.sum(kr * kp.astype(k.dtype), axis=3) / den).astype(k.dtype)
        vs = (jnp.sum(vr * kp.astype(v.dtype), axis=3) / den).astype(v.dtype)
        ms = (1.0 - jnp.clip(cnt, 0, 1)) * jnp.float32(MIN)
        return out(ks, vs, ms[..., 0], group_middle(sf))
    if sparsity_type == "stride":
        idx = _stride_indices(t, H, sf)
        ms = mask[:, jnp.asarray(idx)]  # [n,H,t/sf]
        return out(_gather_tokens(k, idx), _gather_tokens(v, idx), ms, jnp.asarray(idx)[None])
    if sparsity_type == "block_stride":
        idx = _block_stride_indices(t, H, block_size, sf)
        return out(_gather_tokens(k, idx), _gather_tokens(v, idx), mask[:, jnp.asarray(idx)], jnp.asarray(idx)[None])
    if sparsity_type == "bos_pooling" or (sparsity_type == "lsh" and sf == sparse_block_size):
        return out(*_bos_pooling(q, k, v, mask, sf, mask_dtype), group_middle(sf))
    if sparsity_type == "lsh":
        if lsh_projections is None:
            raise ValueError("sparsity_type='lsh' needs random projections: pass lsh_key (a jax PRNG key)")
        res = _lsh(k, v, keep, block_size, sparse_block_size, sf, lsh_projections, lsh_num_pre_rounds)
        return out(*res, group_middle(min(block_size, sparse_block_size)))
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


def _softmax_attend(q, k, v, mask, equation_qk, equation_pv, scale=None):
    """softmax(q k' * scale + mask) v, the division by the row sums done after weighting the values (see
    :func:`lmzoo.layers.dot_product_attention`; differentiated, the softmax-first form)."""
    d = q.shape[-1]
    s = jnp.einsum(equation_qk, q, k).astype(jnp.float32)
    s = s / jnp.float32(math.sqrt(d)) if scale is None else s * jnp.float32(scale)
    return softmax_weighted_values(s + mask, None, v, MIN, equation_pv, jnp.dtype(v.dtype))


def _dense(q, k, v, mask, scale=None):
    """q [n,H,Lq,d], k/v [n,H,Lk,d], mask additive broadcastable to [n,H,Lq,Lk]."""
    return _softmax_attend(q, k, v, mask, "nhqd,nhkd->nhqk", "nhqk,nhkd->nhqd", scale)


class _Bias(NamedTuple):
    """A relative-position bias in factored form: table [num_buckets, H], bucket_fn(rel int32) -> rows."""

    table: jax.Array
    bucket_fn: Callable

    def of(self, rel):
        """Bias of distances rel [...] (shared by the heads): [H, ...] float32."""
        b = jnp.take(self.table.astype(jnp.float32), self.bucket_fn(jnp.asarray(rel, jnp.int32)), axis=0)
        return jnp.moveaxis(b, -1, 0)

    def of_per_head(self, rel):
        """Bias of distances rel [m, Hr, ...] with Hr in (1, H) (per-head distances): [m, H, ...] float32."""
        rel = jnp.asarray(rel, jnp.int32)
        H = self.table.shape[1]
        heads = jnp.arange(H).reshape((1, H) + (1,) * (rel.ndim - 2))
        return self.table.astype(jnp.float32).T[heads, self.bucket_fn(rel)]


def _dense_impl(q, k, v, full_mask, impl: str, scale=None, bias: Optional[_Bias] = None):
    """Dense attention of q over all keys with an additive key mask [n, Lk]: XLA, or the block-sparse kernel
    (dense layout) for ``impl="pallas"`` (global-token queries and the short-input fallback). Queries are
    the first Lq rows of the sequence the keys are, so the bias distance is ``key index - query index``."""
    Lq, Lk = q.shape[2], k.shape[2]
    if impl != "pallas":
        mask = full_mask[:, None, None, :]
        if bias is not None:
            mask = mask + bias.of(np.arange(Lk)[None, :] - np.arange(Lq)[:, None])[None]
        return _dense(q, k, v, mask, scale)
    from .attention import attend

    sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [n,H,L,d] <-> [n,L,H,d]
    out = attend(sw(q), sw(k), sw(v), impl="pallas", scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale,
                 key_mask=(full_mask == 0).astype(jnp.int32), dtype=q.dtype,
                 bias_table=None if bias is None else bias.table, bucket_fn=None if bias is None else bias.bucket_fn)
    return sw(out)


def lsg_attention(q, k, v, mask, *, num_global_tokens: int, block_size: int, sparse_block_size: int,
                  sparsity_factor: int, sparsity_type: Optional[str], lsh_projections=None, lsh_num_pre_rounds: int = 1,
                  impl: str = "xla", mask_dtype=jnp.float32, scale: Optional[float] = None, bias_table=None,
                  bucket_fn: Optional[Callable] = None):
    """LSG self-attention context ``[n, H, G+t, dh]`` for q/k/v ``[n, H, G+t, dh]``.

    mask: additive float32 ``[n, t]`` (0 keep / MIN masked) over the token part; globals are never masked.
    lsh_projections: for ``sparsity_type="lsh"``, the random matrices of this layer
    (shapes from :func:`lsh_projection_shapes`), the ones the original draws with ``torch.randn``.
    scale: multiplies ``q.k`` (default ``1/sqrt(dh)``, the LSG authors'; T5 uses 1.0).
    bias_table [num_buckets, H] and bucket_fn (rel int32 array -> rows): a relative-position bias added to
    the scores with the positions of the module docstring (globals at ``-G .. -1``).
    """
    if impl not in ("xla", "pallas"):
        raise ValueError(f"impl must be 'xla' or 'pallas', got {impl!r}")
    if (bias_table is None) != (bucket_fn is None):
        raise ValueError("bias_table and bucket_fn go together")
    n, H, T, d = q.shape
    G, B = num_global_tokens, block_size
    t = T - G
    bias = None if bias_table is None else _Bias(bias_table, bucket_fn)
    mask = mask.astype(jnp.float32)
    full_mask = jnp.concatenate([jnp.zeros((n, G), jnp.float32), mask], axis=1)
    if t <= 2 * B:  # the original's full-attention fallback
        return _dense_impl(q, k, v, full_mask, impl, scale, bias)
    check_lsg_geometry(t, B, sparse_block_size, sparsity_factor, sparsity_type)
    has_sparse = _has_sparse(sparse_block_size, sparsity_factor, sparsity_type)
    if impl == "pallas" and bias is not None and has_sparse:
        raise NotImplementedError(
            f"attention_impl='pallas' cannot add the relative-position bias of LSG sparse keys "
            f"(sparsity_type={sparsity_type!r}); use attention_impl='xla' or sparsity_type='none'"
        )
    qg, qt = q[:, :, :G], q[:, :, G:]
    kg, kt = k[:, :, :G], k[:, :, G:]
    vg, vt = v[:, :, :G], v[:, :, G:]

    sparse = None
    if has_sparse:
        ks, vs, ms, *pos = sparse_tokens(
            qt, kt, vt, mask, block_size=B, sparse_block_size=sparse_block_size, sparsity_factor=sparsity_factor,
            sparsity_type=sparsity_type, lsh_projections=lsh_projections, lsh_num_pre_rounds=lsh_num_pre_rounds,
            mask_dtype=mask_dtype, return_positions=bias is not None,
        )
        idx, valid = sparse_window_indices(t, B, sparse_block_size, sparsity_factor)
        idx_j, valid_j = jnp.asarray(idx), jnp.asarray(valid)
        ksw = jnp.where(valid_j[None, None, :, :, None], jnp.take(ks, idx_j, axis=2), 0).astype(k.dtype)
        vsw = jnp.where(valid_j[None, None, :, :, None], jnp.take(vs, idx_j, axis=2), 0).astype(v.dtype)
        msw = jnp.where(valid_j[None, None], jnp.take(ms, idx_j, axis=2), jnp.float32(MIN))  # [n,Hm,nb,S]
        sparse = (ksw, vsw, msw)
        if bias is not None:  # distance from each query of block i to each of its sparse keys
            spw = jnp.take(pos[0], idx_j, axis=2)  # [n?, Hp, nb, S]
            qpos = jnp.arange(t, dtype=jnp.int32).reshape(1, 1, t // B, B, 1)
            sparse = (ksw, vsw, msw, bias.of_per_head(spw[:, :, :, None, :] - qpos))

    if impl == "pallas":
        ctx_g = _dense_impl(qg, k, v, full_mask, impl, scale, bias)
        if bias is not None:
            ctx_t = _lsg_blocks_pallas_biased(qt, kt, vt, mask, kg, vg, B, scale, bias)
        else:
            ctx_t = _lsg_blocks_pallas(qt, kt, vt, mask, kg, vg, sparse, B, scale)
    else:
        ctx_t, ctx_g = _lsg_blocks_xla(q, k, v, mask, G, sparse, B, scale, bias)
    return jnp.concatenate([ctx_g.astype(q.dtype), ctx_t.astype(q.dtype)], axis=2)


# Queries per step of the token-attention loop of the XLA path (rounded to whole blocks).
_XLA_CHUNK_QUERIES = 4096


def _lsg_blocks_xla(q, k, v, mask, G, sparse, B, scale=None, bias: Optional[_Bias] = None):
    """Token queries, one softmax over [globals | sparse keys | local window], computed piece by piece;
    and the global queries, dense over [globals | tokens]. q/k/v [n,H,G+t,d]; returns (token context
    [n,H,t,d], global context [n,H,G,d]).

    The scores of each piece are kept apart (no concatenated key or score tensor): the row max and the
    normaliser are combined across pieces, and each piece's weights multiply its own values. The local
    window reads the previous / own / next block of the keys (gathered around the sequence's ends, where the
    block-padded mask hides them, so that no padded copy of the keys is made). With a bias,
    each piece gets the bias of its distances (globals at -G..-1; sparse keys: ``sparse[3]``, [n?,H,nb,B,S]).

    On CPU the work is a loop (``lax.map``) over (row, head, run of consecutive query blocks), about
    ``_XLA_CHUNK_QUERIES`` queries a step: XLA fuses a step's matmuls and softmax into one kernel whose
    working buffers then stay small (the whole-tensor version allocated and zero-filled hundreds of MB per
    layer on every call and ran 1.3-1.8x slower at 4k-16k tokens). On other backends, where a sequential
    loop would only cost parallelism (and would cut across a sharded batch), the same body runs once over
    all rows, heads and blocks. Same values either way.

    The global queries ride along: each step also scores them against its own token blocks and keeps
    that chunk's row max, normaliser and weighted values; after the loop these partial softmaxes are
    merged with the globals' own piece. (Run on its own, a 64 x 16k softmax and its long contraction
    took ~130 ms per layer at 16k tokens, mostly on one core.)
    """
    n, H, T, d = q.shape
    t = T - G
    qg, kg, vg = q[:, :, :G], k[:, :, :G], v[:, :, :G]
    nb = t // B
    if jax.default_backend() == "cpu":  # rows, heads, blocks per step
        nr, nh, c = 1, 1, max(x for x in range(1, nb + 1) if nb % x == 0 and (x * B <= _XLA_CHUNK_QUERIES or x == 1))
    else:
        nr, nh, c = n, H, nb
    nc = nb // c
    mb = jnp.pad(mask.reshape(n, 1, nb, B), ((0, 0), (0, 0), (1, 1), (0, 0)), constant_values=MIN)
    inv = jnp.float32(1.0 / math.sqrt(d) if scale is None else scale)
    qpos = np.arange(t).reshape(nb, B)
    r = np.arange(B)
    # Operands of the loop body: [n?, H?, ...] with, for blocked ones, the block axis at 2 (sliced to the
    # step's c blocks, c + 2 for the padded mask); axes of size 1 are broadcast, not sliced. q, k, v are
    # read in place: the step's token queries, and its keys / values from one block before to one after.
    ops = dict(qb=(q, "rows"), kb=(k, "window"), vb=(v, "window"), mb=(mb, 2), kg=(kg, None), vg=(vg, None),
               qg=(qg, None))
    if bias is not None:
        ops["bg"] = (bias.of((np.arange(G) - G)[None, None, :] - qpos[:, :, None])[None], 0)  # [1,H,nb,B,G]
        ops["bl"] = (jnp.stack([bias.of((o - 1) * B + r[None, :] - r[:, None]) for o in range(3)])[:, None], None)
    if sparse is not None:
        ops.update(ks=(sparse[0], 0), vs=(sparse[1], 0), ms=(sparse[2], 0))
        if bias is not None:
            ops["bs"] = (sparse[3], 0)
    gpos = np.arange(G)[:, None] - G  # positions of the global queries, against a key's position

    def global_partial(x, h, j):
        """The global queries' scores over this step's own token blocks: (row max, normaliser, e @ v)."""
        keys = x["kb"][:, :, 1:1 + c].reshape(nr, -1, c * B, d)
        vals = x["vb"][:, :, 1:1 + c].reshape(nr, -1, c * B, d)
        s = jnp.einsum("nhgd,nhkd->nhgk", x["qg"], keys).astype(jnp.float32) * inv
        s = s + x["mb"][:, :, 1:1 + c].reshape(nr, 1, 1, c * B)
        if bias is not None:
            table = jax.lax.dynamic_slice_in_dim(bias.table, h, nh, 1)
            s = s + _Bias(table, bias.bucket_fn).of(j * B + np.arange(c * B)[None, :] - gpos)[None]
        return _partial_softmax(s, vals)

    def body(i):
        row, h, j = i // (H // nh * nc) * nr, (i // nc) % (H // nh) * nh, (i % nc) * c
        x = {}
        for name, (a, halo) in ops.items():
            if name == "bl":  # [3, 1, H, B, B]
                x[name] = jax.lax.dynamic_slice_in_dim(a, h, nh, 2)[:, :, :, None]
                continue
            if a.shape[0] > 1:
                a = jax.lax.dynamic_slice_in_dim(a, row, nr, 0)
            if a.shape[1] > 1:
                a = jax.lax.dynamic_slice_in_dim(a, h, nh, 1)
            if halo == "rows":
                a = jax.lax.dynamic_slice_in_dim(a, G + j * B, c * B, 2).reshape(a.shape[:2] + (c, B, d))
            elif halo == "window":
                pos = G + ((j - 1) * B + jnp.arange((c + 2) * B, dtype=jnp.int32)) % t
                a = jnp.take(a, pos, axis=2, mode="clip").reshape(a.shape[:2] + (c + 2, B, d))
            elif halo is not None:
                a = jax.lax.dynamic_slice_in_dim(a, j, c + halo, 2)
            x[name] = a

        def scores(eq, keys):
            return jnp.einsum(eq, x["qb"], keys).astype(jnp.float32) * inv

        s = scores("nhbqd,nhgd->nhbqg", x["kg"])
        if bias is not None:
            s = s + x["bg"]
        pieces = [(s, x["vg"], "nhbqg,nhgd->nhbqd")]
        if sparse is not None:
            s = scores("nhbqd,nhbsd->nhbqs", x["ks"]) + x["ms"][:, :, :, None, :]
            if bias is not None:
                s = s + x["bs"]
            pieces.append((s, x["vs"], "nhbqs,nhbsd->nhbqd"))
        for o in range(3):  # blocks i-1, i, i+1
            s = scores("nhbqd,nhbkd->nhbqk", x["kb"][:, :, o:o + c]) + x["mb"][:, :, o:o + c, None, :]
            if bias is not None:  # key (i-1+o)B + c, query iB + r: the same distances in every block
                s = s + x["bl"][o]
            pieces.append((s, x["vb"][:, :, o:o + c], "nhbqk,nhbkd->nhbqd"))
        row_max = functools.reduce(jnp.maximum, [jax.lax.stop_gradient(s.max(-1, keepdims=True)) for s, _, _ in pieces])
        out, den = 0.0, 0.0
        for s, vals, eq in pieces:
            e = jnp.exp(s - row_max)
            den = den + e.sum(-1, keepdims=True)
            out = out + jnp.einsum(eq, e.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
        return (out / den).astype(q.dtype).reshape(nr, nh, c * B, d), global_partial(x, h, j)

    steps = n // nr * (H // nh) * nc

    def steps_first(a):  # [(row, head, chunk) steps, nr, nh, ...] -> [n, H, chunk, ...]
        rest = a.shape[3:]
        a = a.reshape((n // nr, H // nh, nc, nr, nh) + rest).transpose((0, 3, 1, 4, 2) + tuple(range(5, 5 + len(rest))))
        return a.reshape((n, H, nc) + rest)

    if steps == 1:
        out, parts = body(0)
        out, parts = out[None], jax.tree.map(lambda a: a[None], parts)
    else:
        out, parts = jax.lax.map(body, jnp.arange(steps, dtype=jnp.int32))
    out = steps_first(out).reshape(n, H, t, d)
    m, den, o = (steps_first(a) for a in parts)  # [n, H, nc, G, 1 | 1 | d]
    # the globals' own piece: every global sees every global
    s = jnp.einsum("nhgd,nhkd->nhgk", qg, kg).astype(jnp.float32) * inv
    if bias is not None:
        s = s + bias.of(np.arange(G)[None, :] - np.arange(G)[:, None])[None]
    m0, den0, o0 = _partial_softmax(s, vg)
    top = jnp.maximum(m0, m.max(2))
    w, w0 = jnp.exp(m - top[:, :, None]), jnp.exp(m0 - top)
    num = o0 * w0 + (o * w).sum(2)
    den = den0 * w0 + (den * w).sum(2)
    return out, (num / den).astype(qg.dtype)


def _partial_softmax(s, vals):
    """Scores s [n,h,q,k] (float32) over values [n,h,k,d]: (row max, sum of exp(s - max), exp(s - max) @ v)."""
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    e = jnp.exp(s - m)
    o = jnp.einsum("nhqk,nhkd->nhqd", e.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
    return m, e.sum(-1, keepdims=True), o


def _lsg_blocks_pallas(qt, kt, vt, mask, kg, vg, sparse, B, scale=None):
    """The token queries on the block-sparse Pallas kernel: local window as the block layout, the
    globals as extra keys, the sparse keys as per-block extra keys."""
    bsa = _kernel()
    n, H, t, d = qt.shape
    layout = _pallas_layout(t, B)
    keep = mask == 0  # [n, t]
    kw = {}
    if sparse is not None:
        ksw, vsw, msw = sparse
        kw = dict(block_extra_k=ksw, block_extra_v=vsw, block_extra_mask=(msw == 0).astype(jnp.int32))
    return bsa.block_sparse_attention(
        qt, kt, vt, layout, scale=1.0 / math.sqrt(d) if scale is None else scale, key_mask=keep.astype(jnp.int32),
        extra_k=kg, extra_v=vg, qkv_layout="bhld", **kw,
    )


def _lsg_blocks_pallas_biased(qt, kt, vt, mask, kg, vg, B, scale, bias: _Bias):
    """Local + global attention of the token queries with a relative bias, on the kernel.

    The kernel adds its bias to the main keys only, so the globals become main keys: the keys are
    ``[P-G zero rows (masked) | G globals | t tokens]`` with P the globals rounded up to a kernel key block,
    and the queries sit at offset P. Key index minus query index is then exactly the distance of the
    module's rule (global g at position g - G, token j at j). Each query block visits the prefix block(s)
    and its local window.
    """
    bsa = _kernel()
    n, H, t, d = qt.shape
    G = kg.shape[2]
    bk = _prefix_key_block(B, G)
    P = -(-G // bk) * bk
    z = jnp.zeros((n, H, P - G, d), kt.dtype)
    keys = jnp.concatenate([z, kg.astype(kt.dtype), kt], axis=2)
    values = jnp.concatenate([z, vg.astype(vt.dtype), vt], axis=2)
    keep = jnp.concatenate([jnp.zeros((n, P - G), jnp.int32), jnp.ones((n, G), jnp.int32),
                            (mask == 0).astype(jnp.int32)], axis=1)
    buckets = bias.bucket_fn(jnp.asarray(bsa.relative_positions(t, P + t, P)))
    return bsa.block_sparse_attention(
        qt, keys, values, _pallas_prefix_layout(t, B, bk, P), scale=1.0 / math.sqrt(d) if scale is None else scale,
        q_offset=P, key_mask=keep, bias_table=bias.table, bias_buckets=buckets, qkv_layout="bhld",
    )


def _prefix_key_block(B: int, G: int) -> int:
    """Kernel key block for the biased path: the LSG block, halved while it stays >= max(G, 64), so a
    few globals do not cost a whole LSG block of padded keys."""
    bk = B
    while bk % 2 == 0 and bk // 2 >= max(G, 64):
        bk //= 2
    return bk


def _kernel():
    try:
        from lmzoo.kernels import block_sparse_attention as bsa
    except ImportError as e:  # pragma: no cover - the kernel ships with lmzoo
        raise NotImplementedError(f"attention_impl='pallas' needs lmzoo.kernels.block_sparse_attention ({e})") from None
    return bsa


@functools.lru_cache(maxsize=32)
def _pallas_layout(t: int, B: int):
    from lmzoo.kernels import block_sparse_attention as bsa

    return bsa.lsg_layout(t, B)


@functools.lru_cache(maxsize=32)
def _pallas_prefix_layout(t: int, B: int, bk: int, P: int):
    """Query blocks of B tokens over keys [prefix of P | t tokens] in blocks of bk: the prefix blocks and
    the key blocks of tokens [(i-1)B, (i+2)B)."""
    from lmzoo.kernels.block_sparse_attention import BlockLayout

    nq, npre, nk = t // B, P // bk, t // bk
    first = np.arange(nk) * bk  # first token of each token key block
    lo, hi = (np.arange(nq)[:, None] - 1) * B, (np.arange(nq)[:, None] + 2) * B
    m = np.concatenate([np.ones((nq, npre), bool), (first[None, :] >= lo) & (first[None, :] + bk <= hi)], axis=1)
    return BlockLayout.from_block_mask(m, B, bk)

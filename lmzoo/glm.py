"""GLM (THUDM glm-large ... glm-10b-chinese) as the Hugging Face remote code ``GLMForConditionalGeneration`` computes it.

Pre-LN decoder with one fused Q|K|V projection, a final LayerNorm and the word embedding tied as the output
layer; every token carries two learned positions (position, block position) that are added to its word
embedding. The attention mask comes in the forms the original accepts (dispatch on its number of elements):
a per-example context length ``sep`` (Part A bidirectional, Part B causal), an explicit 4-D (or 2-D key
padding) mask, or none (= causal). ``mems`` are the per-layer *inputs* (hidden states, not K/V), stacked
[L+1, B, M, H]. The blank-infilling layout and generation live in :mod:`lmzoo.glm_infill`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .attention import F32_MIN, attend
from .configuration import ConfigError, ModelConfig
from .layers import (ACTIVATIONS, DECODE_KV_LAYOUT, KV_LAYOUTS, KV_LENGTH_AXIS, Embed, LayerNorm, Linear, constrain, decode_kv,
                     kv_layouts, write_decode_cache)
from .modeling import PretrainedModel
from .outputs import ModelOutput

__all__ = [
    "GLMConfig",
    "GLMModule",
    "GLMOutput",
    "GLMForConditionalGeneration",
    "GLMForMultipleChoice",
    "GLMForSequenceClassification",
    "GLM_SIZES",
    "build_attention_mask",
    "attention_mask_spec",
    "factor_mask",
    "per_device_param_bytes",
    "model_class",
]

MASK_FILL = -65504.0  # the original's additive mask constant (the fp16 max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GLMConfig(ModelConfig):
    """Fields under the names of the hub ``configuration_glm.py``; two lmzoo-only knobs (GELU form, eps)."""

    family = "glm"
    model_type = "glm"

    num_layers: int = 24
    vocab_size: int = 30592
    hidden_size: int = 1024
    num_attention_heads: int = 16
    max_sequence_length: int = 512
    embedding_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    output_dropout_prob: float = 0.1
    attention_scale: float = 1.0
    block_position_encoding: bool = True
    relative_encoding: bool = False
    output_predict: bool = True
    pool_token: str = "cls"
    num_labels: int = 2
    classifier_dropout: Optional[float] = None
    # Not in hub configs: the HF port uses exact erf GELU and a hard-wired eps of 1e-5; the original
    # Megatron training code used the tanh approximation (set gelu_approximate=True for that).
    gelu_approximate: bool = False
    layernorm_epsilon: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_layers", "vocab_size", "hidden_size", "num_attention_heads", "max_sequence_length"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ConfigError(f"GLM config: {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"GLM config: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.relative_encoding:
            raise ConfigError("GLM config: relative_encoding=True (Transformer-XL style) is not supported; no released GLM uses it")
        if self.attention_scale < 1.0:
            raise ConfigError(f"GLM config: attention_scale must be >= 1.0, got {self.attention_scale}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_rows(self) -> int:
        return self.max_sequence_length + 1 if self.block_position_encoding else self.max_sequence_length

    @classmethod
    def from_hf_config(cls, hf, **runtime):
        hf = dict(hf)
        kwargs = {name: hf[name] for name in cls.architecture_fields() if name in hf}
        if "num_labels" not in hf and isinstance(hf.get("id2label"), dict):
            kwargs["num_labels"] = len(hf["id2label"])
        return cls(**kwargs, **runtime, hf_config=hf)

    def to_hf_config(self):
        out = super().to_hf_config()
        out.setdefault("architectures", ["GLMModel"])
        # lmzoo-only knobs stay out of the file unless they differ from the HF port's behaviour.
        if not self.gelu_approximate:
            out.pop("gelu_approximate", None)
        if self.layernorm_epsilon == 1e-5:
            out.pop("layernorm_epsilon", None)
        return out

    def generation_defaults(self):
        out = super().generation_defaults()
        # glm-10b-chinese ships "bad_words_id": [50009] (the [gMASK] row that duplicates <|endofpiece|>).
        if out.get("bad_words_ids") is None and self.hf_config.get("bad_words_id"):
            ids = self.hf_config["bad_words_id"]
            out["bad_words_ids"] = [[int(i)] for i in (ids if isinstance(ids, (list, tuple)) else [ids])]
        return out

    def num_params(self) -> int:
        H, L = self.hidden_size, self.num_layers
        return self.vocab_size * H + 2 * self.position_rows * H + L * (12 * H * H + 13 * H) + 2 * H


def _hub(num_layers, hidden_size, heads, max_seq, vocab, **extra) -> dict:
    return {
        "architectures": ["GLMModel"],
        "model_type": "glm",
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": heads,
        "max_sequence_length": max_seq,
        "vocab_size": vocab,
        "attention_scale": 1.0,
        "block_position_encoding": True,
        "output_predict": True,
        **extra,
    }


# The released sizes (hub config fields that shape the model).
GLM_SIZES: dict[str, dict] = {
    "glm-large": _hub(24, 1024, 16, 512, 30592),
    "glm-roberta-large": _hub(24, 1024, 16, 512, 50304),
    "glm-large-chinese": _hub(24, 1024, 16, 1024, 50048),
    "glm-515m": _hub(30, 1152, 18, 512, 30592),
    "glm-2b": _hub(36, 2048, 32, 1024, 50304),
    "glm-10b": _hub(48, 4096, 64, 1024, 50304),
    "glm-10b-chinese": _hub(48, 4096, 64, 1024, 50048, bad_words_id=[50009]),
}


# ----------------------------------------------------------------------------------------------------
def build_attention_mask(attention_mask, batch: int, query_len: int, memory_len: int = 0):
    """The original's mask dispatch, returning [B|1, 1, S, M+S] (bool for the sep form, else as given).

    numel 1 or B -> per-example context length ``sep``: query i sees key j iff j < sep or j <= i, and all
    M memory columns; a 2-D mask [B, T] -> key padding [B,1,1,T] (no causal part); 4-D -> its last M+S
    columns. ``None`` -> sep 0 (purely causal).
    """
    S, M = query_len, memory_len
    if attention_mask is None:
        attention_mask = jnp.zeros((batch,), jnp.int32)
    am = jnp.asarray(attention_mask)
    if am.size == 1 or am.size == batch:
        sep = am.reshape(-1).astype(jnp.int32)  # [1] or [B]
        i = jnp.arange(S)[:, None]
        j = jnp.arange(S)[None, :]
        m = (j <= i)[None] | (j[None] < sep[:, None, None])  # [B|1, S, S]
        if M:
            m = jnp.concatenate([jnp.ones((m.shape[0], S, M), bool), m], axis=2)
            m = jnp.broadcast_to(m, (batch, S, M + S))
        return m[:, None]
    if am.ndim == 2:
        am = am[:, None, None, :]
    elif am.ndim != 4:
        raise ValueError(
            f"attention_mask must be a per-example context length (shape [] or [B]), a key mask [B, T] or a "
            f"4-D mask [B, 1, S, T]; got shape {tuple(am.shape)}"
        )
    if am.shape[-1] < M + S:
        raise ValueError(f"attention_mask covers {am.shape[-1]} keys, but memory + input is {M} + {S} = {M + S}")
    return am[..., am.shape[-1] - (M + S):]


def factor_mask(mask, memory_len: int = 0):
    """Express a dense 0/1 mask [B|1, 1, S, T] (T = memory_len + S) as the kernel's rule, on device.

    Returns ``{"prefix_len": [B] int32, "key_mask": [B, T] bool, "factored": bool scalar}``: key j is
    visible to query i iff key_mask[j] and (j < prefix_len or j <= memory_len + i), and ``factored``
    says whether that reproduces the mask exactly (numbers other than 0 and 1 never factor). This covers
    the HF ``build_inputs_for_generation`` layout (padded contexts: bidirectional context minus its pad
    columns, causal generated part) and causal or sep-form masks given in 4-D; block-diagonal layouts
    (multiple-choice scoring) do not factor. Elementwise work on the given mask only; nothing larger.
    """
    m = jnp.asarray(mask)
    binary = jnp.ones((), bool) if m.dtype == jnp.bool_ else jnp.all((m == 0) | (m == 1))
    m = (m != 0)[:, 0]  # [B|1, S, T]
    _, S, T = m.shape
    key_mask = jnp.any(m, axis=1)
    partial = key_mask & ~jnp.all(m, axis=1)  # keys seen by some queries but not all
    prefix_len = jnp.where(jnp.any(partial, axis=1), jnp.argmax(partial, axis=1), T).astype(jnp.int32)
    i = jnp.arange(S)[:, None] + (T - S)
    j = jnp.arange(T)[None, :]
    rule = key_mask[:, None, :] & ((j[None] < prefix_len[:, None, None]) | (j <= i)[None])
    return {"prefix_len": prefix_len, "key_mask": key_mask, "factored": binary & jnp.all(rule == m)}


def attention_mask_spec(attention_mask, batch: int, query_len: int, memory_len: int = 0, impl: str = "xla"):
    """The mask the layers get: :func:`build_attention_mask`'s dense mask for ``impl="xla"``; for
    ``"pallas"`` a factored form the kernel computes in-kernel (no S x T array is built).

    * sep form (and ``None``): ``{"prefix_len": sep + M}`` — causal with q_offset = M, memory keys
      visible to every query (the kernel docs' rule for mems).
    * 2-D key mask: ``{"key_mask": [B, M+S]}``; a mask of numbers (not bool) also carries the dense mask
      and runs the XLA path where its values are not all 0/1 (``lax.cond`` on device).
    * 4-D mask [B|1, 1, S, M+S]: :func:`factor_mask`, with the dense mask for the XLA path where it does
      not factor. A per-head 4-D mask stays dense (XLA).
    """
    if impl != "pallas":
        return build_attention_mask(attention_mask, batch, query_len, memory_len)
    am = jnp.zeros((batch,), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    if am.size == 1 or am.size == batch:
        sep = jnp.broadcast_to(am.reshape(-1).astype(jnp.int32), (batch,))
        return {"prefix_len": sep + memory_len}
    dense = build_attention_mask(am, batch, query_len, memory_len)  # validates the 2-D and 4-D forms
    if am.ndim == 2:
        km = jnp.broadcast_to(dense[:, 0, 0], (batch, dense.shape[-1]))
        if km.dtype == jnp.bool_:
            return {"key_mask": km}
        return {"key_mask": km != 0, "factored": jnp.all((km == 0) | (km == 1)), "dense": dense}
    if dense.shape[1] != 1:
        return dense
    spec = factor_mask(dense, memory_len)
    spec["prefix_len"] = jnp.broadcast_to(spec["prefix_len"], (batch,))
    spec["key_mask"] = jnp.broadcast_to(spec["key_mask"], (batch, dense.shape[-1]))
    spec["dense"] = dense
    return spec


class GLMAttention(nn.Module):
    """Fused Q|K|V projection (kernel [H, 3, n, d]: contiguous thirds, head-contiguous inside each)."""

    config: GLMConfig

    def setup(self):
        c = self.config
        n, d, H = c.num_attention_heads, c.head_dim, c.hidden_size
        init = nn.initializers.normal(0.02)
        self.qkv_kernel = self.param(
            "qkv_kernel", nn.with_logical_partitioning(init, ("embed", None, "heads", "kv")), (H, 3, n, d), c.params_dtype
        )
        self.qkv_bias = self.param(
            "qkv_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "kv")), (3, n, d), c.params_dtype
        )
        self.dense_kernel = self.param(
            "dense_kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02 / math.sqrt(2 * c.num_layers)), ("heads", "kv", "embed")),
            (n, d, H),
            c.params_dtype,
        )
        self.dense_bias = self.param("dense_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (H,), c.params_dtype)

    def project(self, h, which: slice = slice(0, 3)):
        """h [B,S,H] -> [B,S,k,n,d] for the thirds in ``which`` (0 = Q, 1 = K, 2 = V)."""
        dt = self.config.compute_dtype
        w = self.qkv_kernel[:, which].astype(dt)
        y = jnp.einsum("bsh,hknd->bsknd", h.astype(dt), w) + self.qkv_bias[which].astype(dt)
        return constrain(y, ("batch", "length", None, "act_heads", "kv"))

    def attend(self, q, k, v, mask, kv_layout="blhd"):
        """q [B,S,n,d], k/v [B,T,n,d] (or head-major, as ``kv_layout`` names: see
        :func:`lmzoo.attention.attend`) -> [B,S,H] after ``dense``.

        ``mask``: a dense [B|1,1,S,T] mask (bool or 0/1 numbers; the XLA path) or, with
        ``attention_impl="pallas"``, the factored form of :func:`attention_mask_spec` (kernel path, or
        the XLA path on device where a 4-D mask does not factor).
        """
        c = self.config
        dt = c.compute_dtype
        if isinstance(mask, dict):
            if mask.get("dense") is None:
                ctx = _kernel_context(q, k, v, mask, c, kv_layout)
            else:
                ctx = jax.lax.cond(
                    mask["factored"],
                    lambda: _kernel_context(q, k, v, mask, c, kv_layout),
                    lambda: _xla_context(q, k, v, mask["dense"], c, kv_layout),
                )
        else:
            ctx = _xla_context(q, k, v, mask, c, kv_layout)
        ctx = constrain(ctx.astype(dt), ("batch", "length", "act_heads", "kv"))
        return jnp.einsum("bsnd,ndh->bsh", ctx, self.dense_kernel.astype(dt)) + self.dense_bias.astype(dt)


def _xla_context(q, k, v, mask, c: GLMConfig, kv_layout="blhd"):
    """The original's attention, step by step (the numerical reference): [B,S,n,d]."""
    dt = c.compute_dtype
    d = c.head_dim
    a = c.attention_scale
    ks, vs = (KV_LAYOUTS[x] for x in kv_layouts(kv_layout))
    if a > 1.0:
        scores = jnp.einsum(f"bqhd,{ks}->bhqk", q / jnp.asarray(math.sqrt(a), dt), k / jnp.asarray(math.sqrt(d * a), dt))
    else:
        # The original divides K by sqrt(d) before the matmul; keep that order.
        scores = jnp.einsum(f"bqhd,{ks}->bhqk", q, k / jnp.asarray(math.sqrt(d), dt))
    scores = scores.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    if a > 1.0:
        scores = scores * m
        scores = (scores - jnp.max(scores, axis=-1, keepdims=True)) * a
        scores = scores + MASK_FILL * (1.0 - m)
    elif mask.dtype == jnp.bool_:
        scores = jnp.where(mask, scores, MASK_FILL)  # == scores*m + fill*(1-m) for 0/1 masks
    else:
        scores = scores * m + MASK_FILL * (1.0 - m)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum(f"bhqk,{vs}->bqhd", probs, v.astype(dt))


def _kernel_context(q, k, v, spec: dict, c: GLMConfig, kv_layout="blhd"):
    """The block-sparse kernel on the factored mask: [B,S,n,d].

    Scale d^-0.5 whatever ``attention_scale`` is: the original's a > 1 branch computes
    (q/sqrt(a))·(k/sqrt(d·a)), subtracts the row max and multiplies by a, which leaves the softmax over
    the visible keys that of q·k/sqrt(d). The original *replaces* masked scores by -65504: masked keys get
    exactly zero weight (the kernel masks them), a fully masked row attends uniformly over all keys, and
    masked scores get no gradient (``replace_masked``).
    """
    Lq, Lk = q.shape[1], k.shape[KV_LENGTH_AXIS[kv_layouts(kv_layout)[0]]]
    prefix_len = spec.get("prefix_len")
    return attend(
        q, k, v, impl="pallas", scale=c.head_dim**-0.5, key_mask=spec.get("key_mask"), causal=prefix_len is not None,
        q_offset=Lk - Lq, prefix_len=prefix_len, mask_value=F32_MIN, dtype=c.compute_dtype, replace_masked=True,
        kv_layout=kv_layout,
    )


class GLMMLP(nn.Module):
    config: GLMConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype, use_bias=True)
        h = Linear(4 * c.hidden_size, axes=("embed", "mlp"), name="dense_h_to_4h", **kw)(x)
        h = ACTIVATIONS["gelu_new" if c.gelu_approximate else "gelu"](h)
        h = constrain(h, ("batch", "length", "act_mlp"))
        return Linear(
            c.hidden_size,
            axes=("mlp", "embed"),
            name="dense_4h_to_h",
            kernel_init=nn.initializers.normal(0.02 / math.sqrt(2 * c.num_layers)),
            **kw,
        )(h)


class GLMLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)); x + mlp(LN(x)). Keys/values also cover LN(mem) when a mem is given."""

    config: GLMConfig

    def setup(self):
        c = self.config
        kw = dict(epsilon=c.layernorm_epsilon, dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.input_layernorm = LayerNorm(**kw)
        self.attention = GLMAttention(c)
        self.post_attention_layernorm = LayerNorm(**kw)
        self.mlp = GLMMLP(c)

    def kv(self, x):
        """K and V [B,S,n,d] of a layer input (what an incremental-decoding cache stores)."""
        kv = self.attention.project(self.input_layernorm(x), slice(1, 3))
        return kv[:, :, 0], kv[:, :, 1]

    def __call__(self, x, mask, mem=None, kv_cache=None, kv_layout="blhd"):
        """x [B,S,H]; mem [B,M,H] (hidden states) or kv_cache (k, v) [B,T,n,d] (or as ``kv_layout`` names)
        already holding x's own keys."""
        h = self.input_layernorm(x)
        if kv_cache is not None:
            q = self.attention.project(h, slice(0, 1))[:, :, 0]
            k, v = kv_cache
        else:
            qkv = self.attention.project(h)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            if mem is not None:
                km, vm = self.kv(mem)
                k = jnp.concatenate([km, k], axis=1)
                v = jnp.concatenate([vm, v], axis=1)
        x = x + self.attention.attend(q, k, v, mask, kv_layout if kv_cache is not None else "blhd")
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed"))


class GLMStack(nn.Module):
    """Position tables, the layers and the final LayerNorm (the original's ``transformer``)."""

    config: GLMConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype, embedding_init=nn.initializers.normal(0.02))
        self.position_embeddings = Embed(c.position_rows, c.hidden_size, axes=("positions", "embed"), **kw)
        if c.block_position_encoding:
            self.block_position_embeddings = Embed(c.position_rows, c.hidden_size, axes=("positions", "embed"), **kw)
        self.layers = [GLMLayer(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.final_layernorm = LayerNorm(epsilon=c.layernorm_epsilon, dtype=c.compute_dtype, param_dtype=c.params_dtype)

    def embed_positions(self, words, position_ids):
        """words [B,S,H] + position (+ block position) embeddings; position_ids [B|1, 2, S] (or [B|1, S])."""
        c = self.config
        if position_ids.ndim == 3:
            pos, block = position_ids[:, 0], position_ids[:, 1]
        elif not c.block_position_encoding:
            pos, block = position_ids, None
        else:
            raise ValueError(f"position_ids must be [B, 2, S] (positions, block positions), got shape {tuple(position_ids.shape)}")
        x = words + self.position_embeddings(pos)
        if c.block_position_encoding:
            x = x + self.block_position_embeddings(block)
        return x


class GLMModule(nn.Module):
    """The full GLM: ``__call__`` (forward with optional mems), ``prefill`` and ``decode_step`` for generation."""

    config: GLMConfig

    def setup(self):
        c = self.config
        self.word_embeddings = Embed(
            c.vocab_size, c.hidden_size, dtype=c.compute_dtype, param_dtype=c.params_dtype, embedding_init=nn.initializers.normal(0.02)
        )
        self.transformer = GLMStack(c)

    def embed(self, input_ids, position_ids):
        x = self.transformer.embed_positions(self.word_embeddings(input_ids), position_ids)
        return constrain(x, ("batch", "length", "act_embed"))

    def logits(self, y):
        return self.word_embeddings.attend(y)

    def __call__(self, input_ids, position_ids, mask, mems: Optional[Sequence] = None, *, logits: bool = True):
        """Returns (last_hidden_states, logits or None, mems list of L+1 [B, M+S, H])."""
        x = self.embed(input_ids, position_ids)
        states = [x]
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, mask, None if mems is None else mems[i])
            states.append(x)
        y = self.transformer.final_layernorm(x)
        new_mems = states if mems is None else [jnp.concatenate([m.astype(s.dtype), s], axis=1) for m, s in zip(mems, states)]
        return y, (self.logits(y) if logits else None), new_mems

    def prefill(self, input_ids, position_ids, mask, cache_len: int):
        """Run a prompt [B,S] and return its K/V cache per layer, zero-padded to ``cache_len`` positions, in
        the layouts of :meth:`decode_step`."""
        x = self.embed(input_ids, position_ids)
        cache = []
        S = input_ids.shape[1]
        for layer in self.transformer.layers:
            k, v = layer.kv(x)
            pad = [(0, 0), (0, cache_len - S), (0, 0), (0, 0)]
            cache.append(decode_kv(jnp.pad(k, pad), jnp.pad(v, pad)))
            x = layer(x, mask, kv_cache=(k, v))
        return cache

    def decode_step(self, tokens, position_ids, key_mask, cache, index):
        """Feed one token per row at cache slot ``index``: tokens [N], position_ids [N,2], key_mask [N,T] bool.

        cache per layer: (k, v) in the decoding layouts (``DECODE_KV_LAYOUT``: k [N,n,d,T], v [N,n,T,d])."""
        x = self.embed(tokens[:, None], position_ids[:, :, None])
        # one query per row: its generation-mask row is a key mask, which the kernel takes as it is
        mask = {"key_mask": key_mask} if self.config.attention_impl == "pallas" else key_mask[:, None, None, :]
        new_cache = []
        for layer, layer_cache in zip(self.transformer.layers, cache):
            kv = write_decode_cache(layer_cache, *layer.kv(x), index)
            new_cache.append(kv)
            x = layer(x, mask, kv_cache=kv, kv_layout=DECODE_KV_LAYOUT)
        y = self.transformer.final_layernorm(x)
        return self.logits(y)[:, 0].astype(jnp.float32), new_cache


class GLMClassificationHead(nn.Module):
    """HF ``GLMForSequenceClassification``: tanh(dense(h[:, 0])) -> out_proj (dropouts are eval no-ops)."""

    config: GLMConfig

    @nn.compact
    def __call__(self, pooled):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype, use_bias=True)
        h = jnp.tanh(Linear(c.hidden_size, axes=("embed", "mlp"), name="dense", **kw)(pooled))
        return Linear(c.num_labels, axes=("mlp", "classes"), name="out_proj", **kw)(h)


class GLMClassifierModule(nn.Module):
    config: GLMConfig

    def setup(self):
        self.glm = GLMModule(self.config)
        self.head = GLMClassificationHead(self.config)

    def __call__(self, input_ids, position_ids, mask):
        y, _, mems = self.glm(input_ids, position_ids, mask, logits=False)
        return self.head(y[:, 0]), y


# ----------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class GLMOutput(ModelOutput):
    """GLMModel / GLMForConditionalGeneration outputs: ``mems`` stacked [L+1, B, M+S, H]."""

    logits: Optional[jax.Array] = None
    last_hidden_states: Optional[jax.Array] = None
    mems: Optional[jax.Array] = None
    loss: Optional[jax.Array] = None


@flax.struct.dataclass
class GLMMultipleChoiceOutput(ModelOutput):
    logits: Optional[jax.Array] = None  # [B, n_choices] summed log-probabilities
    lm_logits: Optional[jax.Array] = None
    mems: Optional[jax.Array] = None
    loss: Optional[jax.Array] = None


@flax.struct.dataclass
class GLMSequenceClassifierOutput(ModelOutput):
    logits: Optional[jax.Array] = None
    hidden_states: Optional[jax.Array] = None
    loss: Optional[jax.Array] = None


def _mems_list(mems, num_layers: int):
    if mems is None:
        return None
    if isinstance(mems, (list, tuple)):
        mems = [jnp.asarray(m) for m in mems]
    else:
        mems = list(jnp.asarray(mems))
    if len(mems) not in (num_layers, num_layers + 1):
        raise ValueError(f"mems must hold L+1 = {num_layers + 1} (or L) arrays [B, M, H], got {len(mems)}")
    return mems


def _positions(position_ids, input_ids):
    if position_ids is None:
        S = input_ids.shape[1]
        return jnp.stack([jnp.arange(S), jnp.zeros((S,), jnp.int32)])[None]  # [1, 2, S], broadcast over B
    return jnp.asarray(position_ids).astype(jnp.int32)


def _check_ids(input_ids):
    if input_ids is None:
        raise ValueError("GLM needs input_ids [batch, length]")
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    return input_ids.astype(jnp.int32)


def cross_entropy(logits, labels, ignore_index: int = -100):
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


class _GLMBase(PretrainedModel):
    family = "glm"
    config_class = GLMConfig

    @classmethod
    def make_module(cls, config):
        return GLMModule(config)

    @classmethod
    def key_map(cls, config):
        from lmzoo.convert.glm import glm_key_map

        return glm_key_map(config, head=cls.head)

    head: str = "lm"

    def dummy_inputs(self):
        ids = jnp.zeros((1, 4), jnp.int32)
        return {"input_ids": ids, "position_ids": jnp.zeros((1, 2, 4), jnp.int32), "mask": jnp.ones((1, 1, 4, 4), bool)}

    def _run(self, params, input_ids, position_ids, attention_mask, mems=None, logits=True):
        c = self.config
        input_ids = _check_ids(input_ids)
        B, S = input_ids.shape
        mems = _mems_list(mems, c.num_layers)
        M = 0 if mems is None else mems[0].shape[1]
        mask = attention_mask_spec(attention_mask, B, S, M, c.attention_impl)
        pos = _positions(position_ids, input_ids)
        return self.module.apply({"params": params}, input_ids, pos, mask, mems, logits=logits)

    @classmethod
    def from_state_dict(cls, config, state_dict, **kw):
        # A checkpoint with HF classification-head keys loads as the classifier whatever config.json says.
        if cls is GLMForConditionalGeneration and "out_proj.weight" in state_dict and "dense.weight" in state_dict:
            cls = GLMForSequenceClassification
        return super(_GLMBase, cls).from_state_dict.__func__(cls, config, state_dict, **kw)

    # -- generation -------------------------------------------------------------------------------
    def decoding(self):
        from .glm_infill import glm_decoding

        return glm_decoding(self)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        from .glm_infill import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)


class GLMForConditionalGeneration(_GLMBase):
    """GLM with the tied LM head; outputs ``logits``, ``last_hidden_states`` and stacked ``mems``."""

    architecture = "GLMForConditionalGeneration"

    def forward(self, params, input_ids=None, position_ids=None, attention_mask=None, labels=None, mems=None, return_dict=None):
        y, logits, new_mems = self._run(params, input_ids, position_ids, attention_mask, mems)
        loss = None
        if labels is not None:
            # The reference revision shifts: logits[:, :-1] predict labels[:, 1:].
            loss = cross_entropy(logits[:, :-1], jnp.asarray(labels)[:, 1:])
        return GLMOutput(
            logits=logits.astype(jnp.float32), last_hidden_states=y, mems=jnp.stack(new_mems), loss=loss
        )


class GLMForMultipleChoice(_GLMBase):
    """Cloze scoring: per choice, the summed log-probability of its tokens at its positions.

    ``choice_ids`` / ``choice_indices``: per example a list of choices, each a list of token ids and the
    positions (in input_ids) whose distributions score them, as HF ``build_inputs_for_multiple_choice`` makes
    them; ragged python lists or padded arrays [B, C, K] with ``-100`` (or any negative id) as padding.
    """

    architecture = "GLMForMultipleChoice"

    def forward(
        self, params, input_ids=None, position_ids=None, attention_mask=None, choice_ids=None, choice_indices=None, labels=None, mems=None
    ):
        y, logits, new_mems = self._run(params, input_ids, position_ids, attention_mask, mems)
        if choice_ids is None or choice_indices is None:
            raise ValueError("GLMForMultipleChoice needs choice_ids and choice_indices")
        ids, idx, valid = _pad_choices(choice_ids, choice_indices)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B,S,V]
        b = jnp.arange(ids.shape[0])[:, None, None]
        picked = logp[b, jnp.where(valid, idx, 0), jnp.where(valid, ids, 0)]
        scores = jnp.sum(jnp.where(valid, picked, 0.0), axis=-1)  # [B, C]
        loss = None
        if labels is not None:
            loss = cross_entropy(scores, jnp.asarray(labels))
        return GLMMultipleChoiceOutput(logits=scores, lm_logits=logits.astype(jnp.float32), mems=jnp.stack(new_mems), loss=loss)


def _pad_choices(choice_ids, choice_indices):
    if isinstance(choice_ids, (jax.Array, np.ndarray)) and isinstance(choice_indices, (jax.Array, np.ndarray)):
        ids = jnp.asarray(choice_ids).astype(jnp.int32)
        idx = jnp.asarray(choice_indices).astype(jnp.int32)
        if ids.shape != idx.shape or ids.ndim != 3:
            raise ValueError(f"choice_ids {tuple(ids.shape)} and choice_indices {tuple(idx.shape)} must both be [B, C, K]")
        return ids, idx, (ids >= 0) & (idx >= 0)
    ids_l = [[list(np.asarray(c).reshape(-1)) for c in ex] for ex in choice_ids]
    idx_l = [[list(np.asarray(c).reshape(-1)) for c in ex] for ex in choice_indices]
    B = len(ids_l)
    C = max(len(ex) for ex in ids_l)
    K = max(len(c) for ex in ids_l for c in ex)
    ids = np.full((B, C, K), -1, np.int32)
    idx = np.full((B, C, K), -1, np.int32)
    for b in range(B):
        if len(ids_l[b]) != len(idx_l[b]):
            raise ValueError(f"example {b}: {len(ids_l[b])} choices in choice_ids but {len(idx_l[b])} in choice_indices")
        for c_, (ci, cx) in enumerate(zip(ids_l[b], idx_l[b])):
            if len(ci) != len(cx):
                raise ValueError(f"example {b} choice {c_}: {len(ci)} token ids but {len(cx)} indices")
            ids[b, c_, : len(ci)] = ci
            idx[b, c_, : len(cx)] = cx
    valid = (ids >= 0) & (idx >= 0)
    return jnp.asarray(ids), jnp.asarray(idx), jnp.asarray(valid)


class GLMForSequenceClassification(_GLMBase):
    """HF ``GLMForSequenceClassification``: pool position 0, dense+tanh, out_proj; [B, C, S] inputs give [B, C]."""

    architecture = "GLMForSequenceClassification"
    head = "cls"

    @classmethod
    def make_module(cls, config):
        return GLMClassifierModule(config)

    def forward(self, params, input_ids=None, position_ids=None, attention_mask=None, labels=None):
        input_ids = jnp.asarray(input_ids)
        num_choices = None
        if input_ids.ndim == 3:
            B, num_choices = input_ids.shape[:2]
            input_ids = input_ids.reshape(-1, input_ids.shape[-1])
            if attention_mask is not None:
                am = jnp.asarray(attention_mask)
                attention_mask = am.reshape((-1,) + am.shape[2:])
            if position_ids is not None:
                pi = jnp.asarray(position_ids)
                position_ids = pi.reshape((-1,) + pi.shape[2:])
        input_ids = _check_ids(input_ids)
        B, S = input_ids.shape
        mask = attention_mask_spec(attention_mask, B, S, 0, self.config.attention_impl)
        pos = _positions(position_ids, input_ids)
        logits, y = self.module.apply({"params": params}, input_ids, pos, mask)
        if num_choices is not None:
            logits = logits.reshape(-1, num_choices)
        loss = cross_entropy(logits, jnp.asarray(labels)) if labels is not None else None
        return GLMSequenceClassifierOutput(logits=logits.astype(jnp.float32), hidden_states=y, loss=loss)

    def decoding(self):
        raise NotImplementedError("GLMForSequenceClassification has no LM head to generate with")


def per_device_param_bytes(config: GLMConfig, mesh) -> tuple[int, int]:
    """(bytes of parameters each device holds, total bytes) for ``config`` placed on ``mesh`` by the logical
    rules, computed from shapes only (nothing is allocated)."""
    from .sharding import param_shardings

    model = GLMForConditionalGeneration.__new__(GLMForConditionalGeneration)
    model.config, model.module = config, GLMModule(config)
    abstract = model.abstract_params()
    shardings = param_shardings(abstract, model.logical_specs(), mesh)
    itemsize = np.dtype(config.params_dtype).itemsize
    leaves = jax.tree.leaves(abstract)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    per_device = sum(int(np.prod(s.shard_shape(a.shape))) for a, s in zip(leaves, shards)) * itemsize
    total = sum(int(np.prod(a.shape)) for a in leaves) * itemsize
    return per_device, total


def model_class(hf_config) -> type[PretrainedModel]:
    archs = [str(a) for a in hf_config.get("architectures") or []]
    if any("SequenceClassification" in a for a in archs):
        return GLMForSequenceClassification
    if any("MultipleChoice" in a for a in archs):
        return GLMForMultipleChoice
    return GLMForConditionalGeneration

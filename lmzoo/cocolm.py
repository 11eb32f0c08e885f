"""COCO-LM (microsoft cocolm-base / cocolm-large) as the original HF ``COCOLMModel`` computes it.

A BERT-shaped post-LN encoder (embedding LayerNorm, fused q|k|v projection, exact GELU, LN eps 1e-5)
with learned absolute positions PLUS one relative-position bias table shared by all layers, bucketed by
COCO-LM's own sign-symmetric ``ceil`` log buckets (not T5's). Heads: the GLUE classifier (GELU in the HF
code, tanh in fairseq fine-tunes), the SQuAD start/end head, and the pretraining heads: SCL pooler,
binary copy head, corrective LM head and the auxiliary MLM generator (its own layers and relative table,
sharing the main embeddings). Which heads a checkpoint carries is read from its keys.

LSG-COCO-LM (a config.json with the LSG keys, written by ``lmzoo convert --to-lsg``): the encoder's
self-attention is LSG attention (:mod:`lmzoo.lsg_attention`) with the relative bias at the positions that
module describes, and the embeddings prepend ``num_global_tokens`` learned global rows (no position
added) before the embedding LayerNorm, as the LSG authors' BERT/RoBERTa encoders do; the output drops the
globals (token 0's row replaced by global 0's with ``pool_with_global``), so every head reads ``[B, T, H]``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .attention import attend
from .configuration import ConfigError, ModelConfig
from .layers import ACTIVATIONS, Embed, LayerNorm, Linear, constrain
from .lsg_attention import MIN, LSGFields, draw_lsh_projections, has_lsg_keys, lsg_attention
from .modeling import PretrainedModel
from .outputs import ModelOutput

__all__ = [
    "CocoLMConfig",
    "LSGCocoLMConfig",
    "LSGCocoLMModel",
    "CocoLMOutput",
    "CocoLMModule",
    "CocoLMModel",
    "relative_position_bucket",
    "relative_position_bucket_table",
    "relative_position_bucket_vector",
    "model_class",
    "HEADS",
]

logger = logging.getLogger(__name__)

# Heads that live next to the encoder (need_pooler's SCL head lives inside it and is a config flag).
HEADS = ("classifier", "qa", "binary", "clm", "generator")
LAYER_NORM_TYPES = ("post", "pre", "hybrid")


# ----------------------------------------------------------------------------------------------------
# config
@dataclasses.dataclass(frozen=True, kw_only=True)
class CocoLMConfig(ModelConfig):
    """The fields of COCO-LM's config.json. Defaults are the real cocolm-base values, NOT the
    ``COCOLMConfig`` class defaults (eps 1e-12, rel_pos_bins 0, ...): a config.json always names them."""

    family = "cocolm"
    model_type = "cocolm"

    vocab_size: int = 64000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    rel_pos_bins: int = 64
    max_rel_pos: int = 128
    layer_norm_type: str = "post"
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    cls_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    need_pooler: bool = False  # build the SCL head (HF COCOLMSCLHead) -> pooled_output
    num_labels: int = 2  # classifier width (from id2label / num_labels, as transformers does)
    classifier_activation: str = "gelu"  # HF head: gelu; fairseq fine-tunes: pooler_activation_fn (tanh)
    heads: tuple[str, ...] = ()  # of HEADS; read from the checkpoint keys when loading
    tie_clm_head: bool = True  # fairseq ties the CLM head to the word embedding; the HF module does not
    generator_layers: int = 4  # auxiliary MLM generator depth (fairseq default for every size)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "heads", tuple(self.heads))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"cocolm config: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"cocolm config: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.rel_pos_bins < 0 or self.rel_pos_bins % 2:
            raise ConfigError(f"cocolm config: rel_pos_bins must be even and >= 0, got {self.rel_pos_bins}")
        if self.rel_pos_bins and self.rel_pos_bins < 4:
            raise ConfigError(f"cocolm config: rel_pos_bins {self.rel_pos_bins} leaves no exact buckets (need >= 4)")
        if self.rel_pos_bins and self.max_rel_pos <= self.rel_pos_bins // 4 + 1:
            raise ConfigError(
                f"cocolm config: max_rel_pos {self.max_rel_pos} must exceed rel_pos_bins/4 + 1 = {self.rel_pos_bins // 4 + 1}"
            )
        if self.layer_norm_type not in LAYER_NORM_TYPES:
            raise ConfigError(f"cocolm config: layer_norm_type must be one of {LAYER_NORM_TYPES}, got {self.layer_norm_type!r}")
        for name in ("hidden_act", "classifier_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(f"cocolm config: {name} {getattr(self, name)!r} is not one of {sorted(ACTIVATIONS)}")
        unknown = [h for h in self.heads if h not in HEADS]
        if unknown:
            raise ConfigError(f"cocolm config: unknown heads {unknown}; known: {HEADS}")
        if self.type_vocab_size < 0 or self.num_labels <= 0 or self.generator_layers < 0:
            raise ConfigError("cocolm config: type_vocab_size / generator_layers must be >= 0 and num_labels > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_lsg(self) -> bool:
        return False

    @property
    def prefixed(self) -> bool:
        """Whether the original keys carry ``cocolm.`` (a head class wraps COCOLMModel)."""
        return bool(self.heads)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **runtime) -> "CocoLMConfig":
        hf = dict(hf)
        fields = {}
        if hf.get("num_labels") is not None:
            fields["num_labels"] = int(hf["num_labels"])
        elif isinstance(hf.get("id2label"), Mapping) and hf["id2label"]:
            fields["num_labels"] = len(hf["id2label"])
        if "cocolm_heads" in hf:
            fields["heads"] = tuple(hf["cocolm_heads"])
        elif any("ForSequenceClassification" in a for a in hf.get("architectures") or []):
            fields["heads"] = ("classifier",)
        elif any("ForQuestionAnswering" in a for a in hf.get("architectures") or []):
            fields["heads"] = ("qa",)
        for name in cls.architecture_fields():
            if name in hf and name not in fields:
                fields[name] = hf[name]
        if "heads" in fields and not isinstance(fields["heads"], (list, tuple)):
            raise ConfigError(f"cocolm config: cocolm_heads must be a list, got {fields['heads']!r}")
        fields["need_pooler"] = bool(hf.get("need_pooler", False))
        return cls(**fields, **runtime, hf_config=hf)

    def to_hf_config(self) -> dict[str, Any]:
        out = dict(self.hf_config)
        skip = ("heads", "num_labels", "tie_clm_head", "generator_layers", "classifier_activation", "need_pooler")
        for name in self.architecture_fields():
            if name not in skip:
                out[name] = getattr(self, name)
        if self.need_pooler:
            out["need_pooler"] = True
        if self.heads:
            out["cocolm_heads"] = list(self.heads)
            out["model_type"] = "cocolm"
        if "classifier" in self.heads:
            if len(out.get("id2label") or {}) != self.num_labels:
                out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
                out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
            if self.classifier_activation != "gelu":
                out["classifier_activation"] = self.classifier_activation
        if "clm" in self.heads:
            out["tie_clm_head"] = self.tie_clm_head
        if "generator" in self.heads:
            out["generator_layers"] = self.generator_layers
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSGCocoLMConfig(LSGFields, CocoLMConfig):
    """COCO-LM with LSG attention in the encoder (and the generator): the LSG keys of :class:`LSGFields`."""

    @property
    def lsg_num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def lsg_relative_bias(self) -> bool:
        return self.rel_pos_bins > 0


# ----------------------------------------------------------------------------------------------------
# relative positions
def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """COCO-LM's SIGNED bucket of ``rel = key_pos - query_pos`` (before the table offset).

    nb = num_buckets // 2 and me = nb // 2: |rel| < me is its own bucket; beyond, ``me + ceil(log(|rel|/me)
    / log((max_distance-1)/me) * (nb-1-me))`` capped at nb-1, evaluated in float32 exactly as the original
    torch code (float32 log, float32 divide by the double constant rounded to float32, then ceil).
    Unlike T5 the sign is symmetric around one shared zero bucket and the rounding is ceil.
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    nb = num_buckets // 2
    me = nb // 2
    n = np.abs(rel)
    with np.errstate(divide="ignore"):
        ratio = n.astype(np.float32) / np.float32(me)
        scaled = np.log(ratio) / np.float32(math.log((max_distance - 1) / me)) * np.float32(nb - 1 - me)
    large = me + np.ceil(np.where(n < me, 0, scaled)).astype(np.int64)
    large = np.minimum(large, nb - 1)
    return np.where(n < me, n, large) * np.sign(rel)


@functools.lru_cache(maxsize=16)
def relative_position_bucket_table(max_positions: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The [max_positions, max_positions] int32 table of row indices into the bias table.

    The offset is minus the minimum over the FULL table, as the original computes it once at build
    time; a T x T slice has a smaller minimum whenever T is short, so slicing first reads wrong rows.
    """
    pos = np.arange(max_positions, dtype=np.int64)
    signed = relative_position_bucket(pos[None, :] - pos[:, None], num_buckets, max_distance)
    table = (signed - signed.min()).astype(np.int32)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=16)
def relative_position_bucket_vector(max_positions: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The same rows as :func:`relative_position_bucket_table` as an O(L) vector over distance:
    ``table[i, j] == vector[j - i + max_positions - 1]`` (rel = key - query from -(P-1) to P-1)."""
    P = max_positions
    signed = relative_position_bucket(np.arange(-(P - 1), P), num_buckets, max_distance)
    vec = (signed - signed.min()).astype(np.int32)  # every rel of the table occurs: same minimum, O(P)
    vec.setflags(write=False)
    return vec


# ----------------------------------------------------------------------------------------------------
# modules
class DenseND(nn.Module):
    """``x`` contracted over its last ``n_in`` dims with kernel [*in, *out] (+ bias [*out]).

    Used to keep the fused q|k|v projection as [H, 3, heads, head_dim] and the output projection as
    [heads, head_dim, H], so the heads axis can be sharded without splitting across q/k/v.
    """

    out_shape: tuple[int, ...]
    kernel_axes: tuple[Optional[str], ...]
    n_in: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x):
        in_shape = tuple(x.shape[x.ndim - self.n_in:])
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes), in_shape + tuple(self.out_shape), self.param_dtype
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.n_in:]), tuple(self.out_shape), self.param_dtype
        )
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        return y + bias.astype(self.dtype)


def _kw(c: CocoLMConfig) -> dict:
    return dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)


def _ln(c: CocoLMConfig, eps: Optional[float] = None, name: Optional[str] = None) -> LayerNorm:
    return LayerNorm(epsilon=c.layer_norm_eps if eps is None else eps, name=name, **_kw(c))


def _linear(c: CocoLMConfig, features: int, axes: tuple[Optional[str], ...], name: Optional[str] = None) -> Linear:
    return Linear(features, axes=axes, use_bias=True, kernel_init=nn.initializers.normal(c.initializer_range), name=name, **_kw(c))


class CocoLMEmbeddings(nn.Module):
    """word + learned absolute position (+ token type if type_vocab_size > 0), LayerNorm (post only)."""

    config: CocoLMConfig

    def setup(self):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        self.word_embeddings = Embed(c.vocab_size, c.hidden_size, axes=("vocab", "embed"), embedding_init=init, **_kw(c))
        self.position_embeddings = Embed(c.max_position_embeddings, c.hidden_size, axes=("positions", "embed"), embedding_init=init, **_kw(c))
        if c.type_vocab_size > 0:
            self.token_type_embeddings = Embed(c.type_vocab_size, c.hidden_size, axes=(None, "embed"), embedding_init=init, **_kw(c))
        if c.layer_norm_type == "post":
            self.LayerNorm = _ln(c)
        if c.is_lsg:
            self.global_embeddings = Embed(512, c.hidden_size, axes=("positions", "embed"), embedding_init=init, **_kw(c))
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def __call__(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, *, deterministic=True):
        """[B, T, H]; LSG: [B, G + T, H], the G global rows (no position added) prepended before the LN."""
        c = self.config
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds.astype(c.compute_dtype)
        T = x.shape[1]
        pos = jnp.arange(T)[None] if position_ids is None else position_ids
        x = x + self.position_embeddings(pos)
        if c.type_vocab_size > 0:
            tt = jnp.zeros(x.shape[:2], jnp.int32) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embeddings(tt)
        if c.is_lsg:
            g = self.global_embeddings(jnp.arange(c.num_global_tokens))
            x = jnp.concatenate([jnp.broadcast_to(g[None], (x.shape[0],) + g.shape).astype(x.dtype), x], axis=1)
        if c.layer_norm_type == "post":
            x = self.LayerNorm(x)
        return self.dropout(x, deterministic=deterministic)


class CocoLMSelfAttention(nn.Module):
    """Fused q|k|v projection, q scaled by head_dim**-0.5 before the dot product, bias added unscaled.

    The scores go through :func:`lmzoo.attention.attend` (``config.attention_impl``): the XLA reference,
    or the Pallas kernel, which reads the relative bias from the [rel_pos_bins, heads] table and an O(T)
    bucket vector and applies key padding in-kernel (no T x T array). Padded keys are excluded; a row
    whose keys are ALL padded gives NaN in the original (softmax of all -inf), which it then zeroes after
    out_proj: here such a row's output is exactly 0 after out_proj without ever forming the NaN, so
    gradients stay finite (the kernel's hard masking gives the row 0 before out_proj, the XLA path a
    uniform average; both are replaced by the zero after it).
    """

    config: CocoLMConfig

    def setup(self):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        A, d = c.num_attention_heads, c.head_dim
        self.in_proj = DenseND((3, A, d), ("embed", None, "heads", "kv"), kernel_init=init, **_kw(c))
        self.out_proj = DenseND((c.hidden_size,), ("heads", "kv", "embed"), n_in=2, kernel_init=init, **_kw(c))
        self.dropout = nn.Dropout(c.attention_probs_dropout_prob)

    def __call__(self, x, *, bias_table, bucket_fn, key_valid, deterministic=True, token_mask=None, lsh_projections=None):
        c = self.config
        qkv = self.in_proj(x)  # [B,T,3,A,d]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(q, ("batch", "length", "act_heads", "kv"))
        if c.is_lsg:
            return self._lsg(q, k, v, token_mask, bias_table, bucket_fn, lsh_projections, deterministic)
        probs_fn = None
        if not deterministic and c.attention_probs_dropout_prob > 0:
            probs_fn = functools.partial(self.dropout, deterministic=False)
        out = attend(
            q, k, v, impl=c.attention_impl, scale=c.head_dim**-0.5, key_mask=key_valid, bias_table=bias_table,
            bucket_fn=bucket_fn, mask_value=None, probs_fn=probs_fn, dtype=c.compute_dtype,
        )
        out = self.out_proj(out)
        if key_valid is not None:
            out = jnp.where(jnp.any(key_valid, axis=-1)[:, None, None], out, jnp.zeros((), out.dtype))
        return out

    def _lsg(self, q, k, v, token_mask, bias_table, bucket_fn, lsh_projections, deterministic):
        """LSG attention over [globals; tokens]: token_mask is the additive [B, t] mask of the token part
        (globals are never masked, so no row is empty and the NaN clean-up has nothing to do)."""
        c = self.config
        if not deterministic and c.attention_probs_dropout_prob > 0:
            raise ValueError("LSG attention has no attention-probability dropout: set attention_probs_dropout_prob=0 "
                             "for training (or run deterministic)")
        sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B,T,A,d] <-> [B,A,T,d]
        ctx = lsg_attention(sw(q), sw(k), sw(v), token_mask, lsh_projections=lsh_projections, scale=c.head_dim**-0.5,
                            bias_table=bias_table, bucket_fn=bucket_fn, **c.lsg_attention_kwargs())
        return self.out_proj(sw(ctx).astype(c.compute_dtype))


class CocoLMLayer(nn.Module):
    """One block. 'post': LN(x + attn), LN(h + ffn). 'pre'/'hybrid' (unused by released models) keep the
    attention sub-layer post-LN as the original does and normalise the FFN input with an extra LN."""

    config: CocoLMConfig

    def setup(self):
        c = self.config
        self.self_attn = CocoLMSelfAttention(c)
        self.attention_LayerNorm = _ln(c)
        self.intermediate = _linear(c, c.intermediate_size, ("embed", "mlp"))
        self.output = _linear(c, c.hidden_size, ("mlp", "embed"))
        if c.layer_norm_type in ("post", "hybrid"):
            self.output_LayerNorm = _ln(c)
        if c.layer_norm_type in ("pre", "hybrid"):
            self.LayerNorm = _ln(c, eps=1e-5)  # hard-coded 1e-5 in the original
        self.dropout_attn = nn.Dropout(c.attention_probs_dropout_prob)
        self.dropout_out = nn.Dropout(c.hidden_dropout_prob)

    def __call__(self, x, *, bias_table, bucket_fn, key_valid, deterministic=True, token_mask=None, lsh_projections=None):
        c = self.config
        a = self.self_attn(x, bias_table=bias_table, bucket_fn=bucket_fn, key_valid=key_valid, deterministic=deterministic,
                           token_mask=token_mask, lsh_projections=lsh_projections)
        h = self.attention_LayerNorm(x + self.dropout_attn(a, deterministic=deterministic))
        f_in = h if c.layer_norm_type == "post" else self.LayerNorm(h)
        f = ACTIVATIONS[c.hidden_act](self.intermediate(f_in))
        f = constrain(f, ("batch", "length", "act_mlp"))
        f = self.dropout_out(self.output(f), deterministic=deterministic)
        if c.layer_norm_type == "post":
            y = self.output_LayerNorm(f + h)
        elif c.layer_norm_type == "pre":
            y = f + h
        else:
            y = f + self.output_LayerNorm(h) + h
        return constrain(y, ("batch", "length", "act_embed"))


class CocoLMEncoder(nn.Module):
    """A stack of layers sharing one relative-position bias table (the table lives with the stack)."""

    config: CocoLMConfig
    num_layers: int

    def setup(self):
        c = self.config
        if c.rel_pos_bins > 0:
            self.relative_attention_bias = self.param(
                "relative_attention_bias",
                nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), ("relpos_buckets", "heads")),
                (c.rel_pos_bins, c.num_attention_heads),
                c.params_dtype,
            )
        self.layers = [CocoLMLayer(c, name=f"layer_{i}") for i in range(self.num_layers)]
        if c.layer_norm_type in ("pre", "hybrid"):
            self.LayerNorm = _ln(c, eps=1e-5)

    def bucket(self, rel):
        """Bias-table row of ``rel = key_pos - query_pos`` (int array, numpy or jax): the signed COCO-LM
        bucket plus the offset of the full ``max_position_embeddings`` table, as the original reads it."""
        c = self.config
        vec = relative_position_bucket_vector(c.max_position_embeddings, c.rel_pos_bins, c.max_rel_pos)
        P = c.max_position_embeddings
        return jnp.take(jnp.asarray(vec), jnp.clip(jnp.asarray(rel, jnp.int32) + (P - 1), 0, 2 * P - 2), axis=0)

    def __call__(self, x, key_valid, *, deterministic=True, token_mask=None, lsh_projections=None):
        """LSG: x holds [globals; tokens], token_mask is the additive mask of the tokens, lsh_projections
        the per-layer random matrices of an lsh config."""
        c = self.config
        table = self.relative_attention_bias if c.rel_pos_bins > 0 else None
        bucket_fn = self.bucket if c.rel_pos_bins > 0 else None
        for i, layer in enumerate(self.layers):
            x = layer(x, bias_table=table, bucket_fn=bucket_fn, key_valid=key_valid, deterministic=deterministic,
                      token_mask=token_mask, lsh_projections=None if lsh_projections is None else lsh_projections[i])
        if c.layer_norm_type in ("pre", "hybrid"):
            x = self.LayerNorm(x)
        return x


class CocoLMSCLHead(nn.Module):
    """SCL pooler: LayerNorm(GELU(dense(h[:, 0]))). The contrastive loss L2-normalises it."""

    config: CocoLMConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        x = _linear(c, c.hidden_size, ("embed", "mlp"), "dense")(h[:, 0])
        return _ln(c, name="LayerNorm")(ACTIVATIONS["gelu"](x))


class CocoLMClassificationHead(nn.Module):
    """dropout -> dense -> activation (gelu HF / tanh fairseq) -> dropout -> out_proj, on h[:, 0]."""

    config: CocoLMConfig

    @nn.compact
    def __call__(self, h, *, deterministic=True):
        c = self.config
        drop = nn.Dropout(c.cls_dropout_prob)
        x = drop(h[:, 0], deterministic=deterministic)
        x = ACTIVATIONS[c.classifier_activation](_linear(c, c.hidden_size, ("embed", "mlp"), "dense")(x))
        x = drop(x, deterministic=deterministic)
        return _linear(c, c.num_labels, ("mlp", "classes"), "out_proj")(x)


class CocoLMGeneratorHead(nn.Module):
    """The auxiliary generator's MLM transform: LayerNorm(GELU(dense(h))); the vocabulary projection is
    the (shared) word embedding plus this head's own bias."""

    config: CocoLMConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        x = ACTIVATIONS[c.hidden_act](_linear(c, c.hidden_size, ("embed", "mlp"), "dense")(h))
        x = _ln(c, name="LayerNorm")(x)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (c.vocab_size,), c.params_dtype)
        return x, bias


def _key_valid(attention_mask, shape) -> Optional[jax.Array]:
    if attention_mask is None:
        return None
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids {shape}")
    return attention_mask != 0


class CocoLMModule(nn.Module):
    """Encoder + the heads the config names. Methods (for training code: ``module.apply(..., method=)``):

    ``encode`` -> last hidden state; ``pooled_output`` (SCL), ``classify``, ``span_logits``,
    ``binary_logits`` (copy head, logit of "token is original"), ``clm_logits`` (corrective LM),
    ``generator_logits`` (auxiliary MLM on the masked input); ``__call__`` runs every head present.
    """

    config: CocoLMConfig

    def setup(self):
        c = self.config
        self.embeddings = CocoLMEmbeddings(c)
        self.encoder = CocoLMEncoder(c, c.num_hidden_layers)
        if c.need_pooler:
            self.scl_head = CocoLMSCLHead(c)
        if "classifier" in c.heads:
            self.classifier = CocoLMClassificationHead(c)
        if "qa" in c.heads:
            self.qa_start = _linear(c, 1, ("embed", "classes"))
            self.qa_end = _linear(c, 1, ("embed", "classes"))
        if "binary" in c.heads:
            self.binary_head = _linear(c, 1, ("embed", "classes"))
        if "clm" in c.heads:
            if c.tie_clm_head:
                self.clm_bias = self.param("clm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (c.vocab_size,), c.params_dtype)
            else:
                self.clm_head = _linear(c, c.vocab_size, ("embed", "vocab"))
        if "generator" in c.heads:
            self.generator = CocoLMEncoder(c, c.generator_layers)
            self.generator_head = CocoLMGeneratorHead(c)

    def _run(self, encoder, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, deterministic,
             lsh_projections=None):
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        shape = tuple(input_ids.shape if input_ids is not None else inputs_embeds.shape[:2])
        if shape[1] > c.max_position_embeddings:
            raise ValueError(f"sequence length {shape[1]} exceeds max_position_embeddings {c.max_position_embeddings}")
        key_valid = _key_valid(attention_mask, shape)
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, deterministic=deterministic)
        if c.is_lsg:
            return self._run_lsg(encoder, x, key_valid, deterministic, lsh_projections)
        if attention_mask is not None:
            x = x * attention_mask[..., None].astype(x.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        return encoder(x, key_valid, deterministic=deterministic)

    def _run_lsg(self, encoder, x, key_valid, deterministic, lsh_projections):
        """The LSG authors' encoder around the embeddings [n, G + t, H]: padding rows zeroed (COCO-LM), the
        tokens zero-padded to a block multiple on the block path (``adaptive``), token 0 hidden from
        attention with ``mask_first_token``; then globals dropped (``pool_with_global``: token 0's row is
        global 0's) and the padding cropped."""
        c = self.config
        G = c.num_global_tokens
        n, t = x.shape[0], x.shape[1] - G
        mask = jnp.ones((n, t), bool) if key_valid is None else key_valid
        if key_valid is not None:
            x = x * jnp.concatenate([jnp.ones((n, G), bool), mask], axis=1)[..., None].astype(x.dtype)
        t_pad = c.lsg_padded_length(t)
        x = constrain(jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0))), ("batch", "length", "act_embed"))
        mask = jnp.pad(mask, ((0, 0), (0, t_pad - t)))
        if c.mask_first_token:
            mask = mask.at[:, 0].set(False)
        token_mask = jnp.where(mask, jnp.float32(0), jnp.float32(MIN))
        h = encoder(x, None, deterministic=deterministic, token_mask=token_mask, lsh_projections=lsh_projections)
        if c.pool_with_global:
            h = h.at[:, G].set(h[:, 0])
        return h[:, G:G + t]

    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None, *,
               deterministic=True, lsh_projections=None):
        return self._run(self.encoder, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, deterministic,
                         lsh_projections)

    def pooled_output(self, h):
        return self.scl_head(h)

    def classify(self, h, *, deterministic=True):
        return self.classifier(h, deterministic=deterministic)

    def span_logits(self, h):
        return self.qa_start(h)[..., 0], self.qa_end(h)[..., 0]

    def binary_logits(self, h):
        return self.binary_head(h)[..., 0]

    def clm_logits(self, h):
        if self.config.tie_clm_head:
            return self.embeddings.word_embeddings.attend(h) + self.clm_bias.astype(h.dtype)
        return self.clm_head(h)

    def generator_logits(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None, *,
                         deterministic=True, lsh_projections=None):
        """Auxiliary MLM logits [B,T,V]: the generator's own layers on the shared embeddings, tied output."""
        h = self._run(self.generator, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, deterministic,
                      lsh_projections)
        x, bias = self.generator_head(h)
        return self.embeddings.word_embeddings.attend(x) + bias.astype(x.dtype)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None, *,
                 deterministic=True, lsh_projections=None):
        c = self.config
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, deterministic=deterministic,
                        lsh_projections=lsh_projections)
        out = {"last_hidden_state": h}
        if c.need_pooler:
            out["pooled_output"] = self.pooled_output(h)
        if "classifier" in c.heads:
            out["logits"] = self.classify(h, deterministic=deterministic)
        if "qa" in c.heads:
            out["start_logits"], out["end_logits"] = self.span_logits(h)
        if "binary" in c.heads:
            out["binary_logits"] = self.binary_logits(h)
        if "clm" in c.heads:
            out["clm_logits"] = self.clm_logits(h)
        if "generator" in c.heads and self.is_initializing():
            self.generator_logits(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        return out


# ----------------------------------------------------------------------------------------------------
# outputs and the model wrapper
@flax.struct.dataclass
class CocoLMOutput(ModelOutput):
    """Fields are None where the model has no such head (``"logits" in out`` tells)."""

    last_hidden_state: Optional[jax.Array] = None
    pooled_output: Optional[jax.Array] = None
    logits: Optional[jax.Array] = None
    start_logits: Optional[jax.Array] = None
    end_logits: Optional[jax.Array] = None
    binary_logits: Optional[jax.Array] = None
    clm_logits: Optional[jax.Array] = None
    loss: Optional[jax.Array] = None


def _f32(x):
    return None if x is None else x.astype(jnp.float32)


def classification_loss(logits, labels, num_labels: int):
    """MSE for one label (regression, STS-B), else mean cross-entropy, as COCOLMForSequenceClassification."""
    logits = logits.astype(jnp.float32)
    if num_labels == 1:
        return jnp.mean(jnp.square(logits.reshape(-1) - labels.reshape(-1).astype(jnp.float32)))
    logp = jax.nn.log_softmax(logits.reshape(-1, num_labels), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels.reshape(-1, 1).astype(jnp.int32), axis=-1))


def span_loss(start_logits, end_logits, start_positions, end_positions):
    """0.5 * (summed NLL of the start + summed NLL of the end), as the original SQuADHead."""

    def nll(logits, target):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, target.reshape(-1, 1).astype(jnp.int32), axis=-1))

    return 0.5 * (nll(start_logits, start_positions) + nll(end_logits, end_positions))


class CocoLMModel(PretrainedModel):
    """COCO-LM with the original forward keywords; one class for the base model and every head.

    ``model(input_ids=..., attention_mask=...)`` returns a :class:`CocoLMOutput` with
    ``last_hidden_state`` plus, per head present, ``pooled_output`` / ``logits`` / ``start_logits`` and
    ``end_logits`` / ``binary_logits`` / ``clm_logits`` (and ``loss`` for labels / positions).
    """

    family = "cocolm"
    config_class = CocoLMConfig

    @property
    def architecture(self) -> str:  # what "architectures" config.json gets on export
        h = self.config.heads
        if "classifier" in h:
            return "COCOLMForSequenceClassification"
        if "qa" in h:
            return "COCOLMForQuestionAnswering"
        return ""

    @classmethod
    def make_module(cls, config):
        return CocoLMModule(config)

    @classmethod
    def key_map(cls, config):
        from lmzoo.convert.cocolm import hf_key_map

        return hf_key_map(config)

    def dummy_inputs(self):
        return {"input_ids": jnp.zeros((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32)}

    @classmethod
    def config_from_folder(cls, folder, hf, **runtime):
        from lmzoo.convert.checkpoint import find_weights, open_checkpoint
        from lmzoo.convert.cocolm import config_fields_from_state_dict
        from lmzoo.convert.torch_pickle import CheckpointError

        config = cls.config_class.from_hf_config(hf, **runtime)
        try:
            weights = find_weights(folder)
        except CheckpointError:
            return config  # an lmzoo orbax folder: heads come from config.json
        return config.replace(**config_fields_from_state_dict(open_checkpoint(weights), config))

    @classmethod
    def from_state_dict(cls, config, state_dict, *, mesh=None, source="checkpoint", verbose=False, progress=None):
        from lmzoo.convert.cocolm import check_classification_heads, check_dropped

        check_classification_heads(state_dict, source)
        model = super().from_state_dict(config, state_dict, mesh=mesh, source=source, verbose=verbose, progress=progress)
        check_dropped(model.load_report["dropped"], config, source)
        if model.load_report["dropped"]:
            logger.info("%s: dropped %d keys COCO-LM does not use: %s", source, len(model.load_report["dropped"]), ", ".join(model.load_report["dropped"]))
        return model

    def __call__(self, **kwargs):
        """Checks ids against the tables (a gather would clamp them silently), then runs the forward."""
        c = self.config
        for name, limit in (("input_ids", c.vocab_size), ("position_ids", c.max_position_embeddings), ("token_type_ids", max(c.type_vocab_size, 1))):
            v = kwargs.get(name)
            if v is None or (name == "token_type_ids" and c.type_vocab_size == 0):
                continue
            a = np.asarray(v)
            if not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name} must be integers, got {a.dtype}")
            if a.size and (a.min() < 0 or a.max() >= limit):
                bad = a.min() if a.min() < 0 else a.max()
                raise ValueError(f"{name} holds {int(bad)}, outside [0, {limit})")
        ids = kwargs.get("input_ids")
        if ids is not None and np.ndim(ids) != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {np.shape(ids)}")
        return super().__call__(**kwargs)

    def lsh_projections(self, lsh_key, num_layers: Optional[int] = None):
        """Per-layer random matrices of an LSG lsh encoder (None for every other model)."""
        c = self.config
        if not (c.is_lsg and c.lsg_uses_lsh_projections):
            return None
        return draw_lsh_projections(lsh_key, c.num_hidden_layers if num_layers is None else num_layers,
                                    heads=c.num_attention_heads, head_dim=c.head_dim, block_size=c.block_size,
                                    sparse_block_size=c.sparse_block_size, sparsity_factor=c.sparsity_factor,
                                    num_pre_rounds=c.lsh_num_pre_rounds)

    def export_config(self) -> dict:
        hf = self.config.to_hf_config()
        if self.architecture:
            hf["architectures"] = [self.architecture]
        return hf

    def forward(
        self,
        params,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        start_positions=None,
        end_positions=None,
        split_lengths=None,  # accepted and unused, as in the original
        lsh_key=None,
    ):
        """The original forward; ``lsh_key`` (LSG with sparsity_type "lsh"): the jax PRNG key of the random
        projections the original draws on every forward."""
        c = self.config
        out = self.module.apply({"params": params}, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                lsh_projections=self.lsh_projections(lsh_key))
        loss = None
        if labels is not None:
            if "classifier" not in c.heads:
                raise ValueError("labels were passed but this COCO-LM model has no classification head")
            loss = classification_loss(out["logits"], labels, c.num_labels)
        if start_positions is not None or end_positions is not None:
            if "qa" not in c.heads or start_positions is None or end_positions is None:
                raise ValueError("start_positions and end_positions need a model with the span-extraction head, and both")
            loss = span_loss(out["start_logits"], out["end_logits"], start_positions, end_positions)
        return CocoLMOutput(**{k: _f32(v) for k, v in out.items()}, loss=loss)


class LSGCocoLMModel(CocoLMModel):
    """COCO-LM whose encoder runs LSG attention (a config.json with the LSG keys)."""

    config_class = LSGCocoLMConfig


def model_class(hf_config) -> type[PretrainedModel]:
    return LSGCocoLMModel if has_lsg_keys(hf_config) else CocoLMModel

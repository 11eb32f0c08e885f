"""BART and LSG-BART as transformers' ``BartForConditionalGeneration`` and the LSG authors'
``LSGBartForConditionalGeneration`` compute them.

BART: post-LN encoder-decoder, learned positions with offset 2, ``layernorm_embedding`` on both sides,
optional ``sqrt(d_model)`` embedding scale, exact-erf GELU, tied LM head plus ``final_logits_bias``.
LSG-BART is the same model whose encoder self-attention is Local+Sparse+Global block attention
(``lmzoo.lsg_attention``) and whose encoder prepends ``num_global_tokens`` learned global vectors (no
position added) before ``layernorm_embedding``; by default their outputs are passed to the decoder's
cross-attention. The decoder is plain BART in both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .attention import attend, check_segment_pair, segment_positions
from .configuration import ConfigError, ModelConfig
from .layers import (ACTIVATIONS, DECODE_KV_LAYOUT, Embed, LayerNorm, Linear, constrain, decode_kv, empty_decode_cache,
                     write_decode_cache)
from .lsg_attention import LSGFields, draw_lsh_projections, lsg_attention
from .modeling import PretrainedModel
from .outputs import Seq2SeqLMOutput
from .t5 import cross_entropy_ignore, shift_right

__all__ = [
    "BartConfig",
    "LSGBartConfig",
    "BartModule",
    "BartForConditionalGeneration",
    "LSGBartForConditionalGeneration",
    "is_lsg_config",
    "model_class",
]

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: position p reads row p + 2
LSG_KEYS = ("block_size", "sparsity_type", "num_global_tokens", "sparse_block_size", "sparsity_factor")
LSG_AUTO_MAP = {
    "AutoConfig": "modeling_lsg_bart.LSGBartConfig",
    "AutoModel": "modeling_lsg_bart.LSGBartModel",
    "AutoModelForCausalLM": "modeling_lsg_bart.LSGBartForCausalLM",
    "AutoModelForQuestionAnswering": "modeling_lsg_bart.LSGBartForQuestionAnswering",
    "AutoModelForSeq2SeqLM": "modeling_lsg_bart.LSGBartForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_lsg_bart.LSGBartForSequenceClassification",
}


def is_lsg_config(hf) -> bool:
    """An LSG-BART config (model_type stays "bart"): LSG class in architectures, or the LSG keys present."""
    archs = [str(a) for a in hf.get("architectures") or []]
    return any("LSG" in a for a in archs) or all(k in hf for k in ("block_size", "sparsity_type"))


# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BartConfig(ModelConfig):
    """transformers' ``BartConfig`` fields that change the computation (defaults as BartConfig's)."""

    family = "bart"
    model_type = "bart"

    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_eos_token_id: Optional[int] = 2
    layer_norm_epsilon: float = 1e-5  # nn.LayerNorm default; not a BartConfig key

    def __post_init__(self):
        super().__post_init__()
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"activation_function {self.activation_function!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "decoder_layers",
                     "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise ConfigError(f"d_model={self.d_model} is not divisible by {heads}={getattr(self, heads)}")

    @classmethod
    def architecture_fields(cls) -> list[str]:
        return [f for f in super().architecture_fields() if f != "layer_norm_epsilon"]

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0

    @property
    def is_lsg(self) -> bool:
        return False

    def generation_defaults(self) -> dict[str, Any]:
        out = super().generation_defaults()
        hf = self.hf_config
        # BartConfig's own defaults apply where config.json omits the key.
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_eos_token_id"):
            if k not in hf:
                out[k] = getattr(self, k)
        if out.get("forced_bos_token_id") is None and hf.get("force_bos_token_to_be_generated", False):
            out["forced_bos_token_id"] = out["bos_token_id"]
        return out

    def to_hf_config(self):
        out = super().to_hf_config()
        out["is_encoder_decoder"] = True
        out.setdefault("architectures", ["BartForConditionalGeneration"])
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSGBartConfig(LSGFields, BartConfig):
    """``LSGBartConfig``: BART plus the LSG keys, with the original's defaults and validation
    (:class:`lmzoo.lsg_attention.LSGFields`) and ``pass_global_tokens_to_decoder``."""

    family = "lsg_bart"

    pass_global_tokens_to_decoder: bool = True

    @property
    def lsg_num_heads(self) -> int:
        return self.encoder_attention_heads

    def to_hf_config(self):
        out = super().to_hf_config()
        out["architectures"] = ["LSGBartForConditionalGeneration"]
        out.setdefault("auto_map", dict(LSG_AUTO_MAP))
        out.setdefault("base_model_prefix", "lsg")
        return out


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


def _kw(c: BartConfig):
    return dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)


def _clamp_fp16(x):
    """BartEncoderLayer: in float16, clamp to +-(max - 1000) when an inf/nan appeared."""
    if x.dtype != jnp.float16:
        return x
    big = jnp.finfo(jnp.float16).max - 1000
    bad = jnp.any(jnp.isinf(x) | jnp.isnan(x))
    return jnp.where(bad, jnp.clip(x, -big, big), x)


class BartAttention(nn.Module):
    """q/k/v/out projections with biases; heads = ``num_heads``."""

    config: BartConfig
    num_heads: int

    def setup(self):
        c = self.config
        d = c.d_model
        self.q_proj = Linear(d, axes=("embed", "joined_kv"), use_bias=True, **_kw(c))
        self.k_proj = Linear(d, axes=("embed", "joined_kv"), use_bias=True, **_kw(c))
        self.v_proj = Linear(d, axes=("embed", "joined_kv"), use_bias=True, **_kw(c))
        self.out_proj = Linear(d, axes=("joined_kv", "embed"), use_bias=True, **_kw(c))

    @property
    def head_dim(self) -> int:
        return self.config.d_model // self.num_heads

    def heads(self, x):
        return x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))

    def project_kv(self, x):
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def merge(self, ctx):
        return self.out_proj(ctx.reshape(ctx.shape[:-2] + (self.config.d_model,)))

    def __call__(self, x, kv=None, *, key_mask=None, causal=False, q_offset=0, q_segment_ids=None, kv_segment_ids=None,
                 kv_layout="blhd"):
        """Dense attention (BartAttention, eager): q scaled by head_dim**-0.5; kv precomputed or from x.

        key_mask [B, Lk] (1 = visible), causal with queries at q_offset + i; masked scores get the float32
        minimum added, as transformers does; segment ids (packed rows) keep queries within their segment.
        ``attention_impl`` picks XLA or the block-sparse kernel. kv_layout: how a precomputed kv is laid
        out (see :func:`lmzoo.attention.attend`; decoding keeps its caches head-major).
        """
        q = constrain(self.heads(self.q_proj(x)), ("batch", "length", "act_heads", "kv"))
        k, v = kv if kv is not None else self.project_kv(x)
        ctx = attend(q, k, v, impl=self.config.attention_impl, scale=self.head_dim**-0.5, key_mask=key_mask,
                     causal=causal, q_offset=q_offset, dtype=self.config.compute_dtype,
                     q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, kv_layout=kv_layout)
        return self.merge(ctx)


class LSGSelfAttention(BartAttention):
    """``LSGBartEncoderSelfAttention``: same projections, LSG attention pattern."""

    def __call__(self, x, *, token_mask, lsh_projections=None):
        c = self.config
        to_bhld = lambda a: jnp.swapaxes(self.heads(a), 1, 2)  # noqa: E731
        q, k, v = to_bhld(self.q_proj(x)), to_bhld(self.k_proj(x)), to_bhld(self.v_proj(x))
        ctx = lsg_attention(
            q, k, v, token_mask,
            num_global_tokens=c.num_global_tokens, block_size=c.block_size, sparse_block_size=c.sparse_block_size,
            sparsity_factor=c.sparsity_factor, sparsity_type=c.sparsity_type, lsh_projections=lsh_projections,
            lsh_num_pre_rounds=c.lsh_num_pre_rounds, impl=c.attention_impl, mask_dtype=c.compute_dtype,
        )
        return self.merge(jnp.swapaxes(ctx, 1, 2))


class FeedForward(nn.Module):
    config: BartConfig
    ffn_dim: int

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = ACTIVATIONS[c.activation_function](Linear(self.ffn_dim, axes=("embed", "mlp"), use_bias=True, name="fc1", **_kw(c))(x))
        if jax.default_backend() == "cpu" and h.dtype == jnp.float32:
            # An exact identity on float32 that XLA's CPU matmul fusion does not absorb: the bias add and
            # activation become one pass with one [rows, ffn_dim] output (left alone, fc2's fusion takes the
            # activation's last multiply and two full-size intermediates are written and read instead).
            h = jax.lax.reduce_precision(h, exponent_bits=8, mantissa_bits=23)
        h = constrain(h, ("batch", "length", "act_mlp"))
        return Linear(c.d_model, axes=("mlp", "embed"), use_bias=True, name="fc2", **_kw(c))(h)


class EncoderLayer(nn.Module):
    config: BartConfig

    def setup(self):
        c = self.config
        ln = dict(epsilon=c.layer_norm_epsilon, **_kw(c))
        attn_cls = LSGSelfAttention if c.is_lsg else BartAttention
        self.self_attn = attn_cls(c, c.encoder_attention_heads)
        self.self_attn_layer_norm = LayerNorm(**ln)
        self.ffn = FeedForward(c, c.encoder_ffn_dim)
        self.final_layer_norm = LayerNorm(**ln)

    def __call__(self, x, *, mask=None, token_mask=None, lsh_projections=None, segment_ids=None):
        if self.config.is_lsg:
            h = self.self_attn(x, token_mask=token_mask, lsh_projections=lsh_projections)
        else:
            h = self.self_attn(x, key_mask=mask, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        x = self.self_attn_layer_norm(x + h)
        x = self.final_layer_norm(x + self.ffn(x))
        return constrain(_clamp_fp16(x), ("batch", "length", "act_embed"))


class DecoderLayer(nn.Module):
    config: BartConfig

    def setup(self):
        c = self.config
        ln = dict(epsilon=c.layer_norm_epsilon, **_kw(c))
        self.self_attn = BartAttention(c, c.decoder_attention_heads)
        self.self_attn_layer_norm = LayerNorm(**ln)
        self.encoder_attn = BartAttention(c, c.decoder_attention_heads)
        self.encoder_attn_layer_norm = LayerNorm(**ln)
        self.ffn = FeedForward(c, c.decoder_ffn_dim)
        self.final_layer_norm = LayerNorm(**ln)

    def __call__(self, y, *, self_kv=None, self_attn: dict, cross_kv, cross_mask=None, cross_segments=(None, None),
                 cross_kv_layout="blhd"):
        """cross_kv may hold one row per input row while y has n rows per input row (decoding: beams /
        samples, consecutive); those n rows then are n queries of their input row's cross-attention."""
        y = self.self_attn_layer_norm(y + self.self_attn(y, self_kv, **self_attn))
        q_seg, kv_seg = cross_segments
        B = cross_kv[0].shape[0]
        ctx = self.encoder_attn(y.reshape((B, -1) + y.shape[2:]), cross_kv, key_mask=cross_mask, q_segment_ids=q_seg,
                                kv_segment_ids=kv_seg, kv_layout=cross_kv_layout)
        y = self.encoder_attn_layer_norm(y + ctx.reshape(y.shape))
        y = self.final_layer_norm(y + self.ffn(y))
        return constrain(y, ("batch", "length", "act_embed"))


def _position_embeddings(table, positions):
    """Learned position vectors of ``positions`` ([t] shared by the batch, or [n, t]), offset by 2."""
    p = table(positions + POSITION_OFFSET)
    return p[None] if p.ndim == 2 else p


def _positions(c: BartConfig, name: str):
    return Embed(c.max_position_embeddings + POSITION_OFFSET, c.d_model, axes=("positions", "embed"),
                 embedding_init=nn.initializers.normal(0.02), name=name, **_kw(c))


class Encoder(nn.Module):
    config: BartConfig

    def setup(self):
        c = self.config
        self.embed_positions = _positions(c, "embed_positions")
        if c.is_lsg:
            self.global_embeddings = Embed(512, c.d_model, axes=("positions", "embed"),
                                           embedding_init=nn.initializers.normal(0.02), **_kw(c))
        self.layernorm_embedding = LayerNorm(epsilon=c.layer_norm_epsilon, **_kw(c))
        self.layers = [EncoderLayer(c, name=f"layers_{i}") for i in range(c.encoder_layers)]

    def __call__(self, x, mask, lsh_projections=None, positions=None, segment_ids=None):
        """x: token embeddings (scaled) [n, t, D]; mask [n, t] 0/1; positions [n, t] (default 0 .. t-1);
        segment_ids [n, t] (packed rows, BART only). Returns [n, G + t, D] (G = 0 for BART)."""
        c = self.config
        t = x.shape[1]
        x = x + _position_embeddings(self.embed_positions, jnp.arange(t) if positions is None else positions)
        if c.is_lsg:
            g = self.global_embeddings(jnp.arange(c.num_global_tokens))
            x = jnp.concatenate([jnp.broadcast_to(g[None], (x.shape[0],) + g.shape).astype(x.dtype), x], axis=1)
        x = constrain(self.layernorm_embedding(x), ("batch", "length", "act_embed"))
        if c.is_lsg:
            token_mask = jnp.where(mask == 0, jnp.float32(np.finfo(np.float32).min), jnp.float32(0))
            for i, layer in enumerate(self.layers):
                x = layer(x, token_mask=token_mask, lsh_projections=None if lsh_projections is None else lsh_projections[i])
        else:
            for layer in self.layers:
                x = layer(x, mask=mask, segment_ids=segment_ids)
        return x


class Decoder(nn.Module):
    config: BartConfig

    def setup(self):
        c = self.config
        self.embed_positions = _positions(c, "embed_positions")
        self.layernorm_embedding = LayerNorm(epsilon=c.layer_norm_epsilon, **_kw(c))
        self.layers = [DecoderLayer(c, name=f"layers_{i}") for i in range(c.decoder_layers)]

    def embed(self, y, positions):
        y = y + _position_embeddings(self.embed_positions, positions)
        return constrain(self.layernorm_embedding(y), ("batch", "length", "act_embed"))

    def __call__(self, y, cross_kvs, *, self_attn: dict, cross_mask, positions=None, cross_segments=(None, None)):
        y = self.embed(y, jnp.arange(y.shape[1]) if positions is None else positions)
        for layer, kv in zip(self.layers, cross_kvs):
            y = layer(y, self_attn=self_attn, cross_kv=kv, cross_mask=cross_mask, cross_segments=cross_segments)
        return y


class BartModule(nn.Module):
    """The encoder-decoder with its head. Methods: ``encode``, ``cross_kvs``, ``decode``, ``decode_step``."""

    config: BartConfig

    def setup(self):
        c = self.config
        self.shared = Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(0.02), **_kw(c))
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, axes=("embed", "vocab"), **_kw(c))
        self.final_logits_bias = self.param(
            "final_logits_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "vocab")),
            (1, c.vocab_size), c.params_dtype,
        )

    # -- encoder ------------------------------------------------------------------------------------
    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, lsh_projections=None, segment_ids=None,
               position_ids=None):
        """Returns (encoder_last_hidden_state, cross-attention mask [n, S] 0/1 or None).

        segment_ids / position_ids [n, S]: packed rows (BART only), positions restarting per segment.

        LSG: mask_first_token hides token 0 from the encoder and (as the original's in-place mask edit
        does) from the decoder; adaptive padding to a block multiple is added and cropped away.
        """
        c = self.config
        if inputs_embeds is None:
            x = self.shared(input_ids) * jnp.asarray(c.embed_scale, c.compute_dtype)
        else:
            x = inputs_embeds.astype(c.compute_dtype)
        n, t = x.shape[:2]
        mask = jnp.ones((n, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        if not c.is_lsg:
            if t > c.max_position_embeddings:
                raise ValueError(f"input of {t} tokens exceeds max_position_embeddings={c.max_position_embeddings}")
            return self.encoder(x, mask, positions=position_ids, segment_ids=segment_ids), attention_mask
        if c.mask_first_token:
            mask = mask.at[:, 0].set(0)
        B, G = c.block_size, c.num_global_tokens
        t_pad = t
        if t > 2 * B and t % B:
            if not c.adaptive:
                raise ValueError(f"input length {t} is not a multiple of block_size={B} and adaptive=False")
            t_pad = -(-t // B) * B
            if inputs_embeds is None:
                pad_ids = jnp.full((n, t_pad - t), c.pad_token_id, input_ids.dtype)
                x = self.shared(jnp.concatenate([input_ids, pad_ids], axis=1)) * jnp.asarray(c.embed_scale, c.compute_dtype)
            else:
                x = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0)))
        if t_pad > c.max_position_embeddings:
            raise ValueError(f"input of {t} tokens (padded to {t_pad}) exceeds max_position_embeddings="
                             f"{c.max_position_embeddings}")
        mask_p = jnp.pad(mask, ((0, 0), (0, t_pad - t)))
        h = self.encoder(x, mask_p, lsh_projections)
        if c.pass_global_tokens_to_decoder:
            offset = G
        else:
            if c.pool_with_global:
                h = h.at[:, G].set(h[:, 0])
            h = h[:, G:]
            offset = 0
        h = h[:, : t + offset]
        cross = None
        if attention_mask is not None:
            cross = jnp.concatenate([jnp.ones((n, G), jnp.int32), mask], axis=1) if c.pass_global_tokens_to_decoder else mask
        return h, cross

    # -- decoder ------------------------------------------------------------------------------------
    def cross_kvs(self, encoder_hidden):
        return [layer.encoder_attn.project_kv(encoder_hidden) for layer in self.decoder.layers]

    def lm_logits(self, y):
        c = self.config
        logits = self.shared.attend(y) if c.tie_word_embeddings else self.lm_head(y)
        return logits + self.final_logits_bias.astype(logits.dtype)

    def decode(self, decoder_input_ids, encoder_hidden, cross_mask=None, decoder_attention_mask=None,
               decoder_inputs_embeds=None, segment_ids=None, decoder_segment_ids=None, decoder_position_ids=None):
        c = self.config
        if decoder_inputs_embeds is None:
            y = self.shared(decoder_input_ids) * jnp.asarray(c.embed_scale, c.compute_dtype)
        else:
            y = decoder_inputs_embeds.astype(c.compute_dtype)
        T = y.shape[1]
        if T > c.max_position_embeddings:
            raise ValueError(f"decoder input of {T} tokens exceeds max_position_embeddings={c.max_position_embeddings}")
        self_attn = dict(key_mask=decoder_attention_mask, causal=True, q_segment_ids=decoder_segment_ids,
                         kv_segment_ids=decoder_segment_ids)
        h = self.decoder(y, self.cross_kvs(encoder_hidden), self_attn=self_attn, cross_mask=cross_mask,
                         positions=decoder_position_ids, cross_segments=(decoder_segment_ids, segment_ids))
        return self.lm_logits(h)

    def decode_step(self, tokens, index, cache, cross_kvs, cross_mask):
        """One token per row at position ``index``. The cache and cross_kvs are per layer (k, v) in the
        decoding layouts (``DECODE_KV_LAYOUT``: k [., H, dh, S], v [., H, S, dh]); cross_kvs and cross_mask
        [B, S_enc] hold one copy per input row, the N = B·n rows being n beams or samples of each input row,
        consecutive."""
        c = self.config
        y = self.shared(tokens[:, None]) * jnp.asarray(c.embed_scale, c.compute_dtype)
        y = self.decoder.embed(y, jnp.reshape(index, (1,)))
        new_cache = []
        for i, layer in enumerate(self.decoder.layers):
            kv = write_decode_cache(cache[i], *layer.self_attn.project_kv(y), index)
            new_cache.append(kv)
            y = layer(y, self_kv=kv, self_attn=dict(causal=True, q_offset=index, kv_layout=DECODE_KV_LAYOUT),
                      cross_kv=cross_kvs[i], cross_mask=cross_mask, cross_kv_layout=DECODE_KV_LAYOUT)
        return self.lm_logits(y)[:, 0].astype(jnp.float32), new_cache

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None):
        enc, cross = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, cross, decoder_attention_mask), enc


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


class BartForConditionalGeneration(PretrainedModel):
    """BART with transformers' forward signature and outputs (``logits``, ``encoder_last_hidden_state``)."""

    family = "bart"
    config_class = BartConfig
    architecture = "BartForConditionalGeneration"

    @classmethod
    def make_module(cls, config):
        return BartModule(config)

    @classmethod
    def key_map(cls, config):
        from lmzoo.convert.lsg_bart import bart_key_map

        return bart_key_map(config)

    @classmethod
    def from_state_dict(cls, config, state_dict, **kwargs):
        from lmzoo.convert.lsg_bart import canonical_state_dict

        return super().from_state_dict(config, canonical_state_dict(state_dict, config), **kwargs)

    def dummy_inputs(self):
        ids = jnp.zeros((1, 4), jnp.int32)
        return {"input_ids": ids, "decoder_input_ids": ids}

    def lsh_projections(self, lsh_key):
        """Per-layer lists of the random matrices an lsh encoder draws (None when not lsh)."""
        c = self.config
        if not (c.is_lsg and c.lsg_uses_lsh_projections):
            return None
        return draw_lsh_projections(lsh_key, c.encoder_layers, heads=c.encoder_attention_heads,
                                    head_dim=c.d_model // c.encoder_attention_heads, block_size=c.block_size,
                                    sparse_block_size=c.sparse_block_size, sparsity_factor=c.sparsity_factor,
                                    num_pre_rounds=c.lsh_num_pre_rounds)

    def forward(
        self,
        params,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        head_mask=None,
        decoder_head_mask=None,
        cross_attn_head_mask=None,
        encoder_outputs=None,
        past_key_values=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        lsh_key=None,
        segment_ids=None,
        decoder_segment_ids=None,
        position_ids=None,
        decoder_position_ids=None,
    ):
        """transformers' BART forward, plus packed rows (several examples per row, as T5X packs them; plain
        BART only): ``segment_ids`` [B, S] / ``decoder_segment_ids`` [B, T] number each row's examples 1, 2,
        ... (0 = padding), and attention stays within a segment; ``position_ids`` / ``decoder_position_ids``
        [B, S] / [B, T] are the learned-position indices, by default 0, 1, ... restarting at every segment
        (without segment ids: 0 .. L-1, as the original). Decoder inputs of a packed row must be shifted
        right per segment by the caller."""
        c = self.config
        if output_attentions or output_hidden_states:
            raise NotImplementedError("output_attentions / output_hidden_states are not supported; use model.module")
        if past_key_values is not None:
            raise NotImplementedError("past_key_values is not supported in the forward; use model.generate (KV cache)")
        for name, hm in (("decoder_head_mask", decoder_head_mask), ("cross_attn_head_mask", cross_attn_head_mask),
                         ("head_mask", None if c.is_lsg else head_mask)):  # LSG's encoder ignores head_mask
            if hm is not None:
                raise NotImplementedError(f"{name} is not supported")
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        if c.is_lsg and (segment_ids is not None or decoder_segment_ids is not None):
            raise ValueError("LSG-BART cannot take packed rows (segment_ids): its encoder's global tokens attend to and are "
                             "seen by every token of a row, which would mix the packed examples; pack plain BART only")
        if c.is_lsg and position_ids is not None:
            raise NotImplementedError("position_ids are not supported by the LSG encoder")
        check_segment_pair(segment_ids, decoder_segment_ids)
        if segment_ids is not None:
            position_ids = segment_positions(segment_ids) if position_ids is None else position_ids
            decoder_position_ids = segment_positions(decoder_segment_ids) if decoder_position_ids is None else decoder_position_ids
        variables = {"params": params}
        if encoder_outputs is not None:
            enc = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs
            enc = getattr(enc, "last_hidden_state", enc)
            cross = attention_mask
            if c.is_lsg and c.pass_global_tokens_to_decoder and attention_mask is not None:
                cross = jnp.concatenate([jnp.ones((attention_mask.shape[0], c.num_global_tokens), attention_mask.dtype),
                                         attention_mask], axis=1)
        else:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("pass input_ids (or inputs_embeds or encoder_outputs)")
            enc, cross = self.module.apply(variables, input_ids, attention_mask, inputs_embeds,
                                           self.lsh_projections(lsh_key), segment_ids, position_ids, method=BartModule.encode)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if segment_ids is not None:
                raise ValueError("packed rows (segment_ids) need decoder_input_ids shifted right per segment")
            if labels is not None:
                decoder_input_ids = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)
            elif input_ids is not None:  # BART's own rule: shift the encoder input
                decoder_input_ids = shift_right(input_ids, c.decoder_start_token_id, c.pad_token_id)
            else:
                raise ValueError("pass decoder_input_ids (or labels, or input_ids to shift)")
        logits = self.module.apply(variables, decoder_input_ids, enc, cross, decoder_attention_mask,
                                   decoder_inputs_embeds, segment_ids, decoder_segment_ids, decoder_position_ids,
                                   method=BartModule.decode)
        loss = cross_entropy_ignore(logits, labels) if labels is not None else None
        return Seq2SeqLMOutput(logits=logits.astype(jnp.float32), encoder_last_hidden_state=enc, loss=loss)

    # -- generation -----------------------------------------------------------------------------------
    def decoding(self):
        from .generation import Decoding

        module, c = self.module, self.config
        hd = c.d_model // c.decoder_attention_heads

        def start(params, inputs, max_len):
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            v = {"params": params}
            if mask is None:
                mask = jnp.ones(ids.shape, jnp.int32)
            enc, cross = module.apply(v, ids, mask, None, self.lsh_projections(inputs.get("lsh_key", jax.random.key(0))),
                                      method=BartModule.encode)
            kvs = [decode_kv(*kv) for kv in module.apply(v, enc, method=BartModule.cross_kvs)]
            cache = empty_decode_cache(c.decoder_layers, ids.shape[0], c.decoder_attention_heads, hd, max_len, c.compute_dtype)
            static = {"cross": kvs, "cross_mask": cross}
            return static, cache

        def step(params, static, cache, tokens, index):
            return module.apply({"params": params}, tokens, index, cache, static["cross"], static["cross_mask"],
                                method=BartModule.decode_step)

        # Right-padding the input changes nothing for BART (padded keys get zero weight), so nearby lengths
        # may share a program; LSG's result depends on the length itself (fallback, block padding, sparse
        # groups), so it keeps the exact length.
        bucket = None if c.is_lsg or c.max_position_embeddings % 32 else 32
        return Decoding(
            start=start, step=step, vocab_size=c.vocab_size, is_encoder_decoder=True, length_bucket=bucket,
            max_positions=c.max_position_embeddings, shared_static=True,
        )


class LSGBartForConditionalGeneration(BartForConditionalGeneration):
    """LSG-BART (``LSGBartForConditionalGeneration``): BART with the LSG encoder."""

    family = "lsg_bart"
    config_class = LSGBartConfig
    architecture = "LSGBartForConditionalGeneration"


def model_class(hf_config) -> type[PretrainedModel]:
    return LSGBartForConditionalGeneration if is_lsg_config(hf_config) else BartForConditionalGeneration

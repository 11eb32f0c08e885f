"""LongLM = T5 (v1.0 and v1.1 variants) as transformers' ``T5ForConditionalGeneration`` computes it.

Pre-RMSNorm blocks, unscaled attention with a relative-position bias table that lives in block 0 of
each stack and is shared by all its blocks, ReLU or gated-GELU FFN, tied head scaled by
``d_model**-0.5`` (untied head unscaled). Attention inner width is ``num_heads*d_kv``, which may differ
from d_model (LongLM-large).

LSG-T5 (a config.json with the LSG keys, written by ``lmzoo convert --to-lsg``): the encoder's
self-attention is LSG attention (:mod:`lmzoo.lsg_attention`, the relative bias at the positions it
describes) over ``num_global_tokens`` learned global rows prepended to the token embeddings, as LSG-BART's
encoder does; the decoder is unchanged and by default cross-attends to the globals too.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .configuration import ConfigError, ModelConfig
from .attention import attend, check_segment_pair
from .layers import (ACTIVATIONS, DECODE_KV_LAYOUT, Embed, Linear, RMSNorm, constrain, decode_kv, empty_decode_cache,
                     t5_relative_position_bucket, write_decode_cache)
from .lsg_attention import MIN, LSGFields, draw_lsh_projections, has_lsg_keys, lsg_attention
from .modeling import PretrainedModel
from .outputs import Seq2SeqLMOutput

__all__ = ["T5Config", "LSGT5Config", "T5Module", "T5ForConditionalGeneration", "LSGT5ForConditionalGeneration",
           "model_class"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config(ModelConfig):
    family = "t5"
    model_type = "t5"

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    dropout_rate: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        act = self.feed_forward_proj.split("-")[-1]
        if act not in ACTIVATIONS:
            raise ConfigError(f"feed_forward_proj {self.feed_forward_proj!r}: unknown activation {act!r}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got {self.feed_forward_proj!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # transformers maps "gated-gelu" to gelu_new (the tanh approximation).
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def is_lsg(self) -> bool:
        return False

    @classmethod
    def from_hf_config(cls, hf, **runtime):
        cfg = super().from_hf_config(hf, **runtime)
        if hf.get("eos_token_id") is None or hf.get("pad_token_id") is None:
            pass  # keep T5 defaults
        return cfg

    def to_hf_config(self):
        out = super().to_hf_config()
        out["is_encoder_decoder"] = True
        out.setdefault("architectures", ["T5ForConditionalGeneration"])
        act = self.feed_forward_proj.split("-")[-1]
        out["dense_act_fn"] = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act
        out["is_gated_act"] = self.is_gated
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSGT5Config(LSGFields, T5Config):
    """T5 with LSG attention in the encoder: the LSG keys of :class:`LSGFields` plus, as LSG-BART,
    ``pass_global_tokens_to_decoder`` (False: the globals are dropped from the encoder output, token 0's
    row replaced by global 0's with ``pool_with_global``)."""

    pass_global_tokens_to_decoder: bool = True

    @property
    def lsg_num_heads(self) -> int:
        return self.num_heads

    @property
    def lsg_relative_bias(self) -> bool:
        return True


# ----------------------------------------------------------------------------------------------------
def _normal(std: float):
    """Random-init weights as transformers' ``T5PreTrainedModel._init_weights`` draws them (factor 1)."""
    return nn.initializers.normal(stddev=std)


class T5Attention(nn.Module):
    config: T5Config

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        # transformers' T5 init (random models): unscaled attention trains only with unit-scale keys
        self.q = Linear(c.inner_dim, axes=("embed", "joined_kv"), kernel_init=_normal((c.d_model * c.d_kv) ** -0.5), **kw)
        self.k = Linear(c.inner_dim, axes=("embed", "joined_kv"), kernel_init=_normal(c.d_model**-0.5), **kw)
        self.v = Linear(c.inner_dim, axes=("embed", "joined_kv"), kernel_init=_normal(c.d_model**-0.5), **kw)
        self.o = Linear(c.d_model, axes=("joined_kv", "embed"), kernel_init=_normal(c.inner_dim**-0.5), **kw)

    def heads(self, x):
        c = self.config
        return x.reshape(x.shape[:-1] + (c.num_heads, c.d_kv))

    def project_kv(self, x):
        return self.heads(self.k(x)), self.heads(self.v(x))

    def __call__(self, x, kv=None, *, key_mask=None, causal=False, q_offset=0, bias_table=None, bucket_fn=None,
                 q_segment_ids=None, kv_segment_ids=None, lsg_mask=None, lsh_projections=None, kv_layout="blhd"):
        """x [B,Lq,D]; kv = (k [B,Lk,H,Dk], v) precomputed, or None for self-attention on x.

        T5 attention is unscaled; masks, segment ids (packed rows) and the relative bias are passed in
        factored form (see attend). lsg_mask (LSG encoder): x is [globals; tokens] and lsg_mask the
        additive [B, t] mask of the tokens; the attention is :func:`lsg_attention`.
        """
        q = self.heads(self.q(x))
        k, v = kv if kv is not None else self.project_kv(x)
        q = constrain(q, ("batch", "length", "act_heads", "kv"))
        if lsg_mask is not None:
            sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B,L,H,Dk] <-> [B,H,L,Dk]
            ctx = lsg_attention(sw(q), sw(k), sw(v), lsg_mask, lsh_projections=lsh_projections, scale=1.0,
                                bias_table=bias_table, bucket_fn=bucket_fn, **self.config.lsg_attention_kwargs())
            out = sw(ctx).astype(self.config.compute_dtype)
            return self.o(out.reshape(out.shape[:2] + (self.config.inner_dim,)))
        out = attend(
            q, k, v, impl=self.config.attention_impl, scale=1.0, key_mask=key_mask, causal=causal, q_offset=q_offset,
            bias_table=bias_table, bucket_fn=bucket_fn, dtype=self.config.compute_dtype,
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, kv_layout=kv_layout,
        )
        out = out.reshape(out.shape[:2] + (self.config.inner_dim,))
        return self.o(out)


class T5MLP(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        wi = dict(kw, kernel_init=_normal(c.d_model**-0.5))
        act = ACTIVATIONS[c.activation]
        if c.is_gated:
            h = act(Linear(c.d_ff, axes=("embed", "mlp"), name="wi_0", **wi)(x)) * Linear(c.d_ff, axes=("embed", "mlp"), name="wi_1", **wi)(x)
        else:
            h = act(Linear(c.d_ff, axes=("embed", "mlp"), name="wi", **wi)(x))
        h = constrain(h, ("batch", "length", "act_mlp"))
        return Linear(c.d_model, axes=("mlp", "embed"), name="wo", kernel_init=_normal(c.d_ff**-0.5), **kw)(h)


class T5Block(nn.Module):
    config: T5Config
    is_decoder: bool = False

    def setup(self):
        c = self.config
        kw = dict(epsilon=c.layer_norm_epsilon, dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.self_attn_norm = RMSNorm(**kw)
        self.self_attn = T5Attention(c)
        if self.is_decoder:
            self.cross_attn_norm = RMSNorm(**kw)
            self.cross_attn = T5Attention(c)
        self.mlp_norm = RMSNorm(**kw)
        self.mlp = T5MLP(c)

    def _clamp(self, x):
        if x.dtype == jnp.float16:
            big = jnp.finfo(jnp.float16).max - 1000
            return jnp.clip(x, -big, big)
        return x

    def __call__(self, x, *, self_attn: dict, cross_kv=None, cross_mask=None, self_kv=None, cross_segments=(None, None)):
        h = self.self_attn_norm(x)
        x = self._clamp(x + self.self_attn(h, self_kv, **self_attn))
        if self.is_decoder:
            h = self.cross_attn_norm(x)
            q_seg, kv_seg = cross_segments
            x = self._clamp(x + self.cross_attn(h, cross_kv, key_mask=cross_mask, q_segment_ids=q_seg, kv_segment_ids=kv_seg))
        x = self._clamp(x + self.mlp(self.mlp_norm(x)))
        return constrain(x, ("batch", "length", "act_embed"))


class T5Stack(nn.Module):
    config: T5Config
    is_decoder: bool = False

    def setup(self):
        c = self.config
        n = c.num_decoder_layers if self.is_decoder else c.num_layers
        self.relative_attention_bias = self.param(
            "relative_attention_bias",
            nn.with_logical_partitioning(_normal(c.d_model**-0.5), ("relpos_buckets", "heads")),
            (c.relative_attention_num_buckets, c.num_heads),
            c.params_dtype,
        )
        self.blocks = [T5Block(c, is_decoder=self.is_decoder, name=f"block_{i}") for i in range(n)]
        self.final_layer_norm = RMSNorm(epsilon=c.layer_norm_epsilon, dtype=c.compute_dtype, param_dtype=c.params_dtype)
        if c.is_lsg and not self.is_decoder:
            self.global_embeddings = Embed(512, c.d_model, axes=("positions", "embed"), dtype=c.compute_dtype,
                                           param_dtype=c.params_dtype)

    def prepend_globals(self, x):
        """LSG encoder: the first num_global_tokens rows of the global table before the token embeddings."""
        g = self.global_embeddings(jnp.arange(self.config.num_global_tokens))
        return jnp.concatenate([jnp.broadcast_to(g[None], (x.shape[0],) + g.shape).astype(x.dtype), x], axis=1)

    def lsg_attention_args(self, token_mask) -> dict:
        """LSG encoder self-attention: the additive token mask [B, t] and this stack's bias."""
        return dict(lsg_mask=token_mask, bias_table=self.relative_attention_bias, bucket_fn=self.bucket)

    def bucket(self, rel):
        """T5 bucket of rel = key_pos - query_pos (bidirectional in the encoder, causal in the decoder)."""
        c = self.config
        return t5_relative_position_bucket(
            rel,
            bidirectional=not self.is_decoder,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
        )

    def self_attention_args(self, key_mask=None, q_offset=0, segment_ids=None) -> dict:
        """Mask and bias of this stack's self-attention (the bias table of block 0, shared by all blocks);
        segment_ids [B, L]: packed rows attend within their segment."""
        return dict(
            key_mask=key_mask, causal=self.is_decoder, q_offset=q_offset,
            bias_table=self.relative_attention_bias, bucket_fn=self.bucket,
            q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
        )

    def __call__(self, x, *, self_attn: dict, cross_kvs=None, cross_mask=None, self_kvs=None, cross_segments=(None, None),
                 lsh_projections=None):
        for i, blk in enumerate(self.blocks):
            x = blk(
                x,
                self_attn=self_attn if lsh_projections is None else dict(self_attn, lsh_projections=lsh_projections[i]),
                cross_kv=None if cross_kvs is None else cross_kvs[i],
                cross_mask=cross_mask,
                self_kv=None if self_kvs is None else self_kvs[i],
                cross_segments=cross_segments,
            )
        return self.final_layer_norm(x)


class T5Module(nn.Module):
    """The full encoder-decoder. Methods: ``encode``, ``decode``, ``decode_step``, ``__call__``."""

    config: T5Config

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.shared = Embed(c.vocab_size, c.d_model, **kw)
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, axes=("embed", "vocab"), kernel_init=_normal(1.0), **kw)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, segment_ids=None):
        x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.compute_dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        return self.encoder(x, self_attn=self.encoder.self_attention_args(attention_mask, segment_ids=segment_ids))

    def encode_lsg(self, input_ids=None, attention_mask=None, inputs_embeds=None, lsh_projections=None):
        """LSG encoder: (encoder_last_hidden_state, cross-attention mask [n, S] 0/1), as LSG-BART's encode.

        ``mask_first_token`` hides token 0 from the encoder and the cross-attention; on the block path the
        tokens are right-padded to a block multiple (pad ids, or zero rows for inputs_embeds) and cropped
        back; globals are kept for the decoder (``pass_global_tokens_to_decoder``) or dropped.
        """
        c = self.config
        G = c.num_global_tokens
        n, t = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        mask = jnp.ones((n, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        if c.mask_first_token:
            mask = mask.at[:, 0].set(0)
        t_pad = c.lsg_padded_length(t)
        if inputs_embeds is None:
            ids = jnp.pad(input_ids, ((0, 0), (0, t_pad - t)), constant_values=c.pad_token_id)
            x = self.shared(ids)
        else:
            x = jnp.pad(inputs_embeds.astype(c.compute_dtype), ((0, 0), (0, t_pad - t), (0, 0)))
        x = constrain(self.encoder.prepend_globals(x), ("batch", "length", "act_embed"))
        token_mask = jnp.where(jnp.pad(mask, ((0, 0), (0, t_pad - t))) == 0, jnp.float32(MIN), jnp.float32(0))
        h = self.encoder(x, self_attn=self.encoder.lsg_attention_args(token_mask), lsh_projections=lsh_projections)
        if c.pass_global_tokens_to_decoder:
            return h[:, : G + t], jnp.concatenate([jnp.ones((n, G), jnp.int32), mask], axis=1)
        if c.pool_with_global:
            h = h.at[:, G].set(h[:, 0])
        return h[:, G: G + t], mask

    def lm_logits(self, y):
        c = self.config
        if c.tie_word_embeddings:
            return self.shared.attend(y * (c.d_model**-0.5))
        return self.lm_head(y)

    def cross_kvs(self, encoder_hidden):
        return [blk.cross_attn.project_kv(encoder_hidden) for blk in self.decoder.blocks]

    def decode(self, decoder_input_ids, encoder_hidden, attention_mask=None, decoder_attention_mask=None, decoder_inputs_embeds=None,
               segment_ids=None, decoder_segment_ids=None):
        c = self.config
        y = self.shared(decoder_input_ids) if decoder_inputs_embeds is None else decoder_inputs_embeds.astype(c.compute_dtype)
        # without decoder_attention_mask every decoder position is visible (a leading pad id is not masked)
        h = self.decoder(
            y,
            self_attn=self.decoder.self_attention_args(decoder_attention_mask, segment_ids=decoder_segment_ids),
            cross_kvs=self.cross_kvs(encoder_hidden),
            cross_mask=attention_mask,
            cross_segments=(decoder_segment_ids, segment_ids),
        )
        return h, self.lm_logits(h)

    def decode_step(self, tokens, index, cache, cross_kvs, cross_mask):
        """One decoding step for every row: tokens [N], index = position. Head-major layouts that the step's
        matmuls read as they are (no cache is transposed in every step): cache per block k [N,H,Dk,S] and
        v [N,H,S,Dk]; cross_kvs per block k [B,H,Dk,S_enc], v [B,H,S_enc,Dk], with cross_mask [B,S_enc], one copy per
        input row: the N = B·n rows (n beams or samples of each input row, consecutive) are that row's n
        queries of the cross-attention."""
        N, B = tokens.shape[0], cross_kvs[0][0].shape[0]
        y = self.shared(tokens[:, None])
        self_attn = self.decoder.self_attention_args(q_offset=index)
        new_cache = []
        x = y
        for i, blk in enumerate(self.decoder.blocks):
            h = blk.self_attn_norm(x)
            kv = write_decode_cache(cache[i], *blk.self_attn.project_kv(h), index)
            new_cache.append(kv)
            x = blk._clamp(x + blk.self_attn(h, kv, kv_layout=DECODE_KV_LAYOUT, **self_attn))
            h = blk.cross_attn_norm(x).reshape(B, N // B, -1)
            x = blk._clamp(x + blk.cross_attn(h, cross_kvs[i], key_mask=cross_mask, kv_layout=DECODE_KV_LAYOUT).reshape(x.shape))
            x = blk._clamp(x + blk.mlp(blk.mlp_norm(x)))
        h = self.decoder.final_layer_norm(x)
        return self.lm_logits(h)[:, 0].astype(jnp.float32), new_cache

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None):
        if self.config.is_lsg:
            enc, attention_mask = self.encode_lsg(input_ids, attention_mask)
        else:
            enc = self.encode(input_ids, attention_mask)
        _, logits = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask)
        return logits, enc


def shift_right(labels, decoder_start_token_id: int, pad_token_id: int):
    """transformers' ``_shift_right``: prepend the start token, drop the last label, -100 -> pad."""
    shifted = jnp.concatenate([jnp.full(labels.shape[:1] + (1,), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def cross_entropy_ignore(logits, labels, ignore_index: int = -100):
    """Mean token cross-entropy over labels != ignore_index (float32), as torch's CrossEntropyLoss."""
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


class T5ForConditionalGeneration(PretrainedModel):
    """LongLM / T5 with transformers' forward signature and outputs."""

    family = "t5"
    config_class = T5Config
    architecture = "T5ForConditionalGeneration"

    @classmethod
    def make_module(cls, config):
        return T5Module(config)

    @classmethod
    def key_map(cls, config):
        from lmzoo.convert.t5 import t5_key_map

        return t5_key_map(config)

    def dummy_inputs(self):
        ids = jnp.zeros((1, 4), jnp.int32)
        return {"input_ids": ids, "decoder_input_ids": ids}

    def forward(
        self,
        params,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        labels=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        encoder_outputs=None,
        use_cache=None,
        return_dict=None,
        output_attentions=None,
        output_hidden_states=None,
        segment_ids=None,
        decoder_segment_ids=None,
        lsh_key=None,
    ):
        """transformers' T5 forward, plus packed rows (several examples per row, as T5X packs them):
        ``segment_ids`` [B, S] / ``decoder_segment_ids`` [B, T] number each row's examples 1, 2, ... (0 =
        padding); encoder and decoder self-attention and cross-attention stay within a segment. Targets of
        a packed row are shifted right per segment by the caller (``labels`` alone are not shifted per
        segment). T5's relative bias needs no positions: within a segment it sees the unpacked distances.
        LSG-T5: ``lsh_key`` is the jax PRNG key of an lsh encoder's random projections; no packed rows."""
        c = self.config
        if output_attentions or output_hidden_states:
            raise NotImplementedError("output_attentions / output_hidden_states are not supported; use the module directly")
        if c.is_lsg and (segment_ids is not None or decoder_segment_ids is not None):
            raise ValueError("LSG-T5 cannot take packed rows (segment_ids): its global tokens attend to and are seen by "
                             "every token of a row, which would mix the packed examples")
        check_segment_pair(segment_ids, decoder_segment_ids)
        variables = {"params": params}
        if encoder_outputs is not None:
            enc = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs
            enc = getattr(enc, "last_hidden_state", enc)
            if c.is_lsg and c.pass_global_tokens_to_decoder and attention_mask is not None:
                attention_mask = jnp.concatenate(
                    [jnp.ones((attention_mask.shape[0], c.num_global_tokens), attention_mask.dtype), attention_mask], axis=1)
        elif c.is_lsg:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("pass input_ids (or inputs_embeds or encoder_outputs)")
            # from here on attention_mask is the cross-attention mask (globals included)
            enc, attention_mask = self.module.apply(variables, input_ids, attention_mask, inputs_embeds,
                                                    self.lsh_projections(lsh_key), method=T5Module.encode_lsg)
        else:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("pass input_ids (or inputs_embeds or encoder_outputs)")
            enc = self.module.apply(variables, input_ids, attention_mask, inputs_embeds, segment_ids, method=T5Module.encode)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids (or labels, which are shifted right into decoder inputs)")
            if segment_ids is not None:
                raise ValueError("packed rows (segment_ids) need decoder_input_ids shifted right per segment")
            decoder_input_ids = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)
        _, logits = self.module.apply(
            variables, decoder_input_ids, enc, attention_mask, decoder_attention_mask, decoder_inputs_embeds,
            segment_ids, decoder_segment_ids, method=T5Module.decode
        )
        loss = cross_entropy_ignore(logits, labels) if labels is not None else None
        return Seq2SeqLMOutput(logits=logits.astype(jnp.float32), encoder_last_hidden_state=enc, loss=loss)

    # -- generation -------------------------------------------------------------------------------
    def decoding(self):
        from .generation import Decoding

        module, c = self.module, self.config

        def start(params, inputs, max_len):
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            v = {"params": params}
            if c.is_lsg:
                lsh = self.lsh_projections(inputs.get("lsh_key", jax.random.key(0)))
                enc, mask = module.apply(v, ids, mask, None, lsh, method=T5Module.encode_lsg)
            else:
                enc = module.apply(v, ids, mask, method=T5Module.encode)
            cross = [decode_kv(*kv) for kv in module.apply(v, enc, method=T5Module.cross_kvs)]
            n = ids.shape[0]
            cache = empty_decode_cache(c.num_decoder_layers, n, c.num_heads, c.d_kv, max_len, c.compute_dtype)
            static = {"cross": cross, "cross_mask": mask}
            return static, cache

        def step(params, static, cache, tokens, index):
            return module.apply(
                {"params": params}, tokens, index, cache, static["cross"], static["cross_mask"], method=T5Module.decode_step
            )

        # LSG's result depends on the input length (fallback, block padding): no length bucket
        return Decoding(start=start, step=step, vocab_size=c.vocab_size, is_encoder_decoder=True,
                        length_bucket=None if c.is_lsg else 32, shared_static=True)

    def lsh_projections(self, lsh_key):
        """Per-layer random matrices of an LSG lsh encoder (None for every other model)."""
        c = self.config
        if not (c.is_lsg and c.lsg_uses_lsh_projections):
            return None
        return draw_lsh_projections(lsh_key, c.num_layers, heads=c.num_heads, head_dim=c.d_kv, block_size=c.block_size,
                                    sparse_block_size=c.sparse_block_size, sparsity_factor=c.sparsity_factor,
                                    num_pre_rounds=c.lsh_num_pre_rounds)


class LSGT5ForConditionalGeneration(T5ForConditionalGeneration):
    """T5 / LongLM whose encoder runs LSG attention (a config.json with the LSG keys)."""

    config_class = LSGT5Config


def model_class(hf_config) -> type[PretrainedModel]:
    return LSGT5ForConditionalGeneration if has_lsg_keys(hf_config) else T5ForConditionalGeneration


def load_tokenizer(folder: str):
    """The LongLM tokenizer of a checkpoint folder (its ``spiece.model``)."""
    from .t5_tokenizer import T5Tokenizer

    return T5Tokenizer(folder)

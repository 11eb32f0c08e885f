"""PALM 2.0 as ModelScope's ``PalmForTextGeneration`` computes it (``modelscope.models.nlp.palm_v2``).

A post-LN BERT encoder (eps from the encoder sub-folder's config, erf GELU) feeds a PreSumm pre-LN
Transformer decoder: ``E[y]*sqrt(D) + sinusoid``, queries divided by ``sqrt(d)`` before the matmul,
``masked_fill(-1e18)`` masks, tanh GELU, eps 1e-6, a final LayerNorm. The output projection is tied to
the decoder embedding (not to BERT's) and followed by a log-softmax.

Generation is PALM's own beam search (``Translator._fast_translate_batch``), one jit-compiled
``lax.while_loop`` with per-item done flags in place of the original's batch compaction:

* GNMT length penalty ``lp = ((5 + step + 1) / 6) ** alpha`` on the cumulative log-prob every step;
* EOS is banned (-1e20) while ``step < min_length``; at most ``max_length`` tokens after BOS;
* an item ends when its top beam emits EOS (or at the last step); finished beams are not frozen, and
  the winner is the best length-normalised hypothesis collected so far (first one wins ties);
* incremental decoding masks self-attention from the CURRENT token only: a PAD input attends
  uniformly over the cache, any other token sees every cached position (earlier PADs included).

``model.generate`` takes the shared kwargs with PALM's meanings; see :meth:`PalmForTextGeneration.generate`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import partial
from typing import Any, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .configuration import ConfigError, ModelConfig, read_json
from .attention import F32_MIN, attend
from .layers import ACTIVATIONS, Embed, LayerNorm, Linear, constrain, dot_product_attention
from .modeling import PretrainedModel
from .outputs import ModelOutput

__all__ = [
    "BertEncoderConfig",
    "PalmConfig",
    "PalmModule",
    "PalmOutput",
    "PalmGenerateOutput",
    "PalmForTextGeneration",
    "PalmTokenizer",
    "load_tokenizer",
    "sinusoid_table",
    "model_class",
]

SOURCE_BUCKET = 32  # source lengths are padded up to a multiple of this (one program per bucket)
DECODE_BUCKET = 32  # so are the cached decoder positions (max_length stays exact)
MASK_VALUE = -1e18  # PreSumm's masked_fill value: a fully masked row attends uniformly
EOS_BAN = -1e20  # the log-prob EOS gets while step < min_length


# ----------------------------------------------------------------------------------------------------
# config
@dataclasses.dataclass(frozen=True, kw_only=True)
class BertEncoderConfig:
    """The encoder sub-folder's ``config.json`` (a transformers ``BertConfig``), fields PALM uses."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"encoder config: unknown hidden_act {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"encoder config: hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "BertEncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})


# PalmConfig's own keys, with the class defaults of the original (config.json overrides them).
PALM_FIELDS = (
    "encoder", "encoder_pth", "max_pos", "share_emb", "dec_layers", "dec_hidden_size", "dec_heads", "dec_ff_size",
    "dec_dropout", "use_bert_emb", "label_smoothing", "alpha", "beam_size", "min_length", "max_length",
    "sample_topk", "block_trigram",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class PalmConfig(ModelConfig):
    """PalmConfig (config.json) + the encoder's BertConfig + the special ids from the encoder's vocab.txt."""

    family = "palm"
    model_type = "palm"

    encoder: str = "roberta"
    encoder_pth: str = "roberta-base"
    max_pos: int = 512
    share_emb: bool = False
    dec_layers: int = 12
    dec_hidden_size: int = 768
    dec_heads: int = 8
    dec_ff_size: int = 3072
    dec_dropout: float = 0.2
    use_bert_emb: bool = True
    label_smoothing: float = 0.1
    alpha: float = 0.95
    beam_size: int = 5
    min_length: int = 40
    max_length: int = 130
    sample_topk: bool = False
    block_trigram: bool = False

    bert: BertEncoderConfig = dataclasses.field(default_factory=BertEncoderConfig)
    # ``symbols`` of the original: BOS=[CLS], EOS=[SEP], PAD=[PAD] looked up in the encoder's vocab.txt.
    bos_token_id: int = 101
    eos_token_id: int = 102
    pad_token_id: int = 0
    # Files next to config.json that a PALM folder carries (name -> dict or bytes), written back on export.
    files: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.encoder not in ("bert", "zh_bert"):
            raise ConfigError(
                f"PALM encoder {self.encoder!r} is not supported (lmzoo implements the BERT encoders 'bert' / 'zh_bert')"
            )
        if self.dec_hidden_size != self.bert.hidden_size:
            raise ConfigError(
                f"dec_hidden_size {self.dec_hidden_size} must equal the encoder hidden_size {self.bert.hidden_size} "
                "(the decoder embedding is built with the encoder width)"
            )
        if self.dec_hidden_size % self.dec_heads:
            raise ConfigError(f"dec_hidden_size {self.dec_hidden_size} is not a multiple of dec_heads {self.dec_heads}")
        if self.max_pos > 512:
            raise ConfigError(f"max_pos {self.max_pos} > 512 crashes the original PALM; use <= 512")
        if self.share_emb:
            raise ConfigError("share_emb=True crashes the original PALM; it must be false")
        for name in ("dec_layers", "dec_heads", "dec_ff_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def vocab_size(self) -> int:
        return self.bert.vocab_size

    @property
    def decoder_padding_idx(self) -> int:
        """The decoder embedding's padding_idx: it defines the decoder PAD masks and the context mask."""
        return 0  # 1 only for the RoBERTa encoder, which lmzoo does not implement

    @classmethod
    def architecture_fields(cls) -> list[str]:
        return list(PALM_FIELDS)

    def generation_defaults(self) -> dict[str, Any]:
        out = super().generation_defaults()
        out.update(
            num_beams=self.beam_size,
            length_penalty=self.alpha,
            min_length=self.min_length,
            max_length=self.max_length,
            early_stopping=True,
            no_repeat_ngram_size=0,
            do_sample=False,
            decoder_start_token_id=self.bos_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return out


def read_vocab_ids(path: str, names=("[CLS]", "[SEP]", "[PAD]")) -> dict[str, int]:
    """Ids of the named tokens in a BERT vocab.txt (one token per line, id = line number)."""
    ids: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            tok = line.rstrip("\n")
            if tok in names and tok not in ids:
                ids[tok] = i
    missing = [n for n in names if n not in ids]
    if missing:
        raise ConfigError(f"{path}: vocabulary has no {', '.join(missing)} (PALM's BOS / EOS / PAD)")
    return ids


def load_palm_config(folder: str, hf: Mapping[str, Any], **runtime) -> PalmConfig:
    """config.json + ``<encoder_pth>/config.json`` + ``<encoder_pth>/vocab.txt`` (+ configuration.json, vocab.txt)."""
    kwargs = {k: hf[k] for k in PALM_FIELDS if k in hf}
    encoder_pth = str(hf.get("encoder_pth", PalmConfig.encoder_pth))
    enc_dir = os.path.join(folder, encoder_pth)
    enc_cfg = os.path.join(enc_dir, "config.json")
    if not os.path.exists(enc_cfg):
        raise ConfigError(
            f"{folder}: PALM's encoder config {enc_cfg} is missing (config.json names encoder_pth={encoder_pth!r})"
        )
    bert_hf = read_json(enc_cfg)
    vocab = os.path.join(enc_dir, "vocab.txt")
    if not os.path.exists(vocab):
        raise ConfigError(f"{folder}: PALM's encoder vocabulary {vocab} is missing (it gives the BOS/EOS/PAD ids)")
    ids = read_vocab_ids(vocab)
    files: dict[str, Any] = {"bert/config.json": bert_hf}
    with open(vocab, "rb") as f:
        files["bert/vocab.txt"] = f.read()
    for name in ("configuration.json", "vocab.txt"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            if name.endswith(".json"):
                files[name] = read_json(p)
            else:
                with open(p, "rb") as f:
                    files[name] = f.read()
    return PalmConfig(
        **kwargs,
        bert=BertEncoderConfig.from_hf_config(bert_hf),
        bos_token_id=ids["[CLS]"],
        eos_token_id=ids["[SEP]"],
        pad_token_id=ids["[PAD]"],
        files=files,
        hf_config=dict(hf),
        **runtime,
    )


# ----------------------------------------------------------------------------------------------------
# encoder: transformers' BertModel (post-LN)
def _kw(c: PalmConfig) -> dict:
    return dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)


def pack_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, pad: int, bucket: int = SOURCE_BUCKET):
    """Host-side index tables for the packed encoder of generation: (gather [T], scatter [B*S]) int32.

    Kept: every token that is an encoder key (mask != 0) or that the decoder reads (id != pad); a row
    with no key or no non-pad id is kept whole (it attends uniformly over all its positions). A dropped
    token is a masked key in the encoder and a blocked source position in the decoder, so what stands
    there (zeros) gets weight 0 and changes nothing. ``gather`` lists the kept flat positions, padded to a
    multiple of ``bucket`` by repeating position 0; ``scatter`` maps each flat position to its packed
    index, or to T (a zero row) when dropped."""
    B, S = input_ids.shape
    keep = (attention_mask != 0) | (input_ids != pad)
    keep[~(attention_mask != 0).any(axis=1) | ~(input_ids != pad).any(axis=1)] = True
    flat = np.flatnonzero(keep.reshape(-1))
    T = min(-(-len(flat) // bucket) * bucket, B * S)
    gather = np.zeros(T, np.int32)
    gather[: len(flat)] = flat
    scatter = np.full(B * S, T, np.int32)
    scatter[flat] = np.arange(len(flat), dtype=np.int32)
    return gather, scatter


def unpack(t, pack):
    """Packed [1,T,F] -> padded rows [B,S,F] (dropped tokens as zeros)."""
    gather, scatter, B, S = pack
    ext = jnp.concatenate([t[0], jnp.zeros((1, t.shape[-1]), t.dtype)])
    return ext[scatter].reshape(B, S, t.shape[-1])


def repack(t, pack):
    """Padded rows [B,S,F] -> packed [1,T,F]."""
    return t.reshape(-1, t.shape[-1])[pack[0]][None]


class BertEmbeddings(nn.Module):
    config: PalmConfig

    def setup(self):
        c, b = self.config, self.config.bert
        self.word_embeddings = Embed(b.vocab_size, b.hidden_size, **_kw(c))
        self.position_embeddings = Embed(b.max_position_embeddings, b.hidden_size, axes=("positions", "embed"), **_kw(c))
        self.token_type_embeddings = Embed(b.type_vocab_size, b.hidden_size, axes=(None, "embed"), **_kw(c))
        self.LayerNorm = LayerNorm(epsilon=b.layer_norm_eps, **_kw(c))

    def __call__(self, input_ids, positions=None):
        """``positions`` [L] (the packed encoder: each token's column): default ``arange(L)``."""
        S = input_ids.shape[1]
        if positions is None and S > self.config.bert.max_position_embeddings:
            raise ValueError(f"input length {S} exceeds the encoder's max_position_embeddings {self.config.bert.max_position_embeddings}")
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(jnp.zeros_like(input_ids))
        x = x + self.position_embeddings(jnp.arange(S) if positions is None else positions)[None]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    config: PalmConfig

    def setup(self):
        c, b = self.config, self.config.bert
        qkv = dict(axes=("embed", "joined_kv"), use_bias=True, **_kw(c))
        self.query = Linear(b.hidden_size, **qkv)
        self.key = Linear(b.hidden_size, **qkv)
        self.value = Linear(b.hidden_size, **qkv)
        self.output = Linear(b.hidden_size, axes=("joined_kv", "embed"), use_bias=True, **_kw(c))

    def __call__(self, x, mask, pack=None):
        b = self.config.bert
        H = b.num_attention_heads
        d = b.hidden_size // H
        split = lambda t: t.reshape(t.shape[:-1] + (H, d))
        if pack is not None:  # x holds packed tokens [1,T,D]: the attention runs on the padded rows
            out = self._attend(split(unpack(self.query(x), pack)), split(unpack(self.key(x), pack)),
                               split(unpack(self.value(x), pack)), mask)
            return self.output(repack(out.reshape(out.shape[:2] + (b.hidden_size,)), pack))
        q = constrain(split(self.query(x)), ("batch", "length", "act_heads", "kv"))
        return self.output(self._attend(q, split(self.key(x)), split(self.value(x)), mask).reshape(q.shape[:2] + (b.hidden_size,)))

    def _attend(self, q, k, v, mask):
        d = q.shape[-1]
        if self.config.attention_impl == "pallas":
            # key padding in-kernel; HF BERT adds finfo.min to padded keys' scores (additive, as mask_value)
            return attend(
                q, k, v, impl="pallas", scale=1.0 / math.sqrt(d),
                key_mask=mask[:, 0, 0, :], mask_value=F32_MIN, dtype=self.config.compute_dtype,
            )
        return dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(d), dtype=self.config.compute_dtype)[0]


class BertLayer(nn.Module):
    config: PalmConfig

    def setup(self):
        c, b = self.config, self.config.bert
        self.attention = BertSelfAttention(c)
        self.attention_norm = LayerNorm(epsilon=b.layer_norm_eps, **_kw(c))
        self.intermediate = Linear(b.intermediate_size, axes=("embed", "mlp"), use_bias=True, **_kw(c))
        self.output = Linear(b.hidden_size, axes=("mlp", "embed"), use_bias=True, **_kw(c))
        self.output_norm = LayerNorm(epsilon=b.layer_norm_eps, **_kw(c))

    def __call__(self, x, mask, pack=None):
        a = self.attention_norm(self.attention(x, mask, pack) + x)
        h = ACTIVATIONS[self.config.bert.hidden_act](self.intermediate(a))
        h = constrain(h, ("batch", "length", "act_mlp"))
        return constrain(self.output_norm(self.output(h) + a), ("batch", "length", "act_embed"))


class BertEncoder(nn.Module):
    config: PalmConfig

    def setup(self):
        self.embeddings = BertEmbeddings(self.config)
        self.layers = [BertLayer(self.config, name=f"layer_{i}") for i in range(self.config.bert.num_hidden_layers)]

    def __call__(self, input_ids, attention_mask, pack=None):
        """``pack`` (see :func:`pack_tokens`): run every token-wise part (embeddings, projections, LayerNorms,
        feed-forward) on the kept tokens only, packed as one row [1,T,D]; the attention unpacks them into
        the padded rows [B,S] (dropped tokens as zeros, which it masks). Returns the packed [1,T,D]."""
        mask = attention_mask[:, None, None, :].astype(bool)
        if pack is None:
            x = constrain(self.embeddings(input_ids), ("batch", "length", "act_embed"))
        else:
            pack = tuple(pack) + input_ids.shape
            x = self.embeddings(input_ids.reshape(-1)[pack[0]][None], pack[0] % input_ids.shape[1])
        for layer in self.layers:
            x = layer(x, mask, pack)
        return x


# ----------------------------------------------------------------------------------------------------
# decoder: PreSumm TransformerDecoder (pre-LN)
def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """PreSumm's ``PositionalEncoding.pe`` [num_positions, dim], built in float32 as the original does."""
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / dim)))
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * div_term[None, :]
    pe = np.zeros((num_positions, dim), np.float32)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles)
    return pe


def presumm_attention(q, k, v, *, blocked=None, invalid=None, dtype=jnp.float32, kv_transposed=False):
    """q [B,Q,H,d], k/v [B,K,H,d] (with ``kv_transposed``: k [B,H,d,K], v [B,H,K,d], how decoding keeps the
    source keys and values, so that every step's two matmuls read them as they are, without a per-step
    transpose; the value matmul then writes [B,H,Q,d], transposed after). ``blocked`` (True = masked_fill
    -1e18) and ``invalid`` (True = no key at all: cache slots not written yet) broadcast to [B,H,Q,K].
    Returns (out [B,Q,H,d], probs [B,H,Q,K])."""
    d = q.shape[-1]
    q = q.astype(dtype) / jnp.asarray(math.sqrt(d), dtype)  # divided before the matmul, as the original
    scores = jnp.einsum(f"bqhd,{'bhdk' if kv_transposed else 'bkhd'}->bhqk", q, k.astype(dtype)).astype(jnp.float32)
    if blocked is not None:
        scores = jnp.where(blocked, jnp.float32(MASK_VALUE), scores)
    if invalid is not None:
        scores = jnp.where(invalid, -jnp.inf, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    if kv_transposed:
        out = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v.astype(dtype)), 1, 2)
    else:
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v.astype(dtype))
    return out, probs


def _history(c, ancestry):
    """The cache rows as each current row's history: ``c[ancestry[n, m], h, m]`` for c [N,H,M,d] and
    ancestry [N,M] (the row that wrote position m of row n's history)."""
    N, H, M, _ = c.shape
    return c[ancestry[:, None, :], jnp.arange(H)[None, :, None], jnp.arange(M)[None, None, :]]


def cached_attention(q, k, v, *, is_pad, written, dtype=jnp.float32):
    """The incremental self-attention of one query per row over a head-major cache, as presumm_attention
    computes it: q [N,H,d], k/v [N,H,M,d]; a row whose current token is PAD (``is_pad`` [N]) has every
    score replaced by -1e18, and unwritten slots (``written`` [M] False) get -inf. Returns [N,H,d]."""
    d = q.shape[-1]
    q = q.astype(dtype) / jnp.asarray(math.sqrt(d), dtype)
    scores = jnp.einsum("nhd,nhmd->nhm", q, k.astype(dtype)).astype(jnp.float32)
    scores = jnp.where(is_pad[:, None, None], jnp.float32(MASK_VALUE), scores)
    scores = jnp.where(written, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("nhm,nhmd->nhd", probs.astype(dtype), v.astype(dtype))


class PresummAttention(nn.Module):
    """OpenNMT ``MultiHeadedAttention``: separate query/keys/values projections and ``final_linear``."""

    config: PalmConfig

    def setup(self):
        c = self.config
        D = c.dec_hidden_size
        kw = dict(axes=("embed", "joined_kv"), use_bias=True, **_kw(c))
        self.linear_query = Linear(D, **kw)
        self.linear_keys = Linear(D, **kw)
        self.linear_values = Linear(D, **kw)
        self.final_linear = Linear(D, axes=("joined_kv", "embed"), use_bias=True, **_kw(c))

    def split(self, t):
        H = self.config.dec_heads
        return t.reshape(t.shape[:-1] + (H, self.config.dec_hidden_size // H))

    def project_kv(self, x):
        return self.split(self.linear_keys(x)), self.split(self.linear_values(x))

    def __call__(self, x, kv, *, blocked=None, invalid=None, kernel=None, kv_transposed=False):
        """``kernel`` (attention_impl="pallas"): the masks in factored form for the block-sparse kernel —
        ``key_mask`` [B, K] and ``causal`` as :func:`lmzoo.attention.attend` takes them, and optionally
        ``uniform_rows`` [B, Q] / ``uniform_keys`` [B, K]: rows that attend uniformly over those keys
        (the incremental PAD rule). The original replaces masked scores (-1e18), so masked scores get no
        gradient and a fully masked row attends uniformly over all keys (``replace_masked``). No
        probabilities come back from the kernel (None)."""
        q = constrain(self.split(self.linear_query(x)), ("batch", "length", "act_heads", "kv"))
        if kernel is not None:
            kernel = dict(kernel)
            rows, keys = kernel.pop("uniform_rows", None), kernel.pop("uniform_keys", None)
            k, v = kv
            out = attend(
                q, k, v, impl="pallas", scale=q.shape[-1] ** -0.5, mask_value=F32_MIN, replace_masked=True,
                dtype=self.config.compute_dtype, **kernel,
            )
            if rows is not None:
                w = keys.astype(jnp.float32)
                mean = jnp.einsum("bk,bkhd->bhd", w, v.astype(jnp.float32)) / jnp.sum(w, axis=1)[:, None, None]
                out = jnp.where(rows[:, :, None, None], mean[:, None].astype(out.dtype), out)
            probs = None
        else:
            out, probs = presumm_attention(
                q, *kv, blocked=blocked, invalid=invalid, dtype=self.config.compute_dtype, kv_transposed=kv_transposed
            )
        return self.final_linear(out.reshape(out.shape[:2] + (self.config.dec_hidden_size,))), probs


class PositionwiseFeedForward(nn.Module):
    """``x + w_2(gelu_tanh(w_1(LN(x))))``: the FFN carries its own LayerNorm and residual."""

    config: PalmConfig

    def setup(self):
        c = self.config
        self.layer_norm = LayerNorm(epsilon=1e-6, **_kw(c))
        self.w_1 = Linear(c.dec_ff_size, axes=("embed", "mlp"), use_bias=True, **_kw(c))
        self.w_2 = Linear(c.dec_hidden_size, axes=("mlp", "embed"), use_bias=True, **_kw(c))

    def __call__(self, x):
        h = constrain(ACTIVATIONS["gelu_new"](self.w_1(self.layer_norm(x))), ("batch", "length", "act_mlp"))
        return self.w_2(h) + x


class PresummDecoderLayer(nn.Module):
    config: PalmConfig

    def setup(self):
        c = self.config
        self.self_attn = PresummAttention(c)
        self.context_attn = PresummAttention(c)
        self.feed_forward = PositionwiseFeedForward(c)
        self.layer_norm_1 = LayerNorm(epsilon=1e-6, **_kw(c))
        self.layer_norm_2 = LayerNorm(epsilon=1e-6, **_kw(c))

    def __call__(self, x, memory_kv, ctx_blocked, *, self_kv=None, self_blocked=None, self_invalid=None,
                 self_kernel=None, ctx_kernel=None):
        """``self_kv`` None: self-attention over x itself (teacher forcing); else the cache to use.
        ``self_kernel`` / ``ctx_kernel``: run that attention on the kernel (see PresummAttention)."""
        a = self.layer_norm_1(x)
        kv = self.self_attn.project_kv(a) if self_kv is None else self_kv
        x = self.self_attn(a, kv, blocked=self_blocked, invalid=self_invalid, kernel=self_kernel)[0] + x
        mid, probs = self.context_attn(self.layer_norm_2(x), memory_kv, blocked=ctx_blocked, kernel=ctx_kernel)
        x = self.feed_forward(mid + x)
        return constrain(x, ("batch", "length", "act_embed")), probs


class PresummDecoder(nn.Module):
    config: PalmConfig

    def setup(self):
        c = self.config
        self.embeddings = Embed(c.vocab_size, c.dec_hidden_size, **_kw(c))
        self.layers = [PresummDecoderLayer(c, name=f"layer_{i}") for i in range(c.dec_layers)]
        self.layer_norm = LayerNorm(epsilon=1e-6, **_kw(c))

    def embed(self, ids, positions):
        """``E[y] * sqrt(D) + PE[positions]``; positions is a numpy array (static) or a traced index table."""
        D = self.config.dec_hidden_size
        return self.embeddings(ids) * math.sqrt(D) + positions.astype(self.config.compute_dtype)


class PalmModule(nn.Module):
    """Encoder, decoder and the tied generator. Methods: ``encode``, ``decode``, ``generator``,
    ``memory_kvs``, ``decode_step``, ``__call__``."""

    config: PalmConfig

    def setup(self):
        c = self.config
        self.bert = BertEncoder(c)
        self.decoder = PresummDecoder(c)
        self.generator_bias = self.param(
            "generator_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (c.vocab_size,), c.params_dtype
        )

    def encode(self, input_ids, attention_mask):
        return self.bert(input_ids, attention_mask)

    def generator(self, h):
        """``log_softmax(h E^T + b)`` in float32 (PalmPointerGenerator: no copy mechanism)."""
        logits = self.decoder.embeddings.attend(h).astype(jnp.float32) + self.generator_bias.astype(jnp.float32)
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        return jax.nn.log_softmax(logits, axis=-1)

    def memory_kvs(self, memory):
        return [layer.context_attn.project_kv(memory) for layer in self.decoder.layers]

    def packed_memory_kvs(self, input_ids, attention_mask, gather, scatter):
        """memory_kvs(encode(...)) [B,S,H,d] with the encoder and the projections run on the tokens that
        :func:`pack_tokens` keeps (the dropped positions hold zeros)."""
        memory = self.bert(input_ids, attention_mask, (gather, scatter))
        pack = (gather, scatter) + input_ids.shape
        return [tuple(unpack(t.reshape(t.shape[:2] + (-1,)), pack).reshape(input_ids.shape + t.shape[2:]) for t in kv)
                for kv in self.memory_kvs(memory)]

    def context_blocked(self, src_ids):
        # The context mask comes from the source TOKEN IDS, not from attention_mask.
        return (src_ids == self.config.decoder_padding_idx)[:, None, None, :]

    def decode(self, tgt, memory, src_ids):
        """Teacher-forced decoder over tgt [B,T]: (final-LN hidden [B,T,D], last context attn [B,H,T,S])."""
        T = tgt.shape[1]
        x = self.decoder.embed(tgt, jnp.asarray(sinusoid_table(T, self.config.dec_hidden_size))[None])
        pos = np.arange(T)
        causal = jnp.asarray(pos[None, :] > pos[:, None])
        self_blocked = causal[None, None] | (tgt == self.config.decoder_padding_idx)[:, None, None, :]
        ctx_blocked = self.context_blocked(src_ids)
        probs = None
        pad = self.config.decoder_padding_idx
        kernel = self.config.attention_impl == "pallas"
        n = len(self.decoder.layers)
        for i, (layer, kv) in enumerate(zip(self.decoder.layers, self.memory_kvs(memory))):
            kw = {}
            if kernel:
                # causal OR key == PAD (self), source id == PAD (context); the last layer's context
                # attention stays on XLA: its probabilities are the last_context_attn output
                kw["self_kernel"] = {"causal": True, "key_mask": tgt != pad}
                kw["ctx_kernel"] = {"key_mask": src_ids != pad} if i < n - 1 else None
            x, probs = layer(x, kv, ctx_blocked, self_blocked=self_blocked, **kw)
        return self.decoder.layer_norm(x), probs

    def decode_step(self, tokens, index, pe_row, cache, memory_kvs, ctx_blocked, ancestry=None):
        """One incremental step for rows [B,K]: tokens [B,K] at position ``index``; cache per layer
        (k, v) [B*K,H,M,d], head-major so the step reads it without a transpose; memory_kvs per layer
        k [B,H,d,S], v [B,H,S,d] shared by an item's K beams ([B,S,H,d] with attention_impl="pallas").
        ``ancestry`` [B*K,M] (beam search): the cache is in write order, not reordered by beam; row n
        attends to ``cache[ancestry[n, m], :, m]`` at position m (see :func:`palm_search`).

        The self-attention mask follows the original's incremental rule: only the current token counts.
        """
        c = self.config
        B, K = tokens.shape
        N, D, H = B * K, c.dec_hidden_size, c.dec_heads
        x = self.decoder.embed(tokens, pe_row[None, None])  # [B,K,D]: the K beams play the "query" axis
        M = cache[0][0].shape[2]
        written = jnp.arange(M) <= index  # cache slots written so far, this step's included
        is_pad = (tokens == c.decoder_padding_idx).reshape(N)
        self_kernel = ctx_kernel = None
        if c.attention_impl == "pallas":
            # one query per row: the written slots are a key mask; a row whose current token is PAD attends
            # uniformly over them (the original's -1e18 on every written key), computed beside the kernel
            keys = jnp.broadcast_to(written[None, :], (N, M))
            self_kernel = {"key_mask": keys, "uniform_rows": is_pad[:, None], "uniform_keys": keys}
            ctx_kernel = {"key_mask": ~ctx_blocked[:, 0, 0, :]}
        new_cache = []
        for layer, (kc, vc), mkv in zip(self.decoder.layers, cache, memory_kvs):
            att = layer.self_attn
            a = layer.layer_norm_1(x)
            k, v = att.project_kv(a)  # [B,K,H,d]
            kc = jax.lax.dynamic_update_slice_in_dim(kc, k.reshape(N, H, 1, -1).astype(kc.dtype), index, axis=2)
            vc = jax.lax.dynamic_update_slice_in_dim(vc, v.reshape(N, H, 1, -1).astype(vc.dtype), index, axis=2)
            new_cache.append((kc, vc))
            if ancestry is not None:
                kc, vc = _history(kc, ancestry), _history(vc, ancestry)
            if self_kernel is not None:  # the kernel takes keys [N, M, H, d]
                kv = (jnp.swapaxes(kc, 1, 2), jnp.swapaxes(vc, 1, 2))
                out, _ = att(a.reshape(N, 1, D), kv, kernel=self_kernel)
            else:
                q = att.split(att.linear_query(a)).reshape(N, H, -1)
                out = att.final_linear(cached_attention(q, kc, vc, is_pad=is_pad, written=written, dtype=c.compute_dtype).reshape(N, D))
            x = out.reshape(B, K, D) + x
            mid, _ = layer.context_attn(
                layer.layer_norm_2(x), mkv, blocked=ctx_blocked, kernel=ctx_kernel, kv_transposed=ctx_kernel is None
            )
            x = layer.feed_forward(mid + x)
        h = self.decoder.layer_norm(x)
        return self.generator(h), new_cache

    def __call__(self, input_ids, attention_mask, tgt):
        memory = self.encode(input_ids, attention_mask)
        h, probs = self.decode(tgt, memory, input_ids)
        return h, self.generator(h), memory, probs


# ----------------------------------------------------------------------------------------------------
# outputs
@flax.struct.dataclass
class PalmOutput(ModelOutput):
    """The original's names: ``logits`` is the decoder's final-LN hidden state [B,T-1,D], not vocabulary
    logits; ``log_probs`` = generator(logits) [B,T-1,V]; ``loss`` the raw label-smoothed KL sum."""

    logits: Optional[jax.Array] = None
    loss: Optional[jax.Array] = None
    log_probs: Optional[jax.Array] = None
    encoder_last_hidden_state: Optional[jax.Array] = None
    last_context_attn: Optional[jax.Array] = None


@flax.struct.dataclass
class PalmGenerateOutput(ModelOutput):
    """``sequences`` [B,T] (start token first, padded) and the winners' length-normalised scores [B]."""

    sequences: Optional[np.ndarray] = None
    sequences_scores: Optional[np.ndarray] = None


def label_smoothed_kl_sum(log_probs, target, *, smoothing: float, pad: int):
    """``NMTLossCompute``: KL(q || p) summed (not normalised). q = 1-eps on gold, eps/(V-2) elsewhere, 0 on
    PAD; PAD targets contribute nothing. Without smoothing: the summed NLL of non-PAD targets."""
    logp = log_probs.astype(jnp.float32)
    V = logp.shape[-1]
    gold = jax.nn.one_hot(target, V, dtype=bool)
    keep = (target != pad)[..., None]
    if smoothing <= 0:
        return -jnp.sum(jnp.where(gold & keep, logp, 0.0))
    conf = jnp.float32(1.0 - smoothing)
    fill = jnp.float32(smoothing / (V - 2))
    q = jnp.where(gold, conf, jnp.where(jnp.arange(V) == pad, jnp.float32(0.0), fill))
    q = jnp.where(keep, q, jnp.float32(0.0))
    # xlogy(q, q) - q * logp, with 0 where q == 0 (torch's kl_div)
    terms = jnp.where(q > 0, q * (jnp.log(jnp.where(q > 0, q, 1.0)) - logp), 0.0)
    return jnp.sum(terms)


# ----------------------------------------------------------------------------------------------------
# search
def _length_penalties(max_length: int, alpha: float) -> np.ndarray:
    """GNMT ``((5 + step + 1) / 6) ** alpha`` per step, computed in double (Python) and rounded to float32."""
    return np.asarray([((5.0 + (step + 1)) / 6.0) ** alpha for step in range(max_length)], np.float32)


def _ngram_bans(seqs, length, n: int, vocab_size: int):
    """[R,V] True where a token would repeat an n-gram of its row. seqs [R,T] hold ``length`` tokens
    (the start token included), the rest are padding."""
    R, T = seqs.shape
    if T < n:
        return jnp.zeros((R, vocab_size), bool)
    P = T - n + 1  # candidate n-gram starts
    starts = jnp.arange(P)
    prefix = jax.lax.dynamic_slice_in_dim(seqs, jnp.maximum(length - (n - 1), 0), n - 1, axis=1)  # [R,n-1]
    match = starts[None, :] <= length - n  # the whole n-gram lies inside the sequence
    for o in range(n - 1):
        match = match & (seqs[:, o : o + P] == prefix[:, o : o + 1])
    banned = seqs[:, n - 1 : n - 1 + P]  # the token completing each candidate n-gram
    rows = jnp.broadcast_to(jnp.arange(R)[:, None], banned.shape)
    hits = jnp.zeros((R, vocab_size), jnp.int32).at[rows, banned].add(match.astype(jnp.int32))
    return hits > 0


def _filter_top_k_top_p(logits, top_k: int, top_p: float):
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove = cum > top_p
        remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)  # keep the first above
        unsorted = jnp.zeros_like(remove).at[jnp.arange(remove.shape[0])[:, None], order].set(remove)
        logits = jnp.where(unsorted, -jnp.inf, logits)
    return logits


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    num_beams: int
    cache_len: int  # decoder positions cached: max_length rounded up to a bucket
    alpha: float
    ngram: int
    do_sample: bool
    top_k: int
    top_p: float
    temperature: float


def palm_encode(module: PalmModule, params, input_ids, attention_mask, gather, scatter):
    """The source keys / values of every decoder layer from the packed encoder (:func:`pack_tokens`), in
    the layout the search reads: k [B,H,d,S], v [B,H,S,d] ([B,S,H,d] with attention_impl="pallas")."""
    memory_kvs = module.apply({"params": params}, input_ids, attention_mask, gather, scatter, method=PalmModule.packed_memory_kvs)
    if module.config.attention_impl != "pallas":  # as every step's matmuls read them, no per-step transpose
        memory_kvs = [(jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))) for k, v in memory_kvs]
    return memory_kvs


def palm_search(module: PalmModule, settings: SearchSettings, params, memory_kvs, input_ids, min_length, max_length, start, eos, rng):
    """PALM's beam search as one while_loop of at most ``max_length`` (<= cache_len) steps over the
    source keys / values of :func:`palm_encode`. Returns (seqs [B, cache_len+1] start first; lengths [B]
    after the start token; scores [B]); the caller cuts the rows and fills what follows each length with
    the pad id."""
    c = module.config
    K, M, V = settings.num_beams, settings.cache_len, c.vocab_size
    B = input_ids.shape[0]
    H, dh = c.dec_heads, c.dec_hidden_size // c.dec_heads
    v = {"params": params}
    ctx_blocked = (input_ids == c.decoder_padding_idx)[:, None, None, :]
    pe = jnp.asarray(sinusoid_table(M, c.dec_hidden_size))
    lps = jnp.asarray(_length_penalties(M, settings.alpha))
    z = jnp.zeros((B * K, H, M, dh), c.compute_dtype)
    cache = [(z, z) for _ in range(c.dec_layers)]
    pad = c.decoder_padding_idx
    seqs = jnp.full((B, K, M + 1), pad, jnp.int32).at[:, :, 0].set(start)
    cum = jnp.tile(jnp.asarray([0.0] + [-np.inf] * (K - 1), jnp.float32), (B, 1))
    state = dict(
        step=jnp.int32(0),
        cache=cache,
        seqs=seqs,
        cum=cum,
        done=jnp.zeros((B,), bool),
        best_score=jnp.full((B,), -jnp.inf, jnp.float32),
        best_seq=jnp.full((B, M + 1), pad, jnp.int32),
        best_len=jnp.zeros((B,), jnp.int32),
        has_best=jnp.zeros((B,), bool),
        rng=rng,
    )
    if K > 1:
        # The cache is never reordered: row n writes its step-t key / value at [n, :, t], and ancestry[n, t']
        # names the row that wrote position t' of row n's current history; each layer gathers that history
        # just before it attends. Reordering the whole cache after every step instead costs a cache-sized
        # gather plus a copy back into the loop carry per layer (a gather cannot write in place).
        state["ancestry"] = jnp.zeros((B * K, M), jnp.int32)

    def cond(s):
        return (s["step"] < max_length) & ~jnp.all(s["done"])

    def body(s):
        step = s["step"]
        tokens = s["seqs"][:, :, step]
        anc = s["ancestry"].at[:, step].set(jnp.arange(B * K)) if K > 1 else None  # this step: the row itself
        logp, cache = module.apply(
            v, tokens, step, pe[step], s["cache"], memory_kvs, ctx_blocked, anc, method=PalmModule.decode_step
        )  # [B,K,V] float32
        logp = jnp.where((jnp.arange(V) == eos) & (step < min_length), jnp.float32(EOS_BAN), logp)
        if settings.ngram > 0:
            bans = _ngram_bans(s["seqs"].reshape(B * K, M + 1), step + 1, settings.ngram, V).reshape(B, K, V)
            logp = jnp.where(bans, -jnp.inf, logp)
        lp = lps[step]
        rng = s["rng"]
        if settings.do_sample:  # num_beams == 1 (checked by the caller)
            rng, key = jax.random.split(rng)
            filt = _filter_top_k_top_p((logp / jnp.float32(settings.temperature)).reshape(B * K, V), settings.top_k, settings.top_p)
            tok = jax.random.categorical(key, filt, axis=-1).reshape(B, K)
            rescored = (jax.nn.log_softmax(filt, axis=-1).reshape(B, K, V) + s["cum"][..., None]) / lp
            top = jnp.take_along_axis(rescored, tok[..., None], axis=-1)[..., 0]
            origin = jnp.broadcast_to(jnp.arange(K), (B, K))
        else:
            scores = ((logp + s["cum"][..., None]) / lp).reshape(B, K * V)
            top, ids = jax.lax.top_k(scores, K)
            origin, tok = ids // V, ids % V
        cum = top * lp  # divide-then-multiply, as the original (not an identity in float)
        take = lambda a: jnp.take_along_axis(a, origin.reshape(origin.shape + (1,) * (a.ndim - 2)), axis=1)
        seqs = take(s["seqs"]).at[:, :, step + 1].set(tok)
        rows = (jnp.arange(B)[:, None] * K + origin).reshape(B * K)  # the beam each new row continues
        extra = {"ancestry": anc[rows]} if K > 1 else {}  # one beam: every row continues itself

        last = step + 1 == max_length
        finished = (tok == eos) | last
        end = finished[:, 0]  # an item ends when its top beam finishes
        finished = finished | end[:, None]
        # Hypotheses arrive in step order, then beam order; a strictly better one replaces the best, so
        # on a tie the earliest stays (the original's stable sort).
        cand = jnp.where(finished, top, -jnp.inf)
        j = jnp.argmax(cand, axis=1)
        # only -inf among the finished: the first finished one is the first appended
        j = jnp.where(jnp.max(cand, axis=1) == -jnp.inf, jnp.argmax(finished, axis=1), j)
        any_fin = jnp.any(finished, axis=1)
        score_j = jnp.take_along_axis(top, j[:, None], axis=1)[:, 0]
        better = any_fin & ~s["done"] & (~s["has_best"] | (score_j > s["best_score"]))
        seq_j = jnp.take_along_axis(seqs, j[:, None, None], axis=1)[:, 0]
        return dict(
            step=step + 1,
            cache=cache,
            seqs=seqs,
            cum=cum,
            done=s["done"] | end,
            best_score=jnp.where(better, score_j, s["best_score"]),
            best_seq=jnp.where(better[:, None], seq_j, s["best_seq"]),
            best_len=jnp.where(better, step + 1, s["best_len"]),
            has_best=s["has_best"] | better,
            rng=rng,
            **extra,
        )

    out = jax.lax.while_loop(cond, body, state)
    return out["best_seq"], out["best_len"], out["best_score"]


# ----------------------------------------------------------------------------------------------------
class PalmForTextGeneration(PretrainedModel):
    """PALM 2.0 with the original forward signature ``(input_ids, attention_mask, labels)`` and outputs."""

    family = "palm"
    config_class = PalmConfig
    architecture = ""

    @classmethod
    def make_module(cls, config):
        return PalmModule(config)

    @classmethod
    def key_map(cls, config):
        from lmzoo.convert.palm import palm_key_map

        return palm_key_map(config)

    @classmethod
    def config_from_folder(cls, folder, hf, **runtime):
        return load_palm_config(folder, hf, **runtime)

    @classmethod
    def from_state_dict(cls, config, state_dict, **kwargs):
        from lmzoo.convert.palm import normalize_palm_key

        return super().from_state_dict(config, _RenamedStateDict(state_dict, normalize_palm_key), **kwargs)

    def extra_files(self):
        return dict(self.config.files)

    def export_config(self):
        hf = self.config.to_hf_config()
        if "bert/config.json" in self.config.files:
            hf["encoder_pth"] = "bert"  # extra_files writes the encoder folder under this name
        return hf

    def dummy_inputs(self):
        ids = jnp.ones((1, 4), jnp.int32)
        return {"input_ids": ids, "attention_mask": ids, "tgt": ids[:, :3]}

    def forward(self, params, input_ids=None, attention_mask=None, labels=None):
        c = self.config
        if input_ids is None:
            raise ValueError("PALM's forward needs input_ids")
        if labels is None:
            raise ValueError("PALM's forward needs labels: the decoder reads labels[:, :-1] and predicts labels[:, 1:]")
        if labels.shape[1] < 2:
            raise ValueError(f"labels must hold at least 2 tokens (start + 1 target), got shape {labels.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)  # transformers' BertModel default
        h, log_probs, memory, probs = self.module.apply({"params": params}, input_ids, attention_mask, labels[:, :-1])
        loss = label_smoothed_kl_sum(log_probs, labels[:, 1:], smoothing=c.label_smoothing, pad=c.pad_token_id)
        return PalmOutput(
            logits=h.astype(jnp.float32),
            loss=loss,
            log_probs=log_probs,
            encoder_last_hidden_state=memory.astype(jnp.float32),
            last_context_attn=probs,
        )

    # -- generation -------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, *, return_dict_in_generate=False, **kwargs):
        """PALM's beam search with the shared kwargs, PALM meanings kept:

        * ``num_beams`` = beam_size (default config.beam_size); 1 is greedy decoding through the same code.
        * ``length_penalty`` = alpha of the GNMT penalty ``((5 + step + 1)/6)**alpha`` (default config.alpha).
        * ``min_length`` / ``max_length`` = the original's values (default config's): they count generated
          tokens AFTER the start token. ``min_new_tokens`` / ``max_new_tokens`` mean the same and may be used
          instead.
        * ``early_stopping``: PALM always ends an item when its top beam emits EOS (True / None; False is refused).
        * ``no_repeat_ngram_size`` n > 0: a token that would repeat an n-gram of its beam (start token
          included) gets -inf BEFORE the top-k. This is a working version of the original's broken
          ``block_trigram`` (which ran after the top-k), not a copy of it.
        * ``do_sample`` (num_beams 1): sample from ``log_softmax / temperature`` filtered by top_k / top_p;
          reproducible from ``seed``.
        * ``decoder_start_token_id`` (default [CLS]), ``eos_token_id`` (default [SEP]), ``pad_token_id``
          (fills the rows after their end; default [PAD]). The decoder's own PAD masks use the model's
          padding id, whatever pad_token_id is.

        Returns ids [B, 1 + longest] HF-style (start token first, padded with pad_token_id), or with
        ``return_dict_in_generate=True`` a :class:`PalmGenerateOutput` that also holds the winners'
        length-normalised scores (the original's ``scores``).
        """
        c = self.config
        settings, start, eos, pad_out, min_length, max_length, seed = self._generation_settings(kwargs)
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integer ids [batch, length], got {ids.dtype} of shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
            raise ValueError(f"input_ids hold ids outside [0, {c.vocab_size}): min {ids.min()}, max {ids.max()}")
        mask = (ids != c.pad_token_id) if attention_mask is None else np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        # Right-pad the source to a bucket: PAD ids with mask 0 change nothing (the encoder masks them by
        # attention_mask, the decoder by token id), and nearby lengths share one compiled program.
        S = ids.shape[1]
        S_pad = min(-(-S // SOURCE_BUCKET) * SOURCE_BUCKET, max(S, c.bert.max_position_embeddings))
        if S_pad > S:
            ids = np.pad(ids, ((0, 0), (0, S_pad - S)), constant_values=c.decoder_padding_idx)
            mask = np.pad(mask, ((0, 0), (0, S_pad - S)), constant_values=0)
        fn = self._decode_cache.get(settings)
        if fn is None:
            fn = jax.jit(partial(palm_search, self.module, settings))
            self._decode_cache[settings] = fn
        encode = self._jit_cache.get("palm_encode")
        if encode is None:
            encode = self._jit_cache["palm_encode"] = jax.jit(partial(palm_encode, self.module))
        # The encoder runs on the tokens that matter only (one program per packed-length bucket).
        gather, scatter = pack_tokens(ids, mask, c.decoder_padding_idx)
        ids_j = jnp.asarray(ids, jnp.int32)
        memory_kvs = encode(self.params, ids_j, jnp.asarray(mask, jnp.int32), jnp.asarray(gather), jnp.asarray(scatter))
        seqs, lengths, scores = fn(
            self.params,
            memory_kvs,
            ids_j,
            jnp.int32(min_length),
            jnp.int32(max_length),
            jnp.int32(start),
            jnp.int32(eos),
            jax.random.PRNGKey(seed),
        )
        seqs, lengths, scores = np.asarray(seqs), np.asarray(lengths), np.asarray(scores)
        width = 1 + int(lengths.max(initial=0))
        out = seqs[:, :width].astype(np.int64)
        out[np.arange(width)[None, :] > lengths[:, None]] = pad_out
        if return_dict_in_generate:
            return PalmGenerateOutput(sequences=out, sequences_scores=scores)
        return out

    _IGNORED_WHEN_DEFAULT = {
        "repetition_penalty": (None, 1.0),
        "num_return_sequences": (None, 1),
        "bad_words_ids": (None,),
        "forced_bos_token_id": (None,),
        "forced_eos_token_id": (None,),
        "use_cache": (None, True),
    }

    def _generation_settings(self, kwargs):
        c = self.config
        d = c.generation_defaults()
        known = {
            "num_beams", "length_penalty", "min_length", "max_length", "min_new_tokens", "max_new_tokens",
            "early_stopping", "no_repeat_ngram_size", "do_sample", "top_k", "top_p", "temperature", "seed",
            "decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
        } | set(self._IGNORED_WHEN_DEFAULT)  # fmt: skip
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"PALM generate() got unknown keyword arguments {unknown}")
        for k, ok in self._IGNORED_WHEN_DEFAULT.items():
            if k in kwargs and kwargs[k] not in ok:
                raise ValueError(f"PALM generate() does not support {k}={kwargs[k]!r}")
        get = lambda k: kwargs[k] if k in kwargs else d.get(k)

        def length(name, new_name, off):
            a, b = kwargs.get(name), kwargs.get(new_name)
            if a is not None and b is not None and a != b:
                raise ValueError(f"PALM counts {name} without the start token, so {name}={a} and {new_name}={b} conflict")
            if b is not None or a is not None:
                return int(b if b is not None else a)
            if name in kwargs or new_name in kwargs:  # an explicit None
                return off if off is not None else int(d[name])
            return int(d[name])

        # an explicit None turns the EOS ban off; max_length has no "off", None keeps the config's
        max_length, min_length = length("max_length", "max_new_tokens", None), length("min_length", "min_new_tokens", 0)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (tokens generated after the start token), got {max_length}")
        num_beams = int(get("num_beams") or 1)
        if num_beams < 1 or num_beams > c.vocab_size:
            raise ValueError(f"num_beams must be in [1, {c.vocab_size}], got {num_beams}")
        if get("early_stopping") is False:
            raise ValueError("PALM's search always ends an item when its top beam emits EOS; early_stopping=False is not a PALM mode")
        alpha = get("length_penalty")
        alpha = 0.0 if alpha is None else float(alpha)
        ngram = int(get("no_repeat_ngram_size") or 0)
        do_sample = bool(get("do_sample"))
        if do_sample and num_beams != 1:
            raise ValueError("PALM samples with num_beams=1 only (its sample_topk beams all continue beam 0)")
        eos = get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"PALM has one end token; got eos_token_id={eos}")
            eos = eos[0]
        start = get("decoder_start_token_id")
        start = c.bos_token_id if start is None else start
        eos = c.eos_token_id if eos is None else eos
        pad_out = get("pad_token_id")
        pad_out = c.pad_token_id if pad_out is None else pad_out
        for name, tok in (("decoder_start_token_id", start), ("eos_token_id", eos)):
            if not 0 <= int(tok) < c.vocab_size:
                raise ValueError(f"{name}={tok} is outside the vocabulary [0, {c.vocab_size})")
        temperature = float(get("temperature") or 1.0)
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        settings = SearchSettings(
            num_beams=num_beams,
            cache_len=-(-max_length // DECODE_BUCKET) * DECODE_BUCKET,
            alpha=alpha,
            ngram=ngram,
            do_sample=do_sample,
            top_k=int(get("top_k") or 0) if do_sample else 0,
            top_p=float(get("top_p") if get("top_p") is not None else 1.0) if do_sample else 1.0,
            temperature=temperature if do_sample else 1.0,
        )
        seed = int(kwargs.get("seed") or 0)
        return settings, int(start), int(eos), int(pad_out), min_length, max_length, seed


class _RenamedStateDict(Mapping):
    """A lazy view of a state dict under normalised key names."""

    def __init__(self, sd, rename):
        self._sd = sd
        self._names = {}
        for k in sd:
            new = rename(k)
            if new in self._names:
                raise ConfigError(f"checkpoint keys {self._names[new]!r} and {k!r} both name {new!r}")
            self._names[new] = k
        self.source = getattr(sd, "source", "checkpoint")

    def __getitem__(self, k):
        return self._sd[self._names[k]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


class PalmTokenizer:
    """The PALM pipeline's text side: BertTokenizer on the encoder folder's vocab.txt (lower-cased), inputs
    ``[CLS] text [SEP]`` truncated to the preprocessor's ``sequence_length`` and padded, no token types;
    ``decode`` removes the spaces between Chinese characters, as the ModelScope pipeline does."""

    def __init__(self, tokenizer, sequence_length: int = 128):
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length

    def __call__(self, text, **kwargs):
        kwargs.setdefault("padding", True)
        kwargs.setdefault("truncation", True)
        kwargs.setdefault("max_length", self.sequence_length)
        kwargs.setdefault("return_token_type_ids", False)
        kwargs.setdefault("return_tensors", "np")
        return self.tokenizer(text, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        from .bert_tokenizer import join_cjk

        return join_cjk(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def load_tokenizer(folder: str) -> PalmTokenizer:
    """The tokenizer of a PALM folder (``<encoder_pth>/vocab.txt``; sequence_length from configuration.json)."""
    from .bert_tokenizer import BertTokenizer

    hf = read_json(os.path.join(folder, "config.json"))
    enc_dir = os.path.join(folder, str(hf.get("encoder_pth", PalmConfig.encoder_pth)))
    seq_len = 128
    task = os.path.join(folder, "configuration.json")
    if os.path.exists(task):
        seq_len = int((read_json(task).get("preprocessor") or {}).get("sequence_length", seq_len))
    return PalmTokenizer(BertTokenizer.from_pretrained(enc_dir, do_lower_case=True), seq_len)


def model_class(hf_config) -> type[PretrainedModel]:
    return PalmForTextGeneration

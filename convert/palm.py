"""Key map of ModelScope's ``PalmForTextGeneration`` (PALM 2.0) <-> lmzoo.palm params.

Canonical keys are the original ``state_dict()`` names (``palm.*``), so an export loads back into the
original. The generator weight is the decoder embedding (one tensor under three names); the buffers the
original computes itself (causal masks, the sinusoid table), the label-smoothing buffer and the unused
BERT pooler are dropped. Wrapping and prefixes (``model.`` / ``palm.``) are normalised before the map is
applied, as the original's ``_unwrap_checkpoint`` does: see :func:`normalize_palm_key`.
"""

from __future__ import annotations

from .keymap import KeyMap, linear, plain

__all__ = ["palm_key_map", "normalize_palm_key"]

# Keys the original model either recomputes or never reads (it loads with strict=False).
IGNORED = (
    r"palm\.decoder\.transformer_layers\.\d+\.mask",  # [1,5000,5000] causal-mask buffers
    r"palm\.decoder\.pos_emb\.pe",  # sinusoid buffer, recomputed in float32
    r"palm\.bert\.pooler\..*",  # BertModel's pooler: present, unused
    r"palm\.bert\.embeddings\.position_ids",  # buffer some transformers versions save
    r"palm\.bert\.embeddings\.token_type_ids",
    r"loss\.criterion\..*",  # label-smoothing one-hot buffer
)


def normalize_palm_key(key: str) -> str:
    """The original's unwrapping: strip a leading ``model.``, then ``palm.``; model keys get ``palm.`` back.

    ``loss.*`` keys belong to the loss module (a duplicate of the generator) and keep their name.
    """
    for prefix in ("model.", "palm."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key if key.startswith("loss.") else "palm." + key


def palm_key_map(config) -> KeyMap:
    p = {}
    e = "palm.bert.embeddings"
    p[f"{e}.word_embeddings.weight"] = plain("bert", "embeddings", "word_embeddings", "embedding")
    p[f"{e}.position_embeddings.weight"] = plain("bert", "embeddings", "position_embeddings", "embedding")
    p[f"{e}.token_type_embeddings.weight"] = plain("bert", "embeddings", "token_type_embeddings", "embedding")
    p[f"{e}.LayerNorm.weight"] = plain("bert", "embeddings", "LayerNorm", "scale")
    p[f"{e}.LayerNorm.bias"] = plain("bert", "embeddings", "LayerNorm", "bias")
    for i in range(config.bert.num_hidden_layers):
        b, blk = f"palm.bert.encoder.layer.{i}", ("bert", f"layer_{i}")
        for w in ("query", "key", "value"):
            p[f"{b}.attention.self.{w}.weight"] = linear(*blk, "attention", w, "kernel")
            p[f"{b}.attention.self.{w}.bias"] = plain(*blk, "attention", w, "bias")
        p[f"{b}.attention.output.dense.weight"] = linear(*blk, "attention", "output", "kernel")
        p[f"{b}.attention.output.dense.bias"] = plain(*blk, "attention", "output", "bias")
        p[f"{b}.attention.output.LayerNorm.weight"] = plain(*blk, "attention_norm", "scale")
        p[f"{b}.attention.output.LayerNorm.bias"] = plain(*blk, "attention_norm", "bias")
        p[f"{b}.intermediate.dense.weight"] = linear(*blk, "intermediate", "kernel")
        p[f"{b}.intermediate.dense.bias"] = plain(*blk, "intermediate", "bias")
        p[f"{b}.output.dense.weight"] = linear(*blk, "output", "kernel")
        p[f"{b}.output.dense.bias"] = plain(*blk, "output", "bias")
        p[f"{b}.output.LayerNorm.weight"] = plain(*blk, "output_norm", "scale")
        p[f"{b}.output.LayerNorm.bias"] = plain(*blk, "output_norm", "bias")

    p["palm.decoder.embeddings.weight"] = plain("decoder", "embeddings", "embedding")
    for i in range(config.dec_layers):
        b, blk = f"palm.decoder.transformer_layers.{i}", ("decoder", f"layer_{i}")
        for attn in ("self_attn", "context_attn"):
            for w in ("linear_query", "linear_keys", "linear_values", "final_linear"):
                p[f"{b}.{attn}.{w}.weight"] = linear(*blk, attn, w, "kernel")
                p[f"{b}.{attn}.{w}.bias"] = plain(*blk, attn, w, "bias")
        for w in ("w_1", "w_2"):
            p[f"{b}.feed_forward.{w}.weight"] = linear(*blk, "feed_forward", w, "kernel")
            p[f"{b}.feed_forward.{w}.bias"] = plain(*blk, "feed_forward", w, "bias")
        for ln in ("feed_forward.layer_norm", "layer_norm_1", "layer_norm_2"):
            path = tuple(ln.split("."))
            p[f"{b}.{ln}.weight"] = plain(*blk, *path, "scale")
            p[f"{b}.{ln}.bias"] = plain(*blk, *path, "bias")
    p["palm.decoder.layer_norm.weight"] = plain("decoder", "layer_norm", "scale")
    p["palm.decoder.layer_norm.bias"] = plain("decoder", "layer_norm", "bias")
    p["palm.generator.dense.bias"] = plain("generator_bias")

    # generator.dense.weight IS decoder.embeddings.weight; the loss module holds the generator again.
    aliases = {
        "palm.generator.dense.weight": "palm.decoder.embeddings.weight",
        "loss.generator.dense.weight": "palm.decoder.embeddings.weight",
        "loss.generator.dense.bias": "palm.generator.dense.bias",
    }
    return KeyMap(params=p, aliases=aliases, ignore=IGNORED, family="palm")

"""Key map of transformers' ``T5ForConditionalGeneration`` (LongLM) <-> lmzoo.t5 params."""

from __future__ import annotations

from .keymap import KeyMap, linear, plain

__all__ = ["t5_key_map"]


def t5_key_map(config) -> KeyMap:
    p = {"shared.weight": plain("shared", "embedding")}
    aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if config.tie_word_embeddings:
        aliases["lm_head.weight"] = "shared.weight"
    else:
        p["lm_head.weight"] = linear("lm_head", "kernel")
    ffn = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    for stack, n in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        p[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = plain(stack, "relative_attention_bias")
        p[f"{stack}.final_layer_norm.weight"] = plain(stack, "final_layer_norm", "scale")
        for i in range(n):
            b = f"{stack}.block.{i}.layer"
            blk = (stack, f"block_{i}")
            for w in "qkvo":
                p[f"{b}.0.SelfAttention.{w}.weight"] = linear(*blk, "self_attn", w, "kernel")
            p[f"{b}.0.layer_norm.weight"] = plain(*blk, "self_attn_norm", "scale")
            ff = 1
            if stack == "decoder":
                for w in "qkvo":
                    p[f"{b}.1.EncDecAttention.{w}.weight"] = linear(*blk, "cross_attn", w, "kernel")
                p[f"{b}.1.layer_norm.weight"] = plain(*blk, "cross_attn_norm", "scale")
                ff = 2
            for w in ffn:
                p[f"{b}.{ff}.DenseReluDense.{w}.weight"] = linear(*blk, "mlp", w, "kernel")
            p[f"{b}.{ff}.layer_norm.weight"] = plain(*blk, "mlp_norm", "scale")
    return KeyMap(
        params=p,
        aliases=aliases,
        # transformers ignores the legacy cross-attention bias table of old checkpoints.
        ignore=(r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",),
        family="t5",
    )

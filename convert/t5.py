"""Key map of transformers' ``T5ForConditionalGeneration`` (LongLM) <-> lmzoo.t5 params, and the T5 -> LSG-T5
conversion (``lmzoo convert --to-lsg``)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .keymap import KeyMap, linear, plain

__all__ = ["t5_key_map", "t5_to_lsg"]


def t5_key_map(config) -> KeyMap:
    p = {"shared.weight": plain("shared", "embedding")}
    aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if config.tie_word_embeddings:
        aliases["lm_head.weight"] = "shared.weight"
    else:
        p["lm_head.weight"] = linear("lm_head", "kernel")
    ffn = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    if config.is_lsg:
        p["encoder.global_embeddings.weight"] = plain("encoder", "global_embeddings", "embedding")
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


def t5_to_lsg(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    max_length: int = 4096,
    block_size: int = 128,
    *,
    sparse_block_size: int = 128,
    sparsity_factor: int = 2,
    sparsity_type: Optional[str] = "norm",
    num_global_tokens: int = 1,
    adaptive: bool = True,
    mask_first_token: bool = False,
    pass_global_tokens_to_decoder: bool = True,
    pool_with_global: bool = True,
    lsh_num_pre_rounds: int = 1,
    random_global_init: bool = False,
    keep_first_global_token: bool = False,
    resize_lsg: bool = False,
    mask_token_id: Optional[int] = None,
    seed: int = 123,
    format: str = "pytorch",
    progress=None,
) -> str:
    """Convert a T5 / LongLM checkpoint folder into an LSG-T5 folder.

    T5 has no absolute positions, so nothing is extended (``max_length`` only sets the tokenizer's
    ``model_max_length``) and the relative bias needs nothing. The 512 global rows have no position part:
    global 0 is the embedding of ``</s>`` (eos, the token every T5 input ends with, the nearest thing T5
    has to a sequence marker), the others the embedding of ``mask_token_id`` (e.g. LongLM's
    ``<extra_id_0>`` sentinel, T5's mask), by default eos as well; ``random_global_init`` draws them from
    a Gaussian fitted to the token embeddings (row 0 eos). The globals still differ from each other
    through the relative bias (they sit at positions -G..-1). config.json gets the LSG keys.
    """
    from lmzoo.configuration import read_json
    from lmzoo.lsg_attention import LSG_CONFIG_KEYS
    from lmzoo.modeling import detect_family
    from lmzoo.t5 import LSGT5ForConditionalGeneration

    from .keymap import ConversionError
    from .lsg import convert_planned_to_lsg, global_embeddings, lsg_config_keys

    src_dir, dst_dir = os.fspath(src_dir), os.path.abspath(os.fspath(dst_dir))
    if max_length <= 0 or block_size <= 0:
        raise ValueError(f"max_length and block_size must be positive, got {max_length} and {block_size}")
    hf = read_json(os.path.join(src_dir, "config.json"))
    if detect_family(hf, src_dir) != "t5":
        raise ConversionError(f"{src_dir}: not a T5 / LongLM checkpoint")
    new_hf = dict(hf)
    new_hf.update(lsg_config_keys(block_size=block_size, sparse_block_size=sparse_block_size,
                                  sparsity_factor=sparsity_factor, sparsity_type=sparsity_type,
                                  num_global_tokens=num_global_tokens, adaptive=adaptive,
                                  mask_first_token=mask_first_token, pool_with_global=pool_with_global,
                                  lsh_num_pre_rounds=lsh_num_pre_rounds))
    new_hf["pass_global_tokens_to_decoder"] = pass_global_tokens_to_decoder
    config = LSGT5ForConditionalGeneration.config_from_folder(src_dir, new_hf)  # validates the LSG keys
    new_hf.update({k: getattr(config, k) for k in LSG_CONFIG_KEYS})  # as validated (e.g. clipped)
    eos = int(config.eos_token_id)
    mask = eos if mask_token_id is None else int(mask_token_id)
    if not 0 <= mask < config.vocab_size:
        raise ValueError(f"mask_token_id={mask} is outside the vocabulary of {config.vocab_size}")

    def make_globals(read):
        return global_embeddings(read("shared.weight"), None, bos_id=eos, mask_id=mask, random_init=random_global_init,
                                 rng=np.random.default_rng(seed))

    return convert_planned_to_lsg(
        src_dir, dst_dir, new_hf, global_key="encoder.global_embeddings.weight", make_globals=make_globals,
        max_length=int(max_length), resize_lsg=resize_lsg, keep_first_global_token=keep_first_global_token,
        format=format, progress=progress,
    )

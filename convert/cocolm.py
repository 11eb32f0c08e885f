"""COCO-LM key maps: the HF checkpoints (bare or ``cocolm.``-prefixed, fp16 on the hub) and fairseq ones.

The key map (``CocoLMKeyMap``) matches every checkpoint key after renaming it onto the HF names: the
``cocolm.`` prefix is added or stripped to match the class the config describes (COCOLMModel saves bare
keys, the head classes prefixed ones), and fairseq names (``encoder.sentence_encoder.*``, ``auxiliary.*``,
``classification_heads.*``) are translated. Keys the model does not use are dropped and listed, as the
real hub files carry tensors COCOLMModel never reads. The pretraining heads have no HF wiring class;
their names here (``binary_head.out_proj``, ``clm_head.{bias,decoder}``, ``generator.*``) are ours.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from .keymap import ConversionError, KeyMap, Param, linear, plain
from .torch_pickle import CheckpointError, UnsafePickleError, flatten_state_dict, read_torch_zip

__all__ = [
    "hf_key_map",
    "CocoLMKeyMap",
    "check_classification_heads",
    "config_fields_from_state_dict",
    "check_dropped",
    "fairseq_key",
    "fairseq_hf_config",
    "load_fairseq",
    "convert_fairseq",
    "cocolm_to_lsg",
]

PREFIX = "cocolm."
_ENCODER_ROOTS = ("embeddings.", "encoder.", "relative_attention_bias.", "scl_head.")


# ----------------------------------------------------------------------------------------------------
# HF names <-> params
def _qkv(H: int, A: int) -> tuple[Param, Param]:
    d = H // A

    def w_to_flax(w):  # torch [3H, H] (rows q | k | v) -> kernel [H, 3, A, d]
        return np.ascontiguousarray(w.T).reshape(H, 3, A, d)

    def w_to_torch(k):
        return np.ascontiguousarray(k.reshape(H, 3 * H).T)

    return (lambda *path: Param(tuple(path), w_to_flax, w_to_torch)), (
        lambda *path: Param(tuple(path), lambda b: b.reshape(3, A, d), lambda b: b.reshape(3 * H))
    )


def _out(H: int, A: int):
    d = H // A

    def w_to_flax(w):  # torch [H_out, H_in] -> kernel [A, d, H_out]
        return np.ascontiguousarray(w.T).reshape(A, d, H)

    def w_to_torch(k):
        return np.ascontiguousarray(k.reshape(H, H).T)

    return lambda *path: Param(tuple(path), w_to_flax, w_to_torch)


def _layers(p: dict, src: str, dst: tuple[str, ...], n: int, config) -> None:
    """HF names of a stack of COCOLMLayer under ``src`` (e.g. ``encoder.layer``) -> params under ``dst``."""
    H, A = config.hidden_size, config.num_attention_heads
    qkv_w, qkv_b = _qkv(H, A)
    out_w = _out(H, A)
    for i in range(n):
        s, t = f"{src}.{i}", dst + (f"layer_{i}",)
        p[f"{s}.attention.self_attn.in_proj.weight"] = qkv_w(*t, "self_attn", "in_proj", "kernel")
        p[f"{s}.attention.self_attn.in_proj.bias"] = qkv_b(*t, "self_attn", "in_proj", "bias")
        p[f"{s}.attention.self_attn.out_proj.weight"] = out_w(*t, "self_attn", "out_proj", "kernel")
        p[f"{s}.attention.self_attn.out_proj.bias"] = plain(*t, "self_attn", "out_proj", "bias")
        _norm(p, f"{s}.attention.LayerNorm", t + ("attention_LayerNorm",))
        _dense(p, f"{s}.intermediate.dense", t + ("intermediate",))
        _dense(p, f"{s}.output.dense", t + ("output",))
        if config.layer_norm_type in ("post", "hybrid"):
            _norm(p, f"{s}.output.LayerNorm", t + ("output_LayerNorm",))
        if config.layer_norm_type in ("pre", "hybrid"):
            _norm(p, f"{s}.LayerNorm", t + ("LayerNorm",))


def _norm(p: dict, src: str, dst: tuple[str, ...]) -> None:
    p[f"{src}.weight"] = plain(*dst, "scale")
    p[f"{src}.bias"] = plain(*dst, "bias")


def _dense(p: dict, src: str, dst: tuple[str, ...]) -> None:
    p[f"{src}.weight"] = linear(*dst, "kernel")
    p[f"{src}.bias"] = plain(*dst, "bias")


@dataclasses.dataclass
class CocoLMKeyMap(KeyMap):
    """Matches a checkpoint key after renaming it onto the HF names this model uses: fairseq names are
    translated and the ``cocolm.`` prefix is added or stripped (exports use the canonical names only)."""

    prefixed: bool = False

    def canonical(self, key: str) -> Optional[str]:
        return super().canonical(_hf_name(key, self.prefixed))


def hf_key_map(config) -> KeyMap:
    """Original HF names of every param of the model ``config`` describes (prefixed iff it has heads)."""
    P = PREFIX if config.prefixed else ""
    p: dict[str, Param] = {}
    aliases: dict[str, str] = {}
    emb = ("embeddings",)
    p[f"{P}embeddings.word_embeddings.weight"] = plain(*emb, "word_embeddings", "embedding")
    p[f"{P}embeddings.position_embeddings.weight"] = plain(*emb, "position_embeddings", "embedding")
    if config.type_vocab_size > 0:
        p[f"{P}embeddings.token_type_embeddings.weight"] = plain(*emb, "token_type_embeddings", "embedding")
    if config.layer_norm_type == "post":
        _norm(p, f"{P}embeddings.LayerNorm", emb + ("LayerNorm",))
    if config.rel_pos_bins > 0:
        p[f"{P}relative_attention_bias.weight"] = plain("encoder", "relative_attention_bias")
    if config.is_lsg:  # the LSG authors' name in their BERT/RoBERTa encoders
        p[f"{P}embeddings.global_embeddings.weight"] = plain(*emb, "global_embeddings", "embedding")
    _layers(p, f"{P}encoder.layer", ("encoder",), config.num_hidden_layers, config)
    if config.layer_norm_type in ("pre", "hybrid"):
        _norm(p, f"{P}encoder.LayerNorm", ("encoder", "LayerNorm"))
    if config.need_pooler:
        _dense(p, f"{P}scl_head.dense", ("scl_head", "dense"))
        _norm(p, f"{P}scl_head.LayerNorm", ("scl_head", "LayerNorm"))
    heads = config.heads
    if "classifier" in heads:
        _dense(p, "classifier.dense", ("classifier", "dense"))
        _dense(p, "classifier.out_proj", ("classifier", "out_proj"))
    if "qa" in heads:
        _dense(p, "qa_outputs.start_logits.dense", ("qa_start",))
        _dense(p, "qa_outputs.end_logits.dense", ("qa_end",))
    if "binary" in heads:
        _dense(p, "binary_head.out_proj", ("binary_head",))
    if "clm" in heads:
        # COCOLMCLMHead: decoder.bias IS clm_head.bias (one tensor saved under both names).
        if config.tie_clm_head:
            p["clm_head.bias"] = plain("clm_bias")
        else:
            p["clm_head.decoder.weight"] = linear("clm_head", "kernel")
            p["clm_head.bias"] = plain("clm_head", "bias")
        aliases["clm_head.decoder.bias"] = "clm_head.bias"
    if "generator" in heads:
        if config.rel_pos_bins > 0:
            p["generator.relative_attention_bias.weight"] = plain("generator", "relative_attention_bias")
        _layers(p, "generator.encoder.layer", ("generator",), config.generator_layers, config)
        if config.layer_norm_type in ("pre", "hybrid"):
            _norm(p, "generator.encoder.LayerNorm", ("generator", "LayerNorm"))
        _dense(p, "generator.lm_head.dense", ("generator_head", "dense"))
        _norm(p, "generator.lm_head.LayerNorm", ("generator_head", "LayerNorm"))
        p["generator.lm_head.bias"] = plain("generator_head", "bias")
    # Everything else is dropped and listed: the hub files carry tensors COCOLMModel never reads.
    return CocoLMKeyMap(params=p, aliases=aliases, ignore=(r".*",), family="cocolm", prefixed=config.prefixed)


# ----------------------------------------------------------------------------------------------------
# renaming checkpoints onto the HF names
_FAIRSEQ_LAYER = [
    (r"self_attn\.(in_proj|out_proj)\.(weight|bias)", r"attention.self_attn.\1.\2"),
    (r"self_attn_layer_norm\.(weight|bias)", r"attention.LayerNorm.\1"),
    (r"fc1\.(weight|bias)", r"intermediate.dense.\1"),
    (r"fc2\.(weight|bias)", r"output.dense.\1"),
    (r"final_layer_norm\.(weight|bias)", r"output.LayerNorm.\1"),
]
_FAIRSEQ = [
    (r"encoder\.sentence_encoder\.embed_tokens\.weight", "embeddings.word_embeddings.weight"),
    (r"encoder\.sentence_encoder\.embed_positions\.weight", "embeddings.position_embeddings.weight"),
    (r"encoder\.sentence_encoder\.segment_embeddings\.weight", "embeddings.token_type_embeddings.weight"),
    (r"encoder\.sentence_encoder\.emb_layer_norm\.(weight|bias)", r"embeddings.LayerNorm.\1"),
    (r"encoder\.sentence_encoder\.relative_attention_bias\.weight", "relative_attention_bias.weight"),
    (r"encoder\.binary_head\.out_proj\.(weight|bias)", r"binary_head.out_proj.\1"),
    (r"encoder\.lm_head\.bias", "clm_head.bias"),  # its weight is the tied word embedding
    (r"encoder\.seq_head\.dense\.(weight|bias)", r"scl_head.dense.\1"),
    (r"encoder\.seq_head\.layer_norm\.(weight|bias)", r"scl_head.LayerNorm.\1"),
    (r"auxiliary\.sentence_encoder\.relative_attention_bias\.weight", "generator.relative_attention_bias.weight"),
    (r"auxiliary\.lm_head\.dense\.(weight|bias)", r"generator.lm_head.dense.\1"),
    (r"auxiliary\.lm_head\.layer_norm\.(weight|bias)", r"generator.lm_head.LayerNorm.\1"),
    (r"auxiliary\.lm_head\.bias", "generator.lm_head.bias"),
    (r"classification_heads\.[^.]+\.(dense|out_proj)\.(weight|bias)", r"classifier.\1.\2"),
    (r"classification_heads\.[^.]+\.(start_logits|end_logits)\.dense\.(weight|bias)", r"qa_outputs.\1.dense.\2"),
]


def fairseq_key(key: str) -> Optional[str]:
    """The HF (bare) name of a fairseq COCO-LM key, or None for keys with no counterpart (tied copies)."""
    m = re.fullmatch(r"(encoder|auxiliary)\.sentence_encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        stack = "encoder.layer" if m.group(1) == "encoder" else "generator.encoder.layer"
        for pat, repl in _FAIRSEQ_LAYER:
            if re.fullmatch(pat, m.group(3)):
                return f"{stack}.{m.group(2)}." + re.sub(pat, repl, m.group(3))
        return None
    for pat, repl in _FAIRSEQ:
        if re.fullmatch(pat, key):
            return re.sub(pat, repl, key)
    return None


def is_fairseq(keys: Iterable[str]) -> bool:
    return any(k.startswith("encoder.sentence_encoder.") for k in keys)


def _bare(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def _hf_name(key: str, prefixed: bool) -> str:
    """The name ``key`` has in the HF layout the model uses (unknown keys keep their own name).

    No HF name matches a fairseq pattern, so fairseq keys are recognised one by one."""
    key = fairseq_key(key) or key
    bare = _bare(key)
    if bare.startswith(_ENCODER_ROOTS):
        return PREFIX + bare if prefixed else bare
    return key


def _classification_head_names(keys: Iterable[str]) -> list[str]:
    return sorted({k.split(".")[1] for k in keys if k.startswith("classification_heads.")})


def check_classification_heads(keys: Iterable[str], source: str = "checkpoint") -> None:
    """A fairseq checkpoint may hold several fine-tuning heads; the model has one classifier."""
    names = _classification_head_names(keys)
    if len(names) > 1:
        raise ConversionError(
            f"{source}: fairseq checkpoint has several classification heads {names}; keep one (load_fairseq(..., head=NAME))"
        )


def config_fields_from_state_dict(state_dict: Mapping, config) -> dict[str, Any]:
    """Config fields that follow from which keys a checkpoint has: the heads to build, CLM tying,
    generator depth. The encoder shape itself comes from config.json."""
    keys = {_bare(_hf_name(k, False)) for k in state_dict}
    heads = []
    if "classifier.out_proj.weight" in keys or "classifier.dense.weight" in keys:
        heads.append("classifier")
    if "qa_outputs.start_logits.dense.weight" in keys or "qa_outputs.end_logits.dense.weight" in keys:
        heads.append("qa")
    if "binary_head.out_proj.weight" in keys:
        heads.append("binary")
    fields: dict[str, Any] = {}
    if keys & {"clm_head.bias", "clm_head.decoder.bias", "clm_head.decoder.weight"}:
        heads.append("clm")
        fields["tie_clm_head"] = "clm_head.decoder.weight" not in keys
    gen_layers = {int(m.group(1)) for k in keys if (m := re.match(r"generator\.encoder\.layer\.(\d+)\.", k))}
    if gen_layers or any(k.startswith("generator.lm_head.") for k in keys):
        heads.append("generator")
        fields["generator_layers"] = max(gen_layers) + 1 if gen_layers else 0
    if is_fairseq(state_dict) and "scl_head.dense.weight" in keys:
        fields["need_pooler"] = True
    fields["heads"] = tuple(heads)
    return fields


def check_dropped(dropped: Iterable[str], config, source: str) -> None:
    """Dropped keys are fine (unused extras), unless they show the config does not describe the file."""
    bad = []
    for k in dropped:
        b = _bare(_hf_name(k, False))
        m = re.match(r"encoder\.layer\.(\d+)\.", b)
        if m and int(m.group(1)) >= config.num_hidden_layers:
            bad.append(f"{k} (config num_hidden_layers={config.num_hidden_layers})")
        if b == "relative_attention_bias.weight" and config.rel_pos_bins == 0:
            bad.append(f"{k} (config rel_pos_bins=0)")
        if b.startswith("embeddings.token_type_embeddings") and config.type_vocab_size == 0:
            bad.append(f"{k} (config type_vocab_size=0)")
        # (an SCL head without need_pooler is ignored, as COCOLMModel ignores it)
    if bad:
        raise ConversionError(f"{source}: the checkpoint does not match config.json: " + "; ".join(bad[:10]))


# ----------------------------------------------------------------------------------------------------
# fairseq checkpoints (model.pt)
def _arg(args: Optional[Mapping], name: str, default=None):
    if args is None:
        return default
    v = args.get(name, default) if isinstance(args, Mapping) else getattr(args, name, default)
    return default if v is None else v


def fairseq_hf_config(args: Optional[Mapping], state_dict: Mapping, source: str = "checkpoint") -> dict[str, Any]:
    """A COCO-LM config.json (the hub's 16 keys + ours) for a fairseq checkpoint, from its args and shapes."""
    try:
        V, H = state_dict["encoder.sentence_encoder.embed_tokens.weight"].shape
        max_pos = state_dict["encoder.sentence_encoder.embed_positions.weight"].shape[0]
        ffn = state_dict["encoder.sentence_encoder.layers.0.fc1.weight"].shape[0]
    except KeyError as e:
        raise ConversionError(f"{source}: not a fairseq COCO-LM checkpoint (no {e.args[0]})") from None
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.sentence_encoder\.layers\.(\d+)\.", k)))
    rel = state_dict.get("encoder.sentence_encoder.relative_attention_bias.weight")
    heads = _arg(args, "encoder_attention_heads")
    if rel is not None:
        if heads is not None and int(heads) != rel.shape[1]:
            raise ConversionError(f"{source}: args.encoder_attention_heads={heads} but the relative bias table has {rel.shape[1]} heads")
        heads = rel.shape[1]
    if heads is None:
        raise ConversionError(f"{source}: cannot tell the number of attention heads (no args and no relative bias table)")
    bins = int(rel.shape[0]) if rel is not None else 0
    max_rel = _arg(args, "max_rel_pos")
    if bins and max_rel is None:
        raise ConversionError(f"{source}: the checkpoint has no args.max_rel_pos (cocolm_base uses 128, cocolm_large 256)")
    if _arg(args, "generator_sample_mode") == "zero-dropout" and any(k.startswith("auxiliary.") for k in state_dict):
        raise ConversionError(
            f"{source}: generator_sample_mode 'zero-dropout' gives the generator its own position embedding and "
            "embedding LayerNorm, which this port shares with the main model; not supported"
        )
    if _arg(args, "encoder_normalize_before", False):
        raise ConversionError(f"{source}: encoder_normalize_before is not a COCO-LM setting; not supported")
    seg = state_dict.get("encoder.sentence_encoder.segment_embeddings.weight")
    hf: dict[str, Any] = {
        "attention_probs_dropout_prob": float(_arg(args, "attention_dropout", 0.1)),
        "hidden_act": _arg(args, "activation_fn", "gelu"),
        "hidden_dropout_prob": float(_arg(args, "dropout", 0.1)),
        "hidden_size": int(H),
        "initializer_range": 0.02,
        "intermediate_size": int(ffn),
        "max_position_embeddings": int(max_pos),
        "num_attention_heads": int(heads),
        "num_hidden_layers": layers,
        "type_vocab_size": 0 if seg is None else int(seg.shape[0]),
        "vocab_size": int(V),
        "rel_pos_bins": bins,
        "max_rel_pos": int(max_rel) if bins else 0,
        "layer_norm_type": "post",
        "layer_norm_eps": 1e-5,
        "cls_dropout_prob": float(_arg(args, "pooler_dropout", 0.0)),
    }
    cls_w = [k for k in state_dict if re.fullmatch(r"classification_heads\.[^.]+\.out_proj\.weight", k)]
    if cls_w:
        hf["num_labels"] = int(state_dict[cls_w[0]].shape[0])
        hf["classifier_activation"] = _arg(args, "pooler_activation_fn", "tanh")
        hf["architectures"] = ["COCOLMForSequenceClassification"]
    if "encoder.seq_head.dense.weight" in state_dict:
        if state_dict["encoder.seq_head.dense.weight"].shape[0] != H:
            raise ConversionError(f"{source}: seq_contrast_dim != hidden size is not supported")
        hf["need_pooler"] = True
    return hf


def _read_fairseq(path: str):
    try:
        obj = read_torch_zip(path, allow_namespace=True)
    except UnsafePickleError as e:
        raise CheckpointError(
            f"{e} -- fairseq training checkpoints may pickle optimizer/meter objects; keep only the weights and args: "
            "torch.save({'model': ck['model'], 'args': ck['args']}, 'model_weights.pt')"
        ) from None
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if args is None and isinstance(obj, Mapping) and isinstance(obj.get("cfg"), Mapping):
        args = obj["cfg"].get("model")
    return flatten_state_dict(obj, path), args


def load_fairseq(path: str | os.PathLike, head: Optional[str] = None, **runtime):
    """A :class:`lmzoo.cocolm.CocoLMModel` from a fairseq COCO-LM ``model.pt`` (pretrained or fine-tuned).

    ``head`` picks one of several ``classification_heads``; the pretraining heads (binary, CLM, SCL,
    generator) are built when their keys are present. The dropped keys (tied copies) are in ``load_report``.
    """
    from lmzoo.cocolm import CocoLMConfig, CocoLMModel

    path = os.fspath(path)
    sd, args = _read_fairseq(path)
    names = _classification_head_names(sd)
    if head is not None:
        if head not in names:
            raise ConversionError(f"{path}: no classification head {head!r}; it has {names}")
        sd = {k: v for k, v in sd.items() if not k.startswith("classification_heads.") or k.startswith(f"classification_heads.{head}.")}
    hf = fairseq_hf_config(args, sd, path)
    config = CocoLMConfig.from_hf_config(hf, **runtime)
    config = config.replace(**config_fields_from_state_dict(sd, config))
    return CocoLMModel.from_state_dict(config, sd, source=path)


def convert_fairseq(src: str | os.PathLike, dst: str | os.PathLike, *, format: str = "pytorch", head: Optional[str] = None, dtype=None) -> str:
    """Write a fairseq COCO-LM checkpoint as an HF-layout folder (config.json + weights) or an lmzoo one."""
    model = load_fairseq(src, head=head)
    return model.save_pretrained(dst, format=format, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# --to-lsg
def _mask_token_id(src_dir: str, vocab_size: int) -> int:
    """[MASK] comes last in COCO-LM's dictionary: after dict.txt's symbols when the file is there, else
    the last id of the vocabulary (the released layout)."""
    path = os.path.join(src_dir, "dict.txt")
    if os.path.exists(path):
        from lmzoo.cocolm_tokenizer import CocoLMDictionary

        mask = CocoLMDictionary.load(path).add_symbol("<mask>")
        if mask >= vocab_size:
            raise ConversionError(f"{path}: [MASK] would be id {mask}, outside vocab_size={vocab_size}")
        return mask
    return vocab_size - 1


def cocolm_to_lsg(
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
    pool_with_global: bool = True,
    lsh_num_pre_rounds: int = 1,
    random_global_init: bool = False,
    global_positional_stride: int = 64,
    keep_first_global_token: bool = False,
    resize_lsg: bool = False,
    mask_token_id: Optional[int] = None,
    seed: int = 123,
    format: str = "pytorch",
    progress=None,
) -> str:
    """Convert a COCO-LM checkpoint folder (HF layout, any heads) into an LSG-COCO-LM folder for
    ``max_length`` tokens, as the LSG authors convert BERT/RoBERTa: the learned position table is tiled
    (new position p = old position p mod old_max; no offset rows), the 512 global rows are the strided
    position table plus E[[CLS]] (global 0) / E[[MASK]] (the others; [MASK] is the dictionary's last id,
    or ``mask_token_id``), plus token type 0 when the model has token types, and config.json gets the
    LSG keys and ``max_position_embeddings = max_length``. The relative-position bias needs nothing: its
    buckets are functions of the distance (the table offset must not change with the longer table,
    which holds for every config whose longest distance already reaches the last bucket).
    """
    from lmzoo.cocolm import LSGCocoLMModel, relative_position_bucket, relative_position_bucket_vector
    from lmzoo.configuration import read_json
    from lmzoo.lsg_attention import LSG_CONFIG_KEYS
    from lmzoo.modeling import detect_family

    from .lsg import convert_planned_to_lsg, global_embeddings, lsg_config_keys

    src_dir, dst_dir = os.fspath(src_dir), os.path.abspath(os.fspath(dst_dir))
    if max_length <= 0 or block_size <= 0:
        raise ValueError(f"max_length and block_size must be positive, got {max_length} and {block_size}")
    hf = read_json(os.path.join(src_dir, "config.json"))
    if detect_family(hf, src_dir) != "cocolm":
        raise ConversionError(f"{src_dir}: not a COCO-LM checkpoint")
    old_max = int(hf.get("max_position_embeddings", 512))
    new_hf = dict(hf)
    new_hf.update(lsg_config_keys(block_size=block_size, sparse_block_size=sparse_block_size,
                                  sparsity_factor=sparsity_factor, sparsity_type=sparsity_type,
                                  num_global_tokens=num_global_tokens, adaptive=adaptive,
                                  mask_first_token=mask_first_token, pool_with_global=pool_with_global,
                                  lsh_num_pre_rounds=lsh_num_pre_rounds))
    new_hf["max_position_embeddings"] = int(max_length)
    config = LSGCocoLMModel.config_from_folder(src_dir, new_hf)  # validates the LSG keys
    new_hf.update({k: getattr(config, k) for k in LSG_CONFIG_KEYS})  # as validated (e.g. clipped)
    if config.rel_pos_bins:
        old_off = -int(relative_position_bucket(np.arange(-(old_max - 1), old_max), config.rel_pos_bins, config.max_rel_pos).min())
        vec = relative_position_bucket_vector(max_length, config.rel_pos_bins, config.max_rel_pos)
        if int(vec[max_length - 1]) != old_off:  # the row of distance 0 moved: every bucket would shift
            raise ConversionError(
                f"{src_dir}: rel_pos_bins={config.rel_pos_bins}, max_rel_pos={config.max_rel_pos} with "
                f"{old_max} positions never reach the last bucket, so the bias-table offset would change at "
                f"{max_length} positions; not supported")
    P = "cocolm." if config.prefixed else ""
    bos = int(hf.get("bos_token_id", 0))  # [CLS]
    mask = mask_token_id if mask_token_id is not None else _mask_token_id(src_dir, config.vocab_size)

    def make_globals(read):
        extra = read(f"{P}embeddings.token_type_embeddings.weight")[0] if config.type_vocab_size > 0 else None
        return global_embeddings(read(f"{P}embeddings.word_embeddings.weight"),
                                 read(f"{P}embeddings.position_embeddings.weight"), bos_id=bos, mask_id=mask,
                                 stride=global_positional_stride, random_init=random_global_init,
                                 rng=np.random.default_rng(seed), extra=extra)

    return convert_planned_to_lsg(
        src_dir, dst_dir, new_hf, global_key=f"{P}embeddings.global_embeddings.weight", make_globals=make_globals,
        position_key=f"{P}embeddings.position_embeddings.weight", position_offset=0, max_length=int(max_length),
        resize_lsg=resize_lsg, keep_first_global_token=keep_first_global_token, format=format, progress=progress,
    )

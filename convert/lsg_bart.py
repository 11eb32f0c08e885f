"""Key maps of BART / LSG-BART (original key <-> lmzoo.lsg_bart params) and the BART -> LSG conversion.

Checkpoint keys are those of ``BartForConditionalGeneration`` / ``LSGBartForConditionalGeneration``
(``model.``-prefixed, ``lm_head.weight`` and the encoder/decoder ``embed_tokens`` tied to
``model.shared.weight``, the ``final_logits_bias`` buffer). Base-model saves (``BartModel``,
``LSGBartModel``: no ``model.`` prefix) and checkpoints without ``final_logits_bias`` (zeros, as
transformers does) are accepted too.

:func:`bart_to_lsg` turns a short BART checkpoint into a long LSG one the way the LSG authors' converter
does: the learned position tables of encoder and decoder are tiled to ``max_length`` rows (+2 offset
rows), the 512 global embeddings are taken from the (strided) position table plus the ``<s>`` / ``<mask>``
token embeddings, and the LSG config keys are written (the shared pieces are in :mod:`lmzoo.convert.lsg`).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np

from .keymap import ConversionError, KeyMap, linear, plain
from .lsg import global_embeddings, lsg_config_keys, order_positions, tile_positions, write_lsg_folder

__all__ = ["bart_key_map", "canonical_state_dict", "bart_to_lsg", "tile_positions", "order_positions", "global_embeddings"]

POSITION_OFFSET = 2
_BASE_PREFIXES = ("shared.", "encoder.", "decoder.")


def _layer_norm(p: dict, key: str, *path: str) -> None:
    p[f"{key}.weight"] = plain(*path, "scale")
    p[f"{key}.bias"] = plain(*path, "bias")


def _attention(p: dict, key: str, *path: str) -> None:
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        p[f"{key}.{proj}.weight"] = linear(*path, proj, "kernel")
        p[f"{key}.{proj}.bias"] = plain(*path, proj, "bias")


def bart_key_map(config) -> KeyMap:
    """The key map of a (LSG-)BART config: canonical keys are the ``*ForConditionalGeneration`` ones."""
    p: dict = {"model.shared.weight": plain("shared", "embedding"), "final_logits_bias": plain("final_logits_bias")}
    aliases = {"model.encoder.embed_tokens.weight": "model.shared.weight",
               "model.decoder.embed_tokens.weight": "model.shared.weight"}
    if config.tie_word_embeddings:
        aliases["lm_head.weight"] = "model.shared.weight"
    else:
        p["lm_head.weight"] = linear("lm_head", "kernel")
    for side, n in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        pre = f"model.{side}"
        p[f"{pre}.embed_positions.weight"] = plain(side, "embed_positions", "embedding")
        _layer_norm(p, f"{pre}.layernorm_embedding", side, "layernorm_embedding")
        for i in range(n):
            k, path = f"{pre}.layers.{i}", (side, f"layers_{i}")
            _attention(p, f"{k}.self_attn", *path, "self_attn")
            _layer_norm(p, f"{k}.self_attn_layer_norm", *path, "self_attn_layer_norm")
            if side == "decoder":
                _attention(p, f"{k}.encoder_attn", *path, "encoder_attn")
                _layer_norm(p, f"{k}.encoder_attn_layer_norm", *path, "encoder_attn_layer_norm")
            for fc in ("fc1", "fc2"):
                p[f"{k}.{fc}.weight"] = linear(*path, "ffn", fc, "kernel")
                p[f"{k}.{fc}.bias"] = plain(*path, "ffn", fc, "bias")
            _layer_norm(p, f"{k}.final_layer_norm", *path, "final_layer_norm")
    if config.is_lsg:
        p["model.encoder.global_embeddings.weight"] = plain("encoder", "global_embeddings", "embedding")
    return KeyMap(
        params=p,
        aliases=aliases,
        # BartPretrainedModel._keys_to_ignore_on_load_unexpected
        ignore=(r"(model\.)?(encoder|decoder)\.version",),
        family="lsg_bart" if config.is_lsg else "bart",
    )


class _Zeros:
    """A lazily materialised zero tensor standing in for an absent ``final_logits_bias``."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def numpy(self):
        return np.zeros(self.shape, self.dtype)


class _CanonicalView(Mapping):
    """A read-only view of a state dict with base-model keys prefixed ``model.`` and a zero
    ``final_logits_bias`` added where the checkpoint has none."""

    def __init__(self, sd: Mapping, vocab_size: int):
        self._sd = sd
        self._names: dict[str, str] = {}
        for k in sd:
            self._names[f"model.{k}" if k.startswith(_BASE_PREFIXES) else k] = k
        self._extra = {}
        if "final_logits_bias" not in self._names:
            self._extra["final_logits_bias"] = _Zeros((1, vocab_size))
        self.source = getattr(sd, "source", "checkpoint")

    def __getitem__(self, k):
        if k in self._extra:
            return self._extra[k]
        return self._sd[self._names[k]]

    def __iter__(self):
        yield from self._names
        yield from self._extra

    def __len__(self):
        return len(self._names) + len(self._extra)


def canonical_state_dict(sd: Mapping, config) -> Mapping:
    return _CanonicalView(sd, config.vocab_size)


# ----------------------------------------------------------------------------------------------------
# BART -> LSG conversion (the LSG authors' ``BartConversionScript``)
# ----------------------------------------------------------------------------------------------------


_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")


def _find_mask_id(src_dir: str) -> Optional[int]:
    for name in ("tokenizer.json", "vocab.json", "added_tokens.json"):
        p = os.path.join(src_dir, name)
        if not os.path.exists(p):
            continue
        with open(p) as f:
            data = json.load(f)
        if name == "tokenizer.json":
            for tok in data.get("added_tokens", []):
                if tok.get("content") == "<mask>":
                    return int(tok["id"])
            vocab = (data.get("model") or {}).get("vocab") or {}
            if "<mask>" in vocab:
                return int(vocab["<mask>"])
        elif "<mask>" in data:
            return int(data["<mask>"])
    return None


def bart_to_lsg(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    max_length: int = 16384,
    block_size: int = 256,
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
    global_positional_stride: int = 64,
    keep_first_global_token: bool = False,
    resize_lsg: bool = False,
    mask_token_id: Optional[int] = None,
    seed: int = 123,
    format: str = "pytorch",
    progress=None,
) -> str:
    """Convert a BART (or LSG-BART) checkpoint folder into an LSG-BART folder for ``max_length`` tokens.

    The weights stream one tensor at a time; positions of encoder and decoder are tiled (new position p
    = old position p mod old_max), the global table is initialised from the positions and the ``<s>`` /
    ``<mask>`` embeddings (``random_global_init``: from a Gaussian fitted to the token embeddings), and
    config.json gets the LSG keys (the LSG config defaults unless given). For a source that is already
    LSG, ``resize_lsg`` only extends the positions, and ``keep_first_global_token`` keeps its global 0.
    Tokenizer files are copied (``model_max_length`` updated). Writes to a temporary folder, then renames.
    """
    from lmzoo.configuration import read_json
    from lmzoo.lsg_bart import LSG_AUTO_MAP, LSGBartConfig, is_lsg_config

    from . import writers
    from .checkpoint import open_checkpoint

    src_dir, dst_dir = os.fspath(src_dir), os.path.abspath(os.fspath(dst_dir))
    if format not in ("pytorch", "safetensors"):
        raise ValueError(f"format must be 'pytorch' or 'safetensors', got {format!r}")
    if max_length <= 0 or block_size <= 0:
        raise ValueError(f"max_length and block_size must be positive, got {max_length} and {block_size}")
    hf = read_json(os.path.join(src_dir, "config.json"))
    if str(hf.get("model_type", "bart")) != "bart":
        raise ConversionError(f"{src_dir}: model_type {hf.get('model_type')!r} is not a BART checkpoint")
    src_is_lsg = is_lsg_config(hf)
    new_hf = dict(hf)
    lsg_keys = lsg_config_keys(block_size=block_size, sparse_block_size=sparse_block_size, sparsity_factor=sparsity_factor,
                               sparsity_type=sparsity_type, num_global_tokens=num_global_tokens, adaptive=adaptive,
                               mask_first_token=mask_first_token, pool_with_global=pool_with_global,
                               lsh_num_pre_rounds=lsh_num_pre_rounds)
    lsg_keys["pass_global_tokens_to_decoder"] = pass_global_tokens_to_decoder
    new_hf.update(lsg_keys)
    new_hf.update(max_position_embeddings=int(max_length), architectures=["LSGBartForConditionalGeneration"],
                  auto_map=dict(LSG_AUTO_MAP), base_model_prefix="lsg")
    config = LSGBartConfig.from_hf_config(new_hf)  # validates the LSG keys
    new_hf.update({k: getattr(config, k) for k in lsg_keys})

    sd = canonical_state_dict(open_checkpoint(src_dir), config)
    keymap = bart_key_map(config)
    canon: dict[str, str] = {}
    unexpected = []
    for key in sd:
        c = keymap.canonical(key)
        if c is None:
            if not keymap.ignored(key):
                unexpected.append(key)
        elif c not in canon or key == c:
            canon[c] = key
    glob_key = "model.encoder.global_embeddings.weight"
    missing = [k for k in keymap.params if k not in canon and not (k == glob_key and not src_is_lsg)]
    if missing or unexpected:
        raise ConversionError(f"{src_dir}: not a BART checkpoint of this config: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")

    rng = np.random.default_rng(seed)
    pos_keys = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")

    def reader(key):
        def get():
            a = np.asarray(sd[canon[key]].numpy())
            if a.dtype == np.float16 or str(a.dtype) == "bfloat16":
                a = a.astype(np.float32)
            if key in pos_keys:
                a = tile_positions(a, max_length, POSITION_OFFSET)
            return a
        return get

    def new_globals():
        shared = np.asarray(sd[canon["model.shared.weight"]].numpy(), np.float32)
        enc_pos = np.asarray(sd[canon[pos_keys[0]]].numpy(), np.float32)[POSITION_OFFSET:]
        bos = hf.get("bos_token_id", 0)
        mid = mask_token_id if mask_token_id is not None else _find_mask_id(src_dir)
        if mid is None and not random_global_init:
            raise ConversionError(f"{src_dir}: cannot find the <mask> token id (no tokenizer files); pass mask_token_id=")
        g = global_embeddings(shared, enc_pos, bos_id=bos, mask_id=mid, stride=global_positional_stride,
                              random_init=random_global_init, rng=rng)
        if src_is_lsg and keep_first_global_token:
            g[0] = np.asarray(sd[canon[glob_key]].numpy())[0]
        return g.astype(np.float32)

    tensors: dict[str, writers.ExportTensor] = {}
    for key, p in keymap.params.items():
        if key == glob_key:
            if src_is_lsg and resize_lsg:
                get = reader(key)
            else:
                g = new_globals()  # 512 x D, small
                get = (lambda g=g: g)
            tensors[key] = writers.ExportTensor((512, config.d_model), np.float32, get)
            continue
        t = sd[canon[key]]
        shape = tuple(t.shape)
        if key in pos_keys:
            shape = (max_length + POSITION_OFFSET,) + shape[1:]
        dtype = np.float32 if np.dtype(t.dtype).kind == "f" or str(t.dtype) == "bfloat16" else t.dtype
        tensors[key] = writers.ExportTensor(shape, dtype, reader(key))
    for alias, target in keymap.aliases.items():
        tensors[alias] = writers.ExportTensor(tensors[target].shape, tensors[target].dtype, tensors[target].get, alias_of=target)

    return write_lsg_folder(src_dir, dst_dir, new_hf, tensors, max_length=max_length, format=format,
                            side_files=_TOKENIZER_FILES, progress=progress)

"""GLM checkpoints: the key map (HF / Megatron names <-> lmzoo.glm params), Megatron model-parallel shard
merging, and a streaming converter to an HF-layout folder.

Hub ``pytorch_model.bin`` files hold the raw Megatron ``module`` dict (no ``glm.`` prefix); files re-saved by
``save_pretrained`` carry ``glm.``; both load. Original training checkpoints are
``<dir>/<iteration|release>/mp_rank_XX_model_states.pt`` with the weights under ``module``; k model-parallel
shards are merged tensor by tensor (lazily: one merged tensor is in memory at a time):

* ``word_embeddings.weight``, ``mlp.dense_h_to_4h.{weight,bias}``: concatenated along dim 0;
* ``attention.query_key_value.{weight,bias}``: shard k holds [Q_k; K_k; V_k] -> [Q_0..Q_p; K_0..; V_0..];
* ``attention.dense.weight``, ``mlp.dense_4h_to_h.weight``: concatenated along dim 1 (their biases replicated);
* everything else (LayerNorms, position tables) is replicated: shard 0 is taken.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .checkpoint import StateDict, open_checkpoint
from .keymap import KeyMap, Param, linear, plain
from .torch_pickle import CheckpointError, LazyTensor, UnsafePickleError, flatten_state_dict, read_torch_zip

__all__ = [
    "glm_key_map",
    "open_megatron_checkpoint",
    "megatron_shard_files",
    "merge_rule",
    "MergedTensor",
    "convert_glm_checkpoint",
]


def _reshaped(path, torch_shape, flax_shape, to_torch) -> Param:
    """A torch Linear weight (transposed) or bias reshaped for Flax. A tensor of another shape is passed on
    transposed but not reshaped, so the key map's shape check reports it by name."""

    def to_flax(a):
        if tuple(a.shape) != tuple(torch_shape):
            return a.T
        return (a.T if a.ndim == 2 else a).reshape(flax_shape)

    return Param(tuple(path), to_flax, to_torch)


def _qkv_param(path, H, n, d) -> Param:
    # torch [3H, H] (out, in) <-> flax [H, 3, n, d]
    return _reshaped(path, (3 * n * d, H), (H, 3, n, d), lambda a: np.ascontiguousarray(a.reshape(H, 3 * n * d).T))


def _qkv_bias(path, n, d) -> Param:
    return _reshaped(path, (3 * n * d,), (3, n, d), lambda a: a.reshape(3 * n * d))


def _dense_param(path, H, n, d) -> Param:
    # torch [H, H] (out, in) <-> flax [n, d, H]
    return _reshaped(path, (H, n * d), (n, d, H), lambda a: np.ascontiguousarray(a.reshape(n * d, H).T))


def glm_key_map(config, head: str = "lm") -> KeyMap:
    """Original key -> lmzoo param for an LM (``head="lm"``) or the HF classifier (``head="cls"``)."""
    H, n, d = config.hidden_size, config.num_attention_heads, config.head_dim
    base = ("glm",) if head == "cls" else ()
    p: dict[str, Param] = {"word_embeddings.weight": plain(*base, "word_embeddings", "embedding")}
    tr = (*base, "transformer")
    p["transformer.position_embeddings.weight"] = plain(*tr, "position_embeddings", "embedding")
    if config.block_position_encoding:
        p["transformer.block_position_embeddings.weight"] = plain(*tr, "block_position_embeddings", "embedding")
    for i in range(config.num_layers):
        k, t = f"transformer.layers.{i}", (*tr, f"layers_{i}")
        for ln in ("input_layernorm", "post_attention_layernorm"):
            p[f"{k}.{ln}.weight"] = plain(*t, ln, "scale")
            p[f"{k}.{ln}.bias"] = plain(*t, ln, "bias")
        p[f"{k}.attention.query_key_value.weight"] = _qkv_param((*t, "attention", "qkv_kernel"), H, n, d)
        p[f"{k}.attention.query_key_value.bias"] = _qkv_bias((*t, "attention", "qkv_bias"), n, d)
        p[f"{k}.attention.dense.weight"] = _dense_param((*t, "attention", "dense_kernel"), H, n, d)
        p[f"{k}.attention.dense.bias"] = plain(*t, "attention", "dense_bias")
        for w in ("dense_h_to_4h", "dense_4h_to_h"):
            p[f"{k}.mlp.{w}.weight"] = linear(*t, "mlp", w, "kernel")
            p[f"{k}.mlp.{w}.bias"] = plain(*t, "mlp", w, "bias")
    p["transformer.final_layernorm.weight"] = plain(*tr, "final_layernorm", "scale")
    p["transformer.final_layernorm.bias"] = plain(*tr, "final_layernorm", "bias")
    ignore = [
        r"(glm\.)?(prompt_spell|pool_layer|multichoice_head)\..*",  # finetuning heads the LM does not use
        r".*position_ids",  # buffers some exports carry
    ]
    if head == "cls":
        for w in ("dense", "out_proj"):
            p[f"{w}.weight"] = linear("head", w, "kernel")
            p[f"{w}.bias"] = plain("head", w, "bias")
    else:
        ignore.append(r"(dense|out_proj)\.(weight|bias)")  # HF classification head
    return KeyMap(params=p, ignore=tuple(ignore), strip_prefixes=("glm.", "module."), family="glm")


# ----------------------------------------------------------------------------------------------------
# Megatron model-parallel shards
def megatron_shard_files(path: str | os.PathLike) -> list[str]:
    """The mp_rank_XX_model_states.pt files of a Megatron/DeepSpeed checkpoint folder (or one file).

    Accepts the checkpoint root (with ``latest_checkpointed_iteration.txt`` or ``latest``), an iteration
    folder, or a single ``.pt`` file.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder")
    for tracker in ("latest_checkpointed_iteration.txt", "latest"):
        tp = os.path.join(path, tracker)
        if os.path.exists(tp):
            with open(tp) as f:
                it = f.read().strip()
            sub = os.path.join(path, it)
            if not os.path.isdir(sub):
                raise CheckpointError(f"{tp} names iteration {it!r}, but {sub} is not a folder")
            path = sub
            break
    files = sorted(f for f in os.listdir(path) if re.fullmatch(r"mp_rank_\d+_model_states\.pt", f))
    if not files:
        raise CheckpointError(f"{path}: no mp_rank_XX_model_states.pt files")
    ranks = [int(re.findall(r"\d+", f)[0]) for f in files]
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"{path}: model-parallel ranks {ranks} are not 0..{len(ranks) - 1} (a shard is missing)")
    return [os.path.join(path, f) for f in files]


def _read_module(path: str) -> dict[str, LazyTensor]:
    try:
        obj = read_torch_zip(path, allow_namespace=True)
    except UnsafePickleError as e:
        raise CheckpointError(
            f"{e}. Megatron/DeepSpeed training files may also pickle optimizer or RNG state; keep only the weights "
            "with torch.save({'module': torch.load(f, weights_only=False)['module']}, out) on a trusted machine"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
        obj = obj["module"]
    return flatten_state_dict(obj, path)


def merge_rule(key: str) -> tuple[str, int]:
    """How model-parallel shards of ``key`` combine: ("cat", dim), ("qkv", 0) or ("replicated", 0)."""
    k = key[len("glm."):] if key.startswith("glm.") else key
    if k == "word_embeddings.weight" or k.endswith("mlp.dense_h_to_4h.weight") or k.endswith("mlp.dense_h_to_4h.bias"):
        return ("cat", 0)
    if k.endswith("attention.query_key_value.weight") or k.endswith("attention.query_key_value.bias"):
        return ("qkv", 0)
    if k.endswith("attention.dense.weight") or k.endswith("mlp.dense_4h_to_h.weight"):
        return ("cat", 1)
    return ("replicated", 0)


class MergedTensor:
    """One tensor assembled from its model-parallel parts on ``numpy()`` (nothing is read before)."""

    __slots__ = ("key", "parts", "rule", "dim", "shape", "dtype")

    def __init__(self, key: str, parts: Sequence[Any]):
        self.key, self.parts = key, list(parts)
        self.rule, self.dim = merge_rule(key)
        shapes = [tuple(p.shape) for p in self.parts]
        dtypes = {np.dtype(p.dtype) for p in self.parts}
        if len(dtypes) != 1:
            raise CheckpointError(f"{key}: model-parallel shards disagree on dtype: {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        if self.rule == "replicated" or len(self.parts) == 1:
            if len(set(shapes)) != 1:
                raise CheckpointError(f"{key}: replicated tensor has different shapes in the shards: {shapes}")
            self.shape = shapes[0]
            return
        dim = self.dim
        rest = {s[:dim] + s[dim + 1 :] for s in shapes}
        if len(rest) != 1:
            raise CheckpointError(f"{key}: shard shapes {shapes} do not agree outside dim {dim}")
        if self.rule == "qkv" and any(s[0] % 3 for s in shapes):
            raise CheckpointError(f"{key}: query_key_value shard rows {[s[0] for s in shapes]} are not multiples of 3")
        s0 = shapes[0]
        self.shape = s0[:dim] + (sum(s[dim] for s in shapes),) + s0[dim + 1 :]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        if self.rule == "replicated" or len(self.parts) == 1:
            return self.parts[0].numpy()
        out = np.empty(self.shape, self.dtype)
        if self.rule == "cat":
            at = 0
            for p in self.parts:
                a = p.numpy()
                sl = [slice(None)] * out.ndim
                sl[self.dim] = slice(at, at + a.shape[self.dim])
                out[tuple(sl)] = a
                at += a.shape[self.dim]
                del a
            return out
        # qkv: shard k = [Q_k; K_k; V_k] along rows -> [Q_0..Q_{p-1}; K_0..; V_0..]
        third = self.shape[0] // 3
        at = 0
        for p in self.parts:
            a = p.numpy()
            t = a.shape[0] // 3
            for j in range(3):
                out[j * third + at : j * third + at + t] = a[j * t : (j + 1) * t]
            at += t
            del a
        return out

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)


def open_megatron_checkpoint(path: str | os.PathLike) -> StateDict:
    """A lazy state dict of the merged Megatron model (keys as in the shards, without ``module.``)."""
    files = megatron_shard_files(path)
    shards = [_read_module(f) for f in files]
    keys = list(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))[:5]
            raise CheckpointError(f"{f}: keys differ from {files[0]} (e.g. {diff})")
    merged = {k: MergedTensor(k, [s[k] for s in shards]) for k in keys}
    return StateDict(merged, os.fspath(path), files)


# ----------------------------------------------------------------------------------------------------
def _open_any(src: str) -> StateDict:
    if os.path.isdir(src) and not any(
        os.path.exists(os.path.join(src, n))
        for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    ):
        return open_megatron_checkpoint(src)
    if os.path.isfile(src) and re.search(r"mp_rank_\d+_model_states\.pt$", src):
        return open_megatron_checkpoint(src)
    sd = open_checkpoint(src)
    return sd


def convert_glm_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    hf_config: Mapping[str, Any],
    *,
    format: str = "safetensors",
    dtype: Optional[str] = None,
    copy_rows: Optional[Mapping[int, int]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> str:
    """Stream a GLM checkpoint (hub .bin / safetensors, or Megatron shards) into an HF-layout folder.

    One tensor is read, merged, cast and written at a time, so peak memory stays near the largest tensor.
    Keys are written without a prefix, as the hub files are; the stored dtype is kept unless ``dtype`` is
    given. ``copy_rows={50009: 50007}`` reproduces the official glm-10b-chinese converter, which gives
    ``[gMASK]`` (50009) the embedding row of ``<|endofpiece|>`` (50007).
    """
    from lmzoo.glm import GLMConfig

    from .writers import ExportTensor, write_safetensors, write_torch_zip

    if format not in ("safetensors", "pytorch"):
        raise ValueError(f"format must be 'safetensors' or 'pytorch', got {format!r}")
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    config = GLMConfig.from_hf_config(hf_config)
    sd = _open_any(src)
    km = glm_key_map(config)
    expected = {}
    for key, prm in km.params.items():
        expected[key] = prm
    found: dict[str, str] = {}
    unexpected = []
    for key in sd:
        canon = km.canonical(key)
        if canon is None:
            if not km.ignored(key):
                unexpected.append(key)
            continue
        found[canon] = key
    missing = [k for k in km.params if k not in found]
    if missing or unexpected:
        raise CheckpointError(
            f"{src} does not fit the GLM config: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    # shape checks against the config before anything is written
    H, V, P = config.hidden_size, config.vocab_size, config.position_rows
    want = {"word_embeddings.weight": (V, H), "transformer.position_embeddings.weight": (P, H)}
    for k, shp in want.items():
        got = tuple(sd[found[k]].shape)
        if got != shp:
            raise CheckpointError(f"{src}: {found[k]} has shape {got}, the config implies {shp}")
    out_dtype = None if dtype is None else np.dtype(dtype)

    tensors = {}
    for canon, key in found.items():
        t = sd[key]
        target = out_dtype if out_dtype is not None and np.issubdtype(t.dtype, np.floating) else np.dtype(t.dtype)

        def get(t=t, target=target, canon=canon):
            a = np.asarray(t.numpy())
            if canon == "word_embeddings.weight" and copy_rows:
                for to, frm in copy_rows.items():
                    a[int(to)] = a[int(frm)]
            return a.astype(target, copy=False)

        tensors[canon] = ExportTensor(tuple(t.shape), target, get)

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix=".lmzoo-tmp-", dir=parent)
    try:
        cfg = dict(hf_config)
        cfg.setdefault("model_type", "glm")
        cfg.setdefault("architectures", ["GLMModel"])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        if format == "safetensors":
            write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, progress=progress)
        else:
            write_torch_zip(os.path.join(tmp, "pytorch_model.bin"), tensors, progress=progress)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst

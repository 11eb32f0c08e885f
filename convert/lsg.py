"""``--to-lsg``: a short-input encoder checkpoint -> an LSG one for long inputs, for every family with an
encoder whose self-attention LSG replaces (BART, COCO-LM, T5/LongLM), the way the LSG authors' converters do.

Shared here: the LSG config keys written to config.json, tiling a learned position table
(``update_positions``), the 512-row global table (``order_positions`` + ``update_global`` /
``update_global_randomly``), streaming the source tensors through the family's key map with those
changes, and the atomic write. What differs per family (which table to tile, which token embeddings
seed the globals) is a few lines in the family's converter module: :func:`lmzoo.convert.lsg_bart.bart_to_lsg`,
:func:`lmzoo.convert.cocolm.cocolm_to_lsg`, :func:`lmzoo.convert.t5.t5_to_lsg`; :func:`to_lsg` picks one
from the source's config.json.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from .keymap import ConversionError

__all__ = [
    "LSG_FAMILIES",
    "lsg_config_keys",
    "tile_positions",
    "order_positions",
    "global_embeddings",
    "convert_planned_to_lsg",
    "write_lsg_folder",
    "to_lsg",
]

LSG_FAMILIES = ("bart", "cocolm", "t5")  # families whose encoder LSG attention can replace


def lsg_config_keys(*, block_size: int, sparse_block_size: int = 128, sparsity_factor: int = 2,
                    sparsity_type: Optional[str] = "norm", num_global_tokens: int = 1, adaptive: bool = True,
                    mask_first_token: bool = False, pool_with_global: bool = True, lsh_num_pre_rounds: int = 1) -> dict:
    """The LSG keys as the LSG authors' configs write them ("none" is written as given; None skips sparse)."""
    return dict(adaptive=adaptive, block_size=block_size, lsh_num_pre_rounds=lsh_num_pre_rounds,
                mask_first_token=mask_first_token, num_global_tokens=num_global_tokens, pool_with_global=pool_with_global,
                sparse_block_size=sparse_block_size, sparsity_factor=sparsity_factor, sparsity_type=sparsity_type)


def tile_positions(table: np.ndarray, max_pos: int, offset: int = 0) -> np.ndarray:
    """``update_positions``: keep the ``offset`` rows (BART: 2), repeat the rest, cut to ``max_pos + offset``
    rows, so new position p reads old position ``p mod old_max``."""
    rows = table.shape[0]
    reps = max_pos // rows + 1
    return np.concatenate([table[:offset]] + [table[offset:]] * reps, axis=0)[: max_pos + offset]


def order_positions(positions: np.ndarray, stride: int, rng: np.random.Generator) -> np.ndarray:
    """``order_positions``: 512 positions (every n/512-th), reordered with a stride."""
    n, d = positions.shape
    if n % 512:
        if n > 512:
            positions = positions[: 512 * (n // 512)]
        else:  # the original fills the missing rows with torch.normal(mean, std) draws
            mean = positions.mean(axis=0, keepdims=True)
            std = positions.std(axis=0, ddof=1, keepdims=True)
            fill = rng.normal(np.broadcast_to(mean, (512 - n, d)), np.broadcast_to(std, (512 - n, d)))
            positions = np.concatenate([positions, fill.astype(positions.dtype)], axis=0)
        n = positions.shape[0]
    factor = n // 512
    if stride % factor or 512 % (stride // factor):
        raise ValueError(f"global_positional_stride={stride} does not fit {n} positions (factor {factor})")
    positions = positions.reshape(-1, factor, d)[:, 0]
    return positions.reshape(-1, stride // factor, d).transpose(1, 0, 2).reshape(-1, d)


def global_embeddings(shared: np.ndarray, positions: Optional[np.ndarray], *, bos_id: int, mask_id: Optional[int],
                      stride: int = 64, random_init: bool = False, rng: Optional[np.random.Generator] = None,
                      extra: Optional[np.ndarray] = None) -> np.ndarray:
    """The 512 x D global table (``update_global`` / ``update_global_randomly``).

    positions: the learned position table without offset rows, or None for a model without absolute
    positions (T5: no position part). Default: global 0 = position + E[bos], global k = position + E[mask].
    random_init: rows drawn from a Gaussian fitted to the token embeddings (row 0 = E[bos]) plus the
    positions. extra: a vector added to every row (BERT-style token type 0).
    """
    rng = rng if rng is not None else np.random.default_rng(123)
    e = np.asarray(shared, np.float64)
    if positions is None:
        pos = np.zeros((512, e.shape[1]))
    else:
        pos = order_positions(np.asarray(positions, np.float64), stride, rng)
    if random_init:
        w = rng.multivariate_normal(e.mean(axis=0), np.cov(e.T), size=512)
        w[0] = e[bos_id]
        out = w + pos
    else:
        if mask_id is None:
            raise ValueError("global embeddings need the <mask> token id (pass mask_token_id=)")
        pos[0] += e[bos_id]
        pos[1:] += e[mask_id][None]
        out = pos
    if extra is not None:
        out = out + np.asarray(extra, np.float64)[None]
    return out.astype(np.float32)


def _check_dst(dst_dir: str, overwrite: bool) -> None:
    if os.path.exists(dst_dir) and not overwrite:
        raise FileExistsError(f"{dst_dir} already exists (pass --overwrite to replace it)")


def write_lsg_folder(src_dir: str, dst_dir: str, hf: Mapping, tensors: Mapping, *, max_length: int, format: str,
                     side_files: Optional[Iterable[str]] = None, progress=None) -> str:
    """Atomically write config.json, the weights (original key names) and the source's side files
    (tokenizer files; ``side_files`` None: every non-weight file), with ``model_max_length`` updated."""
    from lmzoo.configuration import read_json

    from . import writers
    from .convert import _copy_side_files

    with writers.atomic_folder(dst_dir) as tmp:
        if side_files is None:
            _copy_side_files(src_dir, tmp)
        else:
            for name in side_files:
                p = os.path.join(src_dir, name)
                if os.path.exists(p):
                    shutil.copyfile(p, os.path.join(tmp, name))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(hf), f, indent=2, sort_keys=True)
            f.write("\n")
        if format == "safetensors":
            writers.write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, progress=progress)
        else:
            writers.write_torch_zip(os.path.join(tmp, "pytorch_model.bin"), tensors, progress=progress)
        tc = os.path.join(tmp, "tokenizer_config.json")
        if os.path.exists(tc):
            data = read_json(tc)
            data["model_max_length"] = int(max_length)
            with open(tc, "w") as f:
                json.dump(data, f, indent=2)
    return dst_dir


def convert_planned_to_lsg(
    src_dir: str,
    dst_dir: str,
    new_hf: Mapping,
    *,
    global_key: str,
    make_globals: Callable[[Callable[[str], np.ndarray]], np.ndarray],
    position_key: Optional[str] = None,
    position_offset: int = 0,
    max_length: int,
    resize_lsg: bool = False,
    keep_first_global_token: bool = False,
    format: str = "pytorch",
    progress=None,
) -> str:
    """The LSG conversion of a family whose checkpoints :func:`lmzoo.convert.convert.plan_conversion` reads.

    The source is matched and shape-checked against its own key map before anything is written; its tensors
    stream as float32 under their canonical names, ``position_key`` tiled to ``max_length`` rows, plus the
    512-row ``global_key`` from ``make_globals(read)`` (``read(key)``: a source tensor as float32). An LSG
    source keeps its globals with ``resize_lsg`` (and its global 0 with ``keep_first_global_token``).
    """
    from . import writers
    from .convert import plan_conversion

    if format not in ("pytorch", "safetensors"):
        raise ValueError(f"--to-lsg writes the original layout: format must be 'pytorch' or 'safetensors', got {format!r}")
    _, _, _, tensors, _ = plan_conversion(src_dir, dtype=np.float32)
    tensors = dict(tensors)

    def read(key):
        if key not in tensors:
            raise ConversionError(f"{src_dir}: the checkpoint has no {key}")
        return np.asarray(tensors[key].get(), np.float32)

    src_is_lsg = global_key in tensors
    if not (src_is_lsg and resize_lsg):  # from the source's tables, as the original does before update_positions
        g = make_globals(read)
        if src_is_lsg and keep_first_global_token:
            g[0] = read(global_key)[0]
        tensors[global_key] = writers.ExportTensor(g.shape, np.float32, lambda g=g: g)
    if position_key is not None:
        src = tensors[position_key]
        tensors[position_key] = writers.ExportTensor(
            (max_length + position_offset,) + src.shape[1:], np.float32,
            lambda src=src: tile_positions(np.asarray(src.get(), np.float32), max_length, position_offset))
    return write_lsg_folder(src_dir, dst_dir, new_hf, tensors, max_length=max_length, format=format, progress=progress)


def to_lsg(src_dir, dst_dir, *, overwrite: bool = False, **kwargs) -> tuple[str, str]:
    """Convert ``src_dir`` (a BART, COCO-LM or T5/LongLM checkpoint folder, or an LSG one of them) into an
    LSG folder ``dst_dir``; the family is read from config.json. Returns (dst, family). ``kwargs`` are the
    family converter's (``max_length``, ``block_size``, the LSG keys, ``mask_token_id``, ``format`` ...);
    nothing is written when the source or a setting is refused."""
    from lmzoo.configuration import read_json
    from lmzoo.modeling import LMZOO_MARKER, _FAMILY_ALIASES, detect_family

    src_dir, dst_dir = os.fspath(src_dir), os.path.abspath(os.fspath(dst_dir))
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"{src_dir}: not a folder")
    hf = read_json(os.path.join(src_dir, "config.json"))
    marker = os.path.join(src_dir, LMZOO_MARKER)
    family = (read_json(marker).get("family") if os.path.exists(marker) else None) or detect_family(hf, src_dir)
    family = _FAMILY_ALIASES.get(family, family)
    family = "bart" if family == "lsg_bart" else family
    if family not in LSG_FAMILIES:
        why = {"glm": "GLM has no encoder (one stack with a bidirectional prefix)"}.get(family, f"{family} is not one of them")
        raise ConversionError(f"{src_dir}: --to-lsg replaces the self-attention of an encoder: BART, COCO-LM or "
                              f"T5/LongLM checkpoints; {why}")
    _check_dst(dst_dir, overwrite)
    if family == "bart":
        from .lsg_bart import bart_to_lsg as convert
    elif family == "cocolm":
        from .cocolm import cocolm_to_lsg as convert
    else:
        from .t5 import t5_to_lsg as convert
    return convert(src_dir, dst_dir, **kwargs), family

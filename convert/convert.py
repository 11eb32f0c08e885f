"""Streaming checkpoint conversion: original folder -> lmzoo folder, one tensor at a time.

The keys are matched and shape-checked against the family's key map from the checkpoint's metadata
before any tensor is read, so a wrong-family or mis-shaped checkpoint fails fast and writes nothing.
Tensors are then copied (byte ranges, in chunks, when the dtype is unchanged) or cast one by one into
``model.safetensors`` / ``pytorch_model.bin`` with the original key names, so peak memory stays near
the largest tensor. ``--format orbax`` builds the params tree (memory: the whole model).
Everything is written into a temporary folder that is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Optional

import numpy as np

from .checkpoint import WEIGHT_FILES, open_checkpoint
from .keymap import match_keys
from .writers import ExportTensor, atomic_folder, write_safetensors, write_torch_zip

__all__ = ["convert_checkpoint", "plan_conversion"]

_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".index.json")
_COPY_LIMIT = 64 << 20  # tokenizer/config files are small; never copy another weights file


def plan_conversion(src: str, *, dtype=None, attention_impl: str = "xla"):
    """(model class, config, state dict, {canonical: ExportTensor}, report) for ``src``; reads no tensor data."""
    from lmzoo.configuration import read_json
    from lmzoo.modeling import LMZOO_MARKER, detect_family, model_class_for

    hf = read_json(os.path.join(src, "config.json"))
    marker = os.path.join(src, LMZOO_MARKER)
    family = (read_json(marker).get("family") if os.path.exists(marker) else None) or detect_family(hf, src)
    cls = model_class_for(family, hf)
    config = cls.config_from_folder(src, hf, attention_impl=attention_impl)
    sd = open_checkpoint(src)
    model = cls.bare(config)
    keymap = cls.key_map(config)
    found, report = match_keys(sd, keymap, model.param_shapes(), source=sd.source)
    target = None if dtype is None else np.dtype(dtype)
    tensors: dict[str, ExportTensor] = {}
    for canon, key in found.items():
        t = sd[key]
        out_dtype = t.dtype if target is None or not np.issubdtype(t.dtype, np.floating) else target
        span = t.contiguous_span() if out_dtype == t.dtype and hasattr(t, "contiguous_span") else None

        def get(t=t, out_dtype=out_dtype):
            return t.numpy().astype(out_dtype, copy=False)

        tensors[canon] = ExportTensor(tuple(t.shape), out_dtype, get, span=span)
    for alias, canon in keymap.aliases.items():
        if canon in tensors:
            c = tensors[canon]
            tensors[alias] = ExportTensor(c.shape, c.dtype, c.get, alias_of=canon)
    report["family"] = family
    return cls, config, sd, tensors, report


def _copy_side_files(src: str, dst: str, keep_existing: bool = False) -> list[str]:
    """Copy config/tokenizer/side files (everything that is not weights) into the new folder."""
    copied = []
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src)
            if name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES) or name in WEIGHT_FILES or name == "lmzoo.json":
                continue
            if keep_existing and os.path.exists(os.path.join(dst, rel)):
                continue
            if os.path.getsize(path) > _COPY_LIMIT:
                continue
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(path, os.path.join(dst, rel))
            copied.append(rel)
    return copied


def convert_checkpoint(
    src: str,
    dst: str,
    *,
    format: str = "safetensors",
    dtype=None,
    progress: Optional[Callable[[str, int], None]] = None,
    log: Callable[[str], None] = lambda s: None,
    overwrite: bool = False,
) -> dict:
    """Convert ``src`` into ``dst`` atomically. Returns a report (family, counts, dropped keys)."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if format not in ("safetensors", "pytorch", "orbax"):
        raise ValueError(f"format must be safetensors, pytorch or orbax, got {format!r}")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a folder")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    cls, config, sd, tensors, report = plan_conversion(src, dtype=dtype)
    log(f"{report['family']}: {len(sd)} tensors in {', '.join(os.path.basename(f) for f in sd.files)}; "
        f"{len([t for t in tensors.values() if t.alias_of is None])} mapped, {len(report['aliases'])} tied aliases, "
        f"{len(report['dropped'])} ignored by the original too")
    with atomic_folder(dst) as tmp:
        _copy_side_files(src, tmp)
        from lmzoo.modeling import LMZOO_MARKER

        if format == "orbax":
            from lmzoo.modeling import from_pretrained

            model = from_pretrained(src)
            model.save_pretrained(tmp, format="orbax", dtype=dtype)  # replaces tmp's contents
            _copy_side_files(src, tmp, keep_existing=True)
        else:
            step = (lambda k: progress(k, tensors[k].nbytes)) if progress else None
            if format == "safetensors":
                write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, progress=step)
            else:
                write_torch_zip(os.path.join(tmp, "pytorch_model.bin"), tensors, progress=step)
            with open(os.path.join(tmp, LMZOO_MARKER), "w") as f:
                json.dump({"family": report["family"], "format": format, "class": cls.__name__}, f, indent=2)
    report["tensors"] = len(tensors)
    report["bytes"] = int(sum(t.nbytes for t in tensors.values() if t.alias_of is None))
    return report

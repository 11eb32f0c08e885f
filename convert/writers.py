"""Writers: PyTorch zip (torch-free, loadable by ``torch.load``), safetensors, and orbax params.

The torch and safetensors writers stream: each tensor is converted to the original layout and written
before the next one is touched, and tied tensors share one storage (torch) or are written once
(safetensors, as transformers does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import ml_dtypes
import numpy as np

from .keymap import KeyMap, flatten_tree

__all__ = ["atomic_folder", "export_tensors", "write_torch_zip", "write_safetensors", "write_orbax", "read_orbax", "ExportTensor"]

_TORCH_STORAGE = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
_ST_DTYPE = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder next to ``dst``; on success it replaces ``dst``, on error it is removed.

    Readers never see a half-written ``dst``: it is either the old folder, or the new one complete.
    """
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lmzoo-tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=".lmzoo-old-", dir=parent)
            os.rename(dst, os.path.join(old, "x"))
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ExportTensor:
    """A tensor to write: produced lazily by ``get()``; ``alias_of`` names the key whose storage it shares."""

    def __init__(self, shape, dtype, get: Callable[[], np.ndarray], alias_of: Optional[str] = None, span=None):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.get = get
        self.alias_of = alias_of
        self.span = span  # (file, offset, nbytes): bytes already in the target layout, copied in chunks

    def write_into(self, f) -> None:
        """Write the tensor's bytes to file object ``f`` (chunked file copy when a span is known)."""
        if self.span is not None:
            path, offset, nbytes = self.span
            if nbytes != self.nbytes:
                raise ValueError(f"source span of {nbytes} bytes does not match {self.shape} {self.dtype}")
            buf = bytearray(min(nbytes, 8 << 20) or 1)
            view = memoryview(buf)
            with open(path, "rb", buffering=0) as src:
                src.seek(offset)
                left = nbytes
                while left:
                    n = src.readinto(view[: min(left, len(buf))])
                    if not n:
                        raise ValueError(f"{path}: unexpected end of file while copying a tensor")
                    f.write(view[:n])
                    left -= n
            return
        a = self.get()
        if tuple(a.shape) != self.shape:
            raise ValueError(f"produced shape {a.shape}, declared {self.shape}")
        f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        del a

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def export_tensors(params: Mapping, keymap: KeyMap, dtype=None) -> dict[str, ExportTensor]:
    """Original key -> ExportTensor for every param (tied aliases point at their canonical key)."""
    flat = flatten_tree(params)
    out: dict[str, ExportTensor] = {}
    for key, p in keymap.params.items():
        if p.path not in flat:
            raise KeyError(f"param {'/'.join(p.path)} (for {key}) is not in the params tree")
        leaf = flat[p.path]
        target = np.dtype(dtype) if dtype is not None and np.issubdtype(np.dtype(leaf.dtype), np.floating) else np.dtype(leaf.dtype)

        def get(leaf=leaf, p=p, target=target):
            a = np.asarray(leaf)
            if p.to_torch is not None:
                a = p.to_torch(a)
            return np.ascontiguousarray(a.astype(target, copy=False))

        shape = tuple(leaf.shape)
        if p.to_torch is not None:
            shape = tuple(p.to_torch(np.broadcast_to(np.zeros((), np.uint8), shape)).shape)
        out[key] = ExportTensor(shape, target, get)
    for alias, canon in keymap.aliases.items():
        if canon in out:
            c = out[canon]
            out[alias] = ExportTensor(c.shape, c.dtype, c.get, alias_of=canon)
    return out


# ---------------------------------------------------------------------------------------------
# torch zip
def _op_int(x: int) -> bytes:
    if 0 <= x < 256:
        return b"K" + bytes([x])
    if -(2**31) <= x < 2**31:
        return b"J" + struct.pack("<i", x)
    n = (x.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + x.to_bytes(n, "little", signed=True)


def _op_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_tuple(items: Iterable[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _torch_pickle(entries: list[tuple[str, str, np.dtype, int, tuple, tuple]]) -> bytes:
    """data.pkl for an OrderedDict of tensors: (key, storage_key, dtype, numel, shape, stride)."""
    out = [b"\x80\x02", _op_global("collections", "OrderedDict"), b")R", b"("]
    for key, skey, dtype, numel, shape, stride in entries:
        pid = _op_tuple(
            [_op_str("storage"), _op_global("torch", _TORCH_STORAGE[dtype]), _op_str(skey), _op_str("cpu"), _op_int(numel)]
        )
        args = _op_tuple(
            [
                pid + b"Q",
                _op_int(0),
                _op_tuple(_op_int(s) for s in shape),
                _op_tuple(_op_int(s) for s in stride),
                b"\x89",
                _op_global("collections", "OrderedDict") + b")R",
            ]
        )
        out.append(_op_str(key) + _op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R")
    out.append(b"u.")
    return b"".join(out)


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int, align: int = 64) -> zipfile.ZipInfo:
    """A ZipInfo whose data starts on an ``align``-byte boundary (padding in the extra field, as torch does)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    zip64 = size > 0x7FFFFFFF
    header = 30 + len(name.encode()) + (20 if zip64 else 0) + 4
    pad = (-(zf.fp.tell() + header)) % align
    info.extra = struct.pack("<HH", 0x4B46, pad) + b"Z" * pad
    return info


def write_torch_zip(path: str, tensors: Mapping[str, ExportTensor], *, progress=None, archive_name: str = "pytorch_model") -> None:
    """Write a ``torch.save``-compatible zip of ``tensors`` (aliases share their canonical storage)."""
    storage_of: dict[str, str] = {}
    entries, order = [], []
    for key, t in tensors.items():
        canon = t.alias_of or key
        if canon not in storage_of:
            storage_of[canon] = str(len(storage_of))
            order.append(canon)
        stride = tuple(int(np.prod(t.shape[i + 1 :], dtype=np.int64)) for i in range(len(t.shape)))
        numel = int(np.prod(t.shape, dtype=np.int64))
        entries.append((key, storage_of[canon], t.dtype, numel, t.shape, stride))
    pkl = _torch_pickle(entries)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(_aligned_info(zf, f"{archive_name}/data.pkl", len(pkl)), pkl)
        zf.writestr(_aligned_info(zf, f"{archive_name}/byteorder", 6), b"little")
        for canon in order:
            t = tensors[canon]
            if progress:
                progress(canon)
            info = _aligned_info(zf, f"{archive_name}/data/{storage_of[canon]}", t.nbytes)
            with zf.open(info, "w", force_zip64=t.nbytes > 0x7FFFFFFF) as f:
                t.write_into(f)
        zf.writestr(_aligned_info(zf, f"{archive_name}/version", 2), b"3\n")


# ---------------------------------------------------------------------------------------------
# safetensors
def write_safetensors(path: str, tensors: Mapping[str, ExportTensor], *, progress=None, metadata=None) -> None:
    """Stream a .safetensors file; tied aliases are written once, under their canonical key."""
    items = [(k, t) for k, t in tensors.items() if t.alias_of is None]
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for k, t in items:
        header[k] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, t in items:
            if progress:
                progress(k)
            t.write_into(f)


# ---------------------------------------------------------------------------------------------
# orbax
def write_orbax(path: str, params: Any, dtype=None) -> None:
    import jax
    import orbax.checkpoint as ocp

    if dtype is not None:
        params = jax.tree.map(
            lambda a: a.astype(dtype) if np.issubdtype(np.dtype(a.dtype), np.floating) else a, params
        )
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()


def read_orbax(path: str, abstract: Any) -> Any:
    import jax
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    try:
        return ckptr.restore(os.path.abspath(path), target)
    except ValueError:
        # Saved in another dtype (--dtype): restore as stored, the caller casts.
        meta = ckptr.metadata(os.path.abspath(path))
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        target = jax.tree.map(lambda a, m: jax.ShapeDtypeStruct(a.shape, m.dtype), abstract, tree)
        return ckptr.restore(os.path.abspath(path), target)

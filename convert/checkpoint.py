"""Open a checkpoint folder or file as a lazy ``name -> tensor`` mapping.

Handles ``pytorch_model.bin`` (torch zip, read by :mod:`lmzoo.convert.torch_pickle`), ``model.safetensors``
(own memory-mapped parser), and sharded checkpoints with a ``*.index.json``. Every value has ``.shape``,
``.dtype`` and ``.numpy()``; nothing is read until ``numpy()`` is called.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from .torch_pickle import CheckpointError, flatten_state_dict, read_torch_zip

__all__ = ["open_checkpoint", "StateDict", "SafetensorsTensor", "find_weights", "WEIGHT_FILES"]

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# In order of preference when a folder holds several.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class SafetensorsTensor:
    """One tensor of a .safetensors file, read on demand through a short-lived mapping."""

    __slots__ = ("path", "begin", "end", "shape", "dtype", "storage_key")

    def __init__(self, path: str, begin: int, end: int, shape, dtype: np.dtype):
        self.path, self.begin, self.end = path, begin, end
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.storage_key = f"{path}:{begin}"

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def numpy(self) -> np.ndarray:
        if self.end == self.begin:
            return np.zeros(self.shape, self.dtype)
        gran = mmap.ALLOCATIONGRANULARITY
        aligned = self.begin - self.begin % gran
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), self.end - aligned, access=mmap.ACCESS_READ, offset=aligned)
            try:
                buf = np.frombuffer(mm, np.uint8, count=self.end - self.begin, offset=self.begin - aligned)
                out = buf.view(self.dtype).reshape(self.shape).copy()
                del buf
            finally:
                try:
                    mm.close()
                except BufferError:
                    pass
        return out

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def contiguous_span(self) -> tuple[str, int, int]:
        return self.path, self.begin, self.end - self.begin


def read_safetensors(path: str) -> dict[str, SafetensorsTensor]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out: dict[str, SafetensorsTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            b, e = info["data_offsets"]
            shape = info["shape"]
        except KeyError as err:
            raise CheckpointError(f"{path}: tensor {name!r}: bad header entry ({err})") from None
        if base + e > size:
            raise CheckpointError(f"{path}: tensor {name!r} reaches past the end of the file (truncated?)")
        if (e - b) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r}: byte size does not match shape {shape}")
        out[name] = SafetensorsTensor(path, base + b, base + e, shape, dtype)
    return out


class StateDict(Mapping):
    """A lazy, read-only mapping of original key -> tensor (LazyTensor / SafetensorsTensor)."""

    def __init__(self, tensors: dict, source: str, files: list[str]):
        self._tensors = tensors
        self.source = source
        self.files = files

    def __getitem__(self, k):
        return self._tensors[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def dtypes(self) -> set:
        return {t.dtype for t in self._tensors.values()}

    def __repr__(self) -> str:
        return f"StateDict({len(self)} tensors from {self.source})"


def _read_one(path: str) -> dict:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return flatten_state_dict(read_torch_zip(path), path)


def find_weights(folder: str) -> str:
    for name in WEIGHT_FILES:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return p
    raise CheckpointError(
        f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)})"
    )


def open_checkpoint(path: str | os.PathLike) -> StateDict:
    """Open a folder (finding its weights file) or a weights file / index directly."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = find_weights(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".index.json"):
        folder = os.path.dirname(path)
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path}: not a valid shard index ({e})") from None
        tensors: dict = {}
        files = sorted(set(weight_map.values()))
        for shard in files:
            sp = os.path.join(folder, shard)
            if not os.path.exists(sp):
                raise CheckpointError(f"{path}: shard {shard!r} listed in the index is missing")
            part = _read_one(sp)
            for k, v in part.items():
                if weight_map.get(k) == shard:
                    tensors[k] = v
        missing = [k for k in weight_map if k not in tensors]
        if missing:
            raise CheckpointError(f"{path}: keys listed in the index are absent from their shards: {missing[:5]}")
        return StateDict(tensors, path, [os.path.join(folder, s) for s in files])
    return StateDict(_read_one(path), path, [path])

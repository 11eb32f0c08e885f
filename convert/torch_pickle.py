"""Read PyTorch ``torch.save`` zip checkpoints without torch and without running pickle code.

The unpickler accepts only the globals a state dict needs (tensor/storage rebuild functions, storage
types, ``OrderedDict`` and plain containers); any other global is refused before it is resolved, so
nothing from the file is ever executed. Storages are memory-mapped straight out of the (uncompressed)
zip entries: a tensor's bytes are read only when ``LazyTensor.numpy()`` is called, and the pages are
released again afterwards, so peak memory stays near the largest tensor.
"""

from __future__ import annotations

import collections
import mmap
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointError",
    "UnsafePickleError",
    "LazyTensor",
    "read_torch_zip",
    "is_torch_zip",
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not what it claims to be."""


class UnsafePickleError(CheckpointError):
    """The pickle names a global outside the allow-list (it could run code); nothing was executed."""


# torch storage class name -> numpy dtype
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# torch.dtype attribute name -> numpy dtype (UntypedStorage checkpoints name the dtype explicitly)
TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}

_PAGE = mmap.ALLOCATIONGRANULARITY


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass
class _Storage:
    """A storage inside the zip: where its bytes start and how many elements it holds."""

    archive: "_Archive"
    key: str
    dtype: np.dtype
    numel: int
    data_offset: int  # absolute file offset of the first byte

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class LazyTensor:
    """A tensor whose bytes stay on disk until ``numpy()`` is called."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)
        self.dtype = storage.dtype
        if self.shape and min(self.shape) > 0:
            last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
            if last >= storage.numel or self.offset < 0:
                raise CheckpointError(
                    f"tensor view (offset {self.offset}, shape {self.shape}, stride {self.stride}) "
                    f"reaches past its storage {storage.key!r} of {storage.numel} elements"
                )

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def storage_key(self) -> str:
        return self.storage.key

    def numpy(self) -> np.ndarray:
        """A fresh, C-contiguous numpy copy (the mapped pages are released afterwards)."""
        return self.storage.archive.read(self)

    def contiguous_span(self) -> tuple[str, int, int] | None:
        """(file, byte offset, byte count) when the view is a plain C-contiguous run of its storage."""
        expected = tuple(int(np.prod(self.shape[i + 1 :], dtype=np.int64)) for i in range(len(self.shape)))
        if any(n > 1 and s != e for n, s, e in zip(self.shape, self.stride, expected)):
            return None
        item = self.dtype.itemsize
        return self.storage.archive.path, self.storage.data_offset + self.offset * item, self.nbytes

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype.name}, storage={self.storage.key})"


class _Archive:
    """The zip file, memory-mapped once; storage reads map only the bytes they need."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        self._size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self._size else None

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: entry {info.filename!r} is compressed; torch storages are stored")
        start = info.header_offset
        header = self._mm[start : start + 30] if self._mm is not None else b""
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt local header for {info.filename!r}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        offset = start + 30 + name_len + extra_len
        if offset + info.file_size > self._size:
            raise CheckpointError(f"{self.path}: entry {info.filename!r} is truncated")
        return offset

    def read(self, t: LazyTensor) -> np.ndarray:
        st = t.storage
        item = st.dtype.itemsize
        if st.nbytes == 0 or t.nbytes == 0:
            return np.zeros(t.shape, dtype=st.dtype)
        # Map only the span the view touches, page-aligned, so untouched parts never become resident.
        lo = t.offset
        hi = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) + 1
        begin = st.data_offset + lo * item
        end = st.data_offset + hi * item
        aligned = begin - begin % _PAGE
        mm = mmap.mmap(self._file.fileno(), end - aligned, access=mmap.ACCESS_READ, offset=aligned)
        try:
            buf = np.frombuffer(mm, dtype=np.uint8, count=end - begin, offset=begin - aligned)
            base = buf.view(st.dtype)
            view = np.lib.stride_tricks.as_strided(
                base, shape=t.shape, strides=tuple(s * item for s in t.stride), writeable=False
            )
            out = np.array(view, order="C", copy=True)
            del buf, base, view
        finally:
            try:
                mm.close()
            except BufferError:  # a stray reference still exists; let GC unmap it
                pass
        return out

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
        self._file.close()


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuild got {type(storage).__name__}, expected a storage")
    return LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


class _Namespace(dict):
    """Stand-in for ``argparse.Namespace`` in Megatron checkpoints: attributes become dict items."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


# (module, name) -> the safe callable/object the unpickler hands back. Anything else is refused.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): object,  # only ever passed as new_type to _rebuild_from_type_v2
    ("torch.nn.parameter", "Parameter"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}
for _name, _dt in STORAGE_DTYPES.items():
    _SAFE_GLOBALS[("torch", _name)] = _StorageType(_dt)
for _name, _dt in TORCH_DTYPES.items():
    _SAFE_GLOBALS[("torch", _name)] = _StorageType(_dt)
_SAFE_GLOBALS[("torch", "UntypedStorage")] = _StorageType(np.dtype(np.uint8))

# Extra globals that only Megatron/DeepSpeed training checkpoints carry; opt-in via allow_namespace.
_NAMESPACE_GLOBALS = {("argparse", "Namespace"): _Namespace}  # a class: torch.save pickles it with NEWOBJ


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: _Archive, zf: zipfile.ZipFile, prefix: str, extra_globals: Mapping):
        super().__init__(file)
        self._archive = archive
        self._zf = zf
        self._prefix = prefix
        self._storages: dict[str, _Storage] = {}
        self._globals = {**_SAFE_GLOBALS, **extra_globals}

    def find_class(self, module: str, name: str):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._archive.path}: the pickle asks for global {module}.{name}, which is not a tensor, "
                "storage or plain container; refusing to load it (nothing was executed)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._archive.path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        key = str(key)
        if key in self._storages:
            return self._storages[key]
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"{self._archive.path}: storage {key} has unknown type {stype!r}")
        name = f"{self._prefix}data/{key}"
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self._archive.path}: storage entry {name!r} is missing (truncated file?)") from None
        dtype = stype.dtype
        if info.file_size % dtype.itemsize:
            raise CheckpointError(f"{self._archive.path}: storage {key} size {info.file_size} is not a multiple of {dtype}")
        numel = info.file_size // dtype.itemsize
        st = _Storage(self._archive, key, dtype, int(numel), self._archive.data_offset(info))
        self._storages[key] = st
        return st


def is_torch_zip(path: str | os.PathLike) -> bool:
    return zipfile.is_zipfile(path)


def read_torch_zip(path: str | os.PathLike, *, allow_namespace: bool = False) -> dict[str, Any]:
    """Return the unpickled object of a ``torch.save`` zip file with tensors as ``LazyTensor``.

    ``allow_namespace`` additionally accepts ``argparse.Namespace`` (as a dict), which Megatron
    model-parallel checkpoints store next to the weights.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(b"PK"):
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: this is a legacy (pre-1.6, non-zip) torch.save file; lmzoo reads only the zip "
                "format. Re-save it with a recent torch (torch.save(torch.load(f), f)) and try again"
            )
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (bad magic {head[:4]!r})")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip ({e})") from None
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
        raise CheckpointError(f"{path}: expected exactly one data.pkl entry, found {len(pkl)}")
    prefix = pkl[0][: -len("data.pkl")]
    bo = prefix + "byteorder"
    if bo in names and zf.read(bo).strip() not in (b"little", b""):
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    archive = _Archive(path)
    extra = _NAMESPACE_GLOBALS if allow_namespace else {}
    try:
        data = zf.read(pkl[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read data.pkl ({e})") from None
    import io

    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), archive, zf, prefix, extra).load()
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickle stream
        raise CheckpointError(f"{path}: corrupt pickle in data.pkl ({type(e).__name__}: {e})") from None
    return obj


def flatten_state_dict(obj: Any, path: str = "<checkpoint>") -> dict[str, LazyTensor]:
    """Find the tensor dict in a loaded checkpoint (``{'state_dict': ...}``, ``{'model': ...}`` or flat)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, LazyTensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module", "model_state_dict", "palm"):
            if key in obj and isinstance(obj[key], Mapping):
                return flatten_state_dict(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, LazyTensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path}: no tensor dictionary found in the checkpoint")

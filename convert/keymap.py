"""Original-key <-> lmzoo-param mapping, shared by every family's key map.

A family's key map module (``convert/<family>.py``) builds a :class:`KeyMap` for a config: one
:class:`Param` per original tensor (where it lives in the Flax params tree and how to reshape it),
aliases for tied copies, prefixes the original may or may not carry, and patterns of keys the original
code itself ignores. :func:`load_params` then streams a state dict into a params tree, reporting every
missing, unexpected and mis-shaped key by name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .torch_pickle import CheckpointError

__all__ = ["Param", "KeyMap", "ConversionError", "match_keys", "load_params", "linear", "plain", "flatten_tree", "unflatten_tree"]


class ConversionError(CheckpointError):
    """The checkpoint's keys or shapes do not fit the model the config describes."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One original tensor: its params-tree path and the shape transforms between the two layouts."""

    path: tuple[str, ...]
    to_flax: Optional[Callable[[np.ndarray], np.ndarray]] = None
    to_torch: Optional[Callable[[np.ndarray], np.ndarray]] = None
    torch_shape: Optional[tuple[int, ...]] = None  # expected original shape (filled by KeyMap.check)


def plain(*path: str) -> Param:
    return Param(tuple(path))


def _t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def linear(*path: str) -> Param:
    """A torch ``Linear.weight`` [out, in] stored as a Flax kernel [in, out]."""
    return Param(tuple(path), _t, _t)


@dataclasses.dataclass
class KeyMap:
    params: dict[str, Param]
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # alias key -> canonical key
    ignore: tuple[str, ...] = ()  # regexes of keys the original code ignores
    strip_prefixes: tuple[str, ...] = ()  # leading prefixes a checkpoint may carry
    family: str = ""

    def canonical(self, key: str) -> Optional[str]:
        """The canonical key for a checkpoint key, or None if it is not a parameter of this model."""
        candidates = [key] + [key[len(p):] for p in self.strip_prefixes if key.startswith(p)]
        for k in candidates:
            if k in self.params:
                return k
            if k in self.aliases:
                return self.aliases[k]
        return None

    def ignored(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignore)


def flatten_tree(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def match_keys(
    state_dict: Mapping[str, Any],
    keymap: KeyMap,
    expected: Mapping[tuple[str, ...], tuple[int, ...]],
    *,
    source: str = "checkpoint",
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Match checkpoint keys to the key map and check shapes from metadata alone (no tensor is read).

    Returns ({canonical key: checkpoint key}, report with the keys dropped because the original ignores
    them too and the tied aliases skipped). Raises ConversionError naming every missing, unexpected or
    mis-shaped key.
    """
    found: dict[str, str] = {}
    unexpected, dropped, aliases_seen = [], [], []
    for key in state_dict:
        canon = keymap.canonical(key)
        if canon is None:
            (dropped if keymap.ignored(key) else unexpected).append(key)
            continue
        # Prefer the canonical key itself over a tied alias of it (both name one storage).
        if canon not in found or (found[canon] != canon and key == canon):
            if canon in found:
                aliases_seen.append(found[canon])
            found[canon] = key
        else:
            aliases_seen.append(key)
    problems = []
    missing = [k for k in keymap.params if k not in found]
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    shape_errors = []
    for canon, key in found.items():
        p = keymap.params[canon]
        want = expected.get(p.path)
        if want is None:
            raise ConversionError(f"key map of {keymap.family} points {canon} at unknown param {'/'.join(p.path)}")
        got = tuple(state_dict[key].shape)
        if p.to_flax is None:
            flax_shape = got
        else:  # apply the transform to a zero-size stand-in of the right shape
            flax_shape = tuple(p.to_flax(np.broadcast_to(np.zeros((), np.uint8), got)).shape)
        if flax_shape != tuple(want):
            shape_errors.append(f"{key}: checkpoint shape {got} does not fit the model's {tuple(want)} (as {'/'.join(p.path)})")
    if shape_errors:
        problems.append("shape mismatch: " + "; ".join(shape_errors[:20]))
    if problems:
        hint = ""
        if len(found) < len(keymap.params) / 2:
            hint = f" (it does not look like a {keymap.family} checkpoint: only {len(found)} of {len(keymap.params)} keys match)"
        raise ConversionError(f"{source} does not fit the {keymap.family} model{hint}: " + " | ".join(problems))
    return found, {"dropped": dropped, "aliases": aliases_seen}


def load_params(
    state_dict: Mapping[str, Any],
    keymap: KeyMap,
    expected: Mapping[tuple[str, ...], tuple[int, ...]],
    *,
    dtype: Any = np.float32,
    put: Callable[[tuple[str, ...], np.ndarray], Any] = lambda path, a: a,
    progress: Optional[Callable[[str], None]] = None,
    source: str = "checkpoint",
) -> tuple[dict, dict[str, list[str]]]:
    """Stream ``state_dict`` into a params tree shaped like ``expected`` (path -> shape).

    Keys are matched and checked first (:func:`match_keys`); then each tensor is read, reshaped, cast to
    ``dtype`` (None keeps the stored dtype) and handed to ``put`` (e.g. ``jax.device_put`` onto a
    sharding) before the next one is read.
    """
    found, report = match_keys(state_dict, keymap, expected, source=source)
    flat = {}
    for canon, key in found.items():
        p = keymap.params[canon]
        if progress:
            progress(key)
        a = np.asarray(state_dict[key].numpy())
        if p.to_flax is not None:
            a = p.to_flax(a)
        if dtype is not None and a.dtype != np.dtype(dtype):
            a = a.astype(dtype)
        flat[p.path] = put(p.path, a)
        del a
    unused = sorted(set(expected) - {keymap.params[c].path for c in found})
    if unused:
        raise ConversionError(f"{source}: model params not covered by any checkpoint key: {['/'.join(u) for u in unused[:10]]}")
    return unflatten_tree(flat), report

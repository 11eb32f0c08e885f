"""Shared helpers for the parity cases under tests/parity/ (an unchanged copy of the original cases).

Cases are loaded through the public API only: ``lmzoo.from_pretrained(case_dir)``, ``model(**inputs)``,
``model.generate(...)``, and compared with the rule of tests/parity/README.md.
"""

from __future__ import annotations

import json
import os

import numpy as np

PARITY_DIR = os.path.join(os.path.dirname(__file__), "parity")


def cases(family_prefixes: tuple[str, ...]) -> list[str]:
    return sorted(
        d for d in os.listdir(PARITY_DIR)
        if os.path.isdir(os.path.join(PARITY_DIR, d)) and d.startswith(family_prefixes)
    )


def case_dir(name: str) -> str:
    return os.path.join(PARITY_DIR, name)


def load_npz(name: str, file: str = "inputs.npz") -> dict[str, np.ndarray]:
    with np.load(os.path.join(case_dir(name), file)) as z:
        return {k: z[k] for k in z.files}


def load_generate_records(name: str) -> list[dict]:
    p = os.path.join(case_dir(name), "generate.json")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return json.load(f)


def assert_close(got, want, *, name: str = "", atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Elementwise |got - want| <= atol + rtol*|want| over the whole array (padding included)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != expected {want.shape}"
    diff = np.abs(got - want)
    bad = diff > atol + rtol * np.abs(want)
    if bad.any():
        idx = np.unravel_index(np.argmax(diff - (atol + rtol * np.abs(want))), diff.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {diff.size} elements outside |d| <= {atol} + {rtol}*|want|; "
            f"max |d| = {diff.max():.3g}; worst at {idx}: got {got[idx]!r}, want {want[idx]!r}"
        )
    return float(diff.max())

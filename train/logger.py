"""Where metrics go: a JSONL file (one object per log step), TensorBoard event files, and a progress bar
showing loss, tokens/s and model FLOPs utilisation.

MFU = (FLOPs of one compiled step, from XLA's cost analysis of the per-device program) / step time /
per-device peak FLOP/s. The peak comes from ``loop.peak_flops`` or, for known accelerators, from the table
below (dense bf16); on CPU it is unknown and MFU is left out.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import Mapping, Optional

import jax

__all__ = ["MetricsLogger", "Progress", "peak_flops_per_device"]

PEAK_BF16_FLOPS = {  # device_kind prefix -> dense bf16 FLOP/s per device
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> Optional[float]:
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for prefix, flops in PEAK_BF16_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def _jsonable(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else str(f)


class MetricsLogger:
    """Appends ``{"step": s, "split": ..., name: value}`` lines to ``metrics.jsonl`` (process 0 only)."""

    def __init__(self, out_dir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(out_dir, exist_ok=True)
            self._f = open(self.path, "a", buffering=1)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:  # optional: JSONL is always written
                    SummaryWriter = None
                    warnings.warn("loop.tensorboard is on but tensorboardX is not installed (pip install 'lmzoo[train]'); "
                                  "metrics go to metrics.jsonl only", stacklevel=2)
                if SummaryWriter is not None:
                    self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


class Progress:
    """tqdm bar over optimiser steps with loss, tokens/s and MFU in its postfix."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train"):
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update_to(self, step: int, postfix: Optional[Mapping[str, str]] = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        elif jax.process_index() == 0:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Step timing between log points: tokens/s, step seconds, MFU."""

    def __init__(self, flops_per_step: Optional[float], peak: Optional[float]):
        self.flops, self.peak = flops_per_step, peak
        self.t0, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": self.tokens / dt, "step_s": dt / max(self.steps, 1)}
        if self.flops and self.peak:
            out["mfu"] = self.flops * self.steps / dt / self.peak
        self.t0, self.steps, self.tokens = time.perf_counter(), 0, 0
        return out

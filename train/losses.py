"""Loss pieces shared by the objectives, all in float32 whatever the compute dtype.

Objectives return *sums* plus the count they are normalised by, so gradient accumulation and data
parallelism divide once by the global count and match a single big batch exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_cross_entropy", "binary_cross_entropy_with_logits"]


def token_cross_entropy(logits, labels, weights=None, *, z_loss: float = 0.0, label_smoothing: float = 0.0, ignore_index: int = -100):
    """Per-token cross-entropy sums over positions with ``weights`` (default: labels != ignore_index).

    Returns a dict of float32 sums: ``loss`` (nll [+ smoothing] + z_loss * lse^2), ``nll``, ``z``
    (sum of lse^2), ``correct`` (argmax hits) and ``count`` (sum of weights).
    """
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    w = valid.astype(jnp.float32) if weights is None else weights.astype(jnp.float32) * valid
    safe = jnp.where(valid, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = lse - target
    loss = nll
    if label_smoothing:
        # (1 - eps) * nll + eps * mean_v(-log p_v), torch's label_smoothing rule
        smooth = lse - jnp.mean(logits, axis=-1)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)
    correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
    return {
        "loss": jnp.sum(loss * w),
        "nll": jnp.sum(nll * w),
        "z": jnp.sum(jnp.square(lse) * w),
        "correct": jnp.sum(correct * w),
        "count": jnp.sum(w),
    }


def binary_cross_entropy_with_logits(logits, targets):
    """Elementwise BCE-with-logits in float32 (torch's stable form)."""
    x = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    return jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))

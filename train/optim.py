"""Optimisers and learning-rate schedules (optax).

Schedules take the optimiser's update count (0 for the first update):

* ``constant``      linear warmup to ``lr``, then flat.
* ``linear``        linear warmup, then linear decay to ``end_lr_ratio * lr`` at ``decay_steps``
                    (transformers' ``get_linear_schedule_with_warmup``, as LongLM / LSG-BART fine-tuned).
* ``cosine``        linear warmup, cosine decay to ``end_lr_ratio * lr`` (GLM pretraining).
* ``inverse_sqrt``  fairseq's: linear warmup, then ``lr * sqrt(warmup / step)``.
* ``noam``          PALM's fine-tuning schedule: ``lr * min(s**-0.5, s * warmup**-1.5)`` with s = update + 1
                    (the peak is ``lr / sqrt(warmup)``, as in the original script).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from .config import OptimSection

__all__ = ["make_schedule", "make_optimizer", "decay_mask"]


def make_schedule(o: OptimSection, total_steps: int) -> optax.Schedule:
    lr, w = float(o.lr), int(o.warmup_steps)
    decay = int(o.decay_steps or total_steps)
    end = lr * float(o.end_lr_ratio)

    def warm(step):
        return lr * jnp.minimum(1.0, (step + 1.0) / w) if w > 0 else jnp.asarray(lr, jnp.float32)

    if o.schedule == "constant":
        return lambda step: warm(jnp.asarray(step, jnp.float32))
    if o.schedule == "linear":

        def linear(step):
            s = jnp.asarray(step, jnp.float32)
            frac = jnp.clip((s - w) / max(decay - w, 1), 0.0, 1.0)
            return jnp.where(s < w, warm(s), lr + (end - lr) * frac)

        return linear
    if o.schedule == "cosine":

        def cosine(step):
            s = jnp.asarray(step, jnp.float32)
            frac = jnp.clip((s - w) / max(decay - w, 1), 0.0, 1.0)
            return jnp.where(s < w, warm(s), end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))

        return cosine
    if o.schedule == "inverse_sqrt":

        def inverse_sqrt(step):
            s = jnp.asarray(step, jnp.float32) + 1.0
            return jnp.where(s < w, lr * s / w, lr * jnp.sqrt(w / s))

        return inverse_sqrt
    if o.schedule == "noam":

        def noam(step):
            s = jnp.asarray(step, jnp.float32) + 1.0
            return lr * jnp.minimum(s**-0.5, s * w**-1.5)

        return noam
    raise ValueError(f"unknown schedule {o.schedule!r}")


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings) only: not on norm scales and biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(o: OptimSection, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(o, total_steps)
    parts = []
    if o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    if o.name == "adamw":
        mask = decay_mask if o.no_decay_norms_and_biases else None
        parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask))
    elif o.name == "adafactor":
        # T5's settings: factored second moments, update clipping at 1, relative step scaled by parameter RMS.
        parts.append(optax.adafactor(learning_rate=schedule, weight_decay_rate=o.weight_decay or None))
    else:
        raise ValueError(f"unknown optimizer {o.name!r}")
    return optax.chain(*parts)

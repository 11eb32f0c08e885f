"""COCO-LM pretraining: auxiliary-generator MLM, corrective LM (COPS) and sequence contrastive learning
(SCL), as the released loss skeleton computes them (cocolm spec §1.5).

Layout (numpy): a sample is ``[CLS] x [SEP]``; ``mask_rate`` (15%) of the x positions become ``[MASK]``
(every selected position, ELECTRA-style — no 80/10/10); the SCL view is a contiguous crop of
``scl_crop`` of the original sample at a uniform start, re-padded from position 0.

Loss (jnp), with ``sample_size`` = number of masked positions:
* generator MLM: summed cross-entropy of the generator's logits at the masked positions;
* the masked positions are filled with a multinomial draw from softmax(generator logits) (float32,
  temperature 1, no gradient) — ``replaced`` = draw != original;
* copy loss: mean BCE-with-logits of the main model's binary head over non-pad tokens, target 1 where
  the token is the original, weighted ``binary_weight`` (50) x sample_size;
* corrective LM: summed CE of the CLM head at the masked positions times the detached
  ``1 - sigmoid(binary_logit)``;
* SCL: pooled outputs of the corrupted and the cropped view, L2-normalised, interleaved
  ``[crop_0, corr_0, crop_1, ...]``, similarities / ``scl_temperature`` with the diagonal removed,
  ``0.5 * sum CE`` over the 2B rows, rescaled by sample_size / B, weighted ``scl_weight``.
The total is divided by sample_size (fairseq's normalisation). The model needs the generator, binary,
clm heads and the pooler (``heads=["generator","binary","clm"]``, ``need_pooler=true``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..config import TrainConfigError
from ..losses import binary_cross_entropy_with_logits, token_cross_entropy
from . import Objective, pad_to, register

__all__ = ["CocoLMPretraining", "cocolm_mask", "crop_span"]


def cocolm_mask(sample, rng, *, rate: float, mask_id: int, protect: set):
    """(masked ids, boolean mask) with ``rate`` of the unprotected positions (at least one) masked."""
    sample = np.asarray(sample)
    cand = np.array([i for i, t in enumerate(sample) if int(t) not in protect])
    k = max(1, int(round(rate * len(cand))))
    pos = rng.choice(cand, size=k, replace=False)
    m = np.zeros(len(sample), bool)
    m[pos] = True
    return np.where(m, mask_id, sample), m


def crop_span(sample, rng, frac: float):
    n = len(sample)
    ln = int(frac * n) if frac <= 1 else min(int(frac), n)
    ln = max(1, ln)
    start = int(rng.integers(0, n - ln + 1))
    return list(sample[start : start + ln])


@register
class CocoLMPretraining(Objective):
    name = "cocolm"
    kind = "tokens"
    families = ("cocolm",)
    defaults = {"mask_rate": 0.15, "binary_weight": 50.0, "scl_weight": 1.0, "scl_temperature": 1.0, "scl_crop": 0.9}

    def check(self):
        self.vocab.need("cls", "sep", "mask")
        c = self.model_config
        if c is not None:
            missing = [h for h in ("generator", "binary", "clm") if h not in getattr(c, "heads", ())]
            if missing or not getattr(c, "need_pooler", False):
                raise TrainConfigError(
                    f"COCO-LM pretraining needs the generator, binary and clm heads and the SCL pooler; set "
                    f"model.config.heads=[\"generator\",\"binary\",\"clm\"] and model.config.need_pooler=true (missing: {missing})"
                )

    @property
    def example_len(self) -> int:
        return self.seq_len - 2

    def build(self, examples, rng):
        o, v = self.opts, self.vocab
        protect = {v.cls, v.sep, v.pad}
        orig, masked, crops = [], [], []
        for x in examples:
            s = [v.cls] + [int(t) for t in x] + [v.sep]
            ids, m = cocolm_mask(s, rng, rate=o["mask_rate"], mask_id=v.mask, protect=protect)
            orig.append(s)
            masked.append(ids.tolist())
            crops.append(crop_span(s, rng, o["scl_crop"]))
        S = self.seq_len
        ids = pad_to(orig, S, v.pad)
        mids = pad_to(masked, S, v.pad)
        return {
            "input_ids": ids,
            "masked_ids": mids,
            "attention_mask": (ids != v.pad).astype(np.int32),
            "mlm_mask": (mids == v.mask).astype(np.int32),
            "crop_ids": pad_to(crops, S, v.pad),
            "crop_mask": pad_to([[1] * len(c) for c in crops], S, 0),
        }

    def loss(self, model, params, batch, rng, *, z_loss=0.0):

        o = self.opts
        ids, mids, am = batch["input_ids"], batch["masked_ids"], batch["attention_mask"]
        mm = batch["mlm_mask"].astype(bool)
        sample_size = jnp.maximum(jnp.sum(mm).astype(jnp.float32), 1.0)
        labels = jnp.where(mm, ids, -100)
        gen_logits = model.module.apply({"params": params}, mids, am, method="generator_logits").astype(jnp.float32)
        gen = token_cross_entropy(gen_logits, labels)
        draw = jax.random.categorical(rng, jax.lax.stop_gradient(gen_logits), axis=-1).astype(ids.dtype)
        corrupted = jnp.where(mm, draw, ids)
        replaced = corrupted != ids
        out = model.forward(params, input_ids=corrupted, attention_mask=am)
        binary = out.binary_logits.astype(jnp.float32)
        binary = binary[..., 0] if binary.ndim == 3 else binary
        nonpad = am.astype(jnp.float32)
        bce = binary_cross_entropy_with_logits(binary, (~replaced).astype(jnp.float32))
        binary_loss = jnp.sum(bce * nonpad) / jnp.maximum(jnp.sum(nonpad), 1.0)
        weight = jax.lax.stop_gradient(1.0 - jax.nn.sigmoid(binary))
        clm = token_cross_entropy(out.clm_logits, labels, weights=weight)
        crop = model.forward(params, input_ids=batch["crop_ids"], attention_mask=batch["crop_mask"])
        scl = scl_loss(crop.pooled_output, out.pooled_output, o["scl_temperature"])
        B = ids.shape[0]
        total = gen["loss"] + o["binary_weight"] * binary_loss * sample_size + clm["loss"] + o["scl_weight"] * scl / B * sample_size
        return {
            "loss": total,
            "gen": gen["nll"],
            "binary": binary_loss * sample_size,
            "clm": clm["nll"],
            "scl": scl / B * sample_size,
            "replaced": jnp.sum(replaced & mm).astype(jnp.float32),
            "count": sample_size,
        }

    def num_tokens(self, batch):
        return int(2 * np.sum(batch["attention_mask"]) + np.sum(batch["crop_mask"]))


def scl_loss(crop_pooled, corr_pooled, temperature: float):
    """0.5 * sum over the 2B interleaved rows of CE(sim / tau) with each row's partner as the label."""
    a = crop_pooled.astype(jnp.float32)
    b = corr_pooled.astype(jnp.float32)
    # F.normalize(eps=1e-12) with a gradient that stays finite at a zero vector (the norm's is 0/0 there)
    a = a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), 1e-24))
    b = b * jax.lax.rsqrt(jnp.maximum(jnp.sum(b * b, axis=-1, keepdims=True), 1e-24))
    g = jnp.stack([a, b], axis=1).reshape(-1, a.shape[-1])  # [crop_0, corr_0, crop_1, corr_1, ...]
    sim = g @ g.T / temperature
    n = g.shape[0]
    sim = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, sim)
    partner = jnp.arange(n) ^ 1
    logp = jax.nn.log_softmax(sim, axis=-1)
    return -0.5 * jnp.sum(logp[jnp.arange(n), partner])

"""PALM pretraining: autoencoding (encoder MLM) + autoregressive (context -> continuation) (spec §2.7).

Each example is a contiguous text fragment x. The first ``context_ratio`` (80%) goes to the encoder as
``[CLS] context [SEP]`` — the split is snapped back to the last sentence end (``sentence_end_ids``) in
the second half of that part, as the fairseq re-implementation does — and the decoder learns the rest
as labels ``[CLS] continuation [SEP]`` (PALM's forward reads labels[:, :-1] and predicts labels[:, 1:]).

Autoencoding: ``mask_rate`` (15%) of the context tokens are selected; 80% become ``[MASK]``, 10% a random
token, 10% stay (BERT practice). ``mlm_labels`` holds the original ids there (-100 elsewhere). The loss
uses PALM's own label-smoothed KL sum for the decoder; the MLM term needs an encoder LM head, which the
released PALM 2.0 checkpoint does not have, so it is added only when the model exposes ``mlm_logits``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..config import TrainConfigError
from ..losses import token_cross_entropy
from . import Objective, pad_to, register

__all__ = ["PalmPretraining", "split_context", "bert_mask"]


def split_context(x, ratio: float, ends: set) -> int:
    p = max(1, min(len(x) - 1, int(round(ratio * len(x)))))
    for i in range(p - 1, p // 2 - 1, -1):
        if x[i] in ends:
            return i + 1
    return p


def bert_mask(x, rng, *, rate: float, mask_id: int, vocab_size: int, low: int = 1):
    """(corrupted, labels): ``rate`` of positions selected (at least one), 80/10/10 [MASK]/random/kept."""
    x = np.asarray(x, np.int64)
    n = len(x)
    k = max(1, int(round(rate * n)))
    sel = np.zeros(n, bool)
    sel[rng.choice(n, size=k, replace=False)] = True
    u = rng.random(n)
    out = x.copy()
    out[sel & (u < 0.8)] = mask_id
    rnd = sel & (u >= 0.8) & (u < 0.9)
    out[rnd] = rng.integers(low, vocab_size, size=int(rnd.sum()))
    labels = np.where(sel, x, -100)
    return out.tolist(), labels.tolist()


def palm_decoder_loss(model, params, batch):
    """PALM's own loss (label-smoothed KL, summed) on labels ``[CLS] target [SEP]``, plus the plain NLL,
    normalised by the number of non-pad target tokens. Returns (sums, outputs)."""
    out = model.forward(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    pad = model.config.pad_token_id
    target = batch["labels"][:, 1:]
    valid = target != pad
    logp = out.log_probs.astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logp, axis=-1) == target) & valid
    sums = {
        "loss": out.loss.astype(jnp.float32),
        "nll": jnp.sum(jnp.where(valid, nll, 0.0)),
        "correct": jnp.sum(correct).astype(jnp.float32),
        "count": jnp.sum(valid).astype(jnp.float32),
    }
    return sums, out


@register
class PalmPretraining(Objective):
    name = "palm"
    kind = "tokens"
    families = ("palm",)
    defaults = {"context_ratio": 0.8, "mask_rate": 0.15, "sentence_end_ids": [], "mlm_weight": 1.0}

    def check(self):
        self.vocab.need("cls", "sep", "mask")
        if not 0 < self.opts["context_ratio"] < 1:
            raise TrainConfigError("objective.options.context_ratio must be in (0, 1)")

    @property
    def example_len(self) -> int:
        # the context must fit the encoder and the continuation the decoder
        r = self.opts["context_ratio"]
        return max(4, min(int((self.seq_len - 2) / r), int((self.target_len - 2) / (1 - r))) - 1)

    def build(self, examples, rng):
        o, v = self.opts, self.vocab
        ends = set(int(i) for i in o["sentence_end_ids"])
        srcs, mlm, tgts = [], [], []
        for x in examples:
            x = [int(t) for t in x]
            p = split_context(x, o["context_ratio"], ends)
            ctx, cont = x[:p][: self.seq_len - 2], x[p:][: self.target_len - 2]
            corrupted, labels = bert_mask(ctx, rng, rate=o["mask_rate"], mask_id=v.mask, vocab_size=v.size)
            srcs.append([v.cls] + corrupted + [v.sep])
            mlm.append([-100] + labels + [-100])
            tgts.append([v.cls] + cont + [v.sep])
        return {
            "input_ids": pad_to(srcs, self.seq_len, v.pad),
            "attention_mask": pad_to([[1] * len(s) for s in srcs], self.seq_len, 0),
            "mlm_labels": pad_to(mlm, self.seq_len, -100),
            "labels": pad_to(tgts, self.target_len, v.pad),
        }

    def loss(self, model, params, batch, rng, *, z_loss=0.0):
        sums, out = palm_decoder_loss(model, params, batch)
        mlm_logits = getattr(out, "mlm_logits", None)
        if mlm_logits is not None:
            m = token_cross_entropy(mlm_logits, batch["mlm_labels"])
            sums["loss"] = sums["loss"] + self.opts["mlm_weight"] * m["loss"]
            sums["mlm"] = m["nll"]
        return sums

    def num_tokens(self, batch):
        return int(np.sum(batch["attention_mask"]) + np.sum(np.asarray(batch["labels"]) != self.vocab.pad))

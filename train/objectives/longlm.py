"""LongLM pretraining: T5 span infilling mixed with conditional continuation (LongLM paper, spec §2.3).

Each example is a chunk of raw tokens x (no eos). With probability ``continuation_prob`` it becomes a
continuation example, otherwise an infilling example:

* infilling: ``round(mask_rate * n)`` tokens are masked in spans whose lengths are Poisson(``span_lambda``)
  (zero excluded); spans are placed uniformly with at least one kept token between them. The input keeps
  the text with span j replaced by ``<extra_id_{j+1}>`` — LongLM numbers sentinels from ``<extra_id_1>``;
  the target is each span preceded by its sentinel, in text order.
* continuation: x is split at a uniform point p in [1, n-1]; input = ``x[:p] <extra_id_1>``, target =
  ``<extra_id_1> x[p:]`` (cut to the target length).

Every input and target ends with ``</s>`` as T5Tokenizer appends it. The decoder is fed the labels
shifted right behind ``decoder_start_token_id`` (LongLM: 1, the ``<s>`` its pipeline started targets
with). Loss: token cross-entropy over the target (float32), padded label positions are -100.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import TrainConfigError
from . import Objective, pad_to, place_spans, poisson_span_lengths, register
from .sft import seq2seq_loss

__all__ = ["LongLMPretraining", "span_infilling", "continuation"]


def span_infilling(x: Sequence[int], rng: np.random.Generator, *, mask_rate: float, span_lambda: float, sentinels: Sequence[int], first_sentinel: int = 1):
    """(inputs, targets, spans) for one example; spans are (start, length) in text order. No eos."""
    x = list(x)
    n = len(x)
    num_noise = min(max(int(round(mask_rate * n)), 1), n - 1)
    lengths = poisson_span_lengths(rng, num_noise, span_lambda)
    while len(lengths) > n - num_noise:  # too many spans for the gaps: merge the last two
        lengths[-2] += lengths.pop()
    starts = place_spans(rng, n, lengths, min_gap=1)
    inputs, targets, pos = [], [], 0
    for j, (s, ln) in enumerate(zip(starts, lengths)):
        sentinel = sentinels[first_sentinel + j]
        inputs += x[pos:s] + [sentinel]
        targets += [sentinel] + x[s : s + ln]
        pos = s + ln
    inputs += x[pos:]
    return inputs, targets, list(zip(starts, lengths))


def continuation(x: Sequence[int], rng: np.random.Generator, *, marker: int):
    """(inputs, targets, split point): front part + marker -> marker + back part. No eos."""
    x = list(x)
    p = int(rng.integers(1, len(x)))
    return x[:p] + [marker], [marker] + x[p:], p


@register
class LongLMPretraining(Objective):
    name = "longlm"
    kind = "tokens"
    families = ("t5",)
    defaults = {
        "mask_rate": 0.15,
        "span_lambda": 3.0,
        "continuation_prob": 0.5,
        "first_sentinel": 1,
        "decoder_start_token_id": 1,
    }

    def check(self):
        o, v = self.opts, self.vocab
        v.need("eos")
        if not 0 < o["mask_rate"] < 1:
            raise TrainConfigError(f"objective.options.mask_rate must be in (0, 1), got {o['mask_rate']}")
        if not 0 <= o["continuation_prob"] <= 1:
            raise TrainConfigError("objective.options.continuation_prob must be in [0, 1]")
        n = self.example_len
        max_spans = int(round(o["mask_rate"] * n))
        if len(v.sentinels) < o["first_sentinel"] + max_spans:
            raise TrainConfigError(
                f"the tokenizer has {len(v.sentinels)} sentinels; {max_spans} spans from <extra_id_{o['first_sentinel']}> need more"
            )
        need = 2 * max_spans + 1 if o["continuation_prob"] < 1 else 2
        if self.target_len < need:
            raise TrainConfigError(f"data.target_len {self.target_len} is too short: infilling targets of {n}-token chunks need {need}")

    @property
    def example_len(self) -> int:
        return self.seq_len - 1  # room for </s>; infilling only shortens the input

    def _example(self, x, rng):
        o, v = self.opts, self.vocab
        if rng.random() < o["continuation_prob"]:
            i, t, _ = continuation(x, rng, marker=v.sentinel(o["first_sentinel"]))
            cont = 1
        else:
            i, t, _ = span_infilling(
                x, rng, mask_rate=o["mask_rate"], span_lambda=o["span_lambda"], sentinels=v.sentinels, first_sentinel=o["first_sentinel"]
            )
            cont = 0
        return i[: self.seq_len - 1] + [v.eos], (t + [v.eos])[: self.target_len], cont

    def build(self, examples, rng):
        inputs, targets, is_cont = zip(*(self._example(x, rng) for x in examples))
        return seq2seq_arrays(inputs, targets, self.seq_len, self.target_len, self.vocab.pad, self.decoder_start(), task=is_cont)

    # -- packing: chunks of one document each, several per row ------------------------------------
    def pack_refusal(self):
        return ""

    def example(self, x, rng):
        return self._example(x, rng)[:2]

    def decoder_start(self):
        return int(self.opts["decoder_start_token_id"])

    def pack_lengths(self, x):
        """Input: at most n + 1 (continuation: front + marker + </s>; infilling only shortens). Target:
        infilling's k spans of m masked tokens need k + m + 1 <= 2m + 1; a continuation target (up to
        n + 1) gets the room an unpacked row gives per input token, ``target_len * (n + 1) / seq_len``, and
        is cut there as an unpacked row cuts it at ``target_len``."""
        o, n = self.opts, len(x)
        m = min(max(int(round(o["mask_rate"] * n)), 1), n - 1)
        share = -(-self.target_len * (n + 1) // self.seq_len)
        dec = max(min(n + 1, share) if o["continuation_prob"] > 0 else 0, 2 * m + 1 if o["continuation_prob"] < 1 else 0)
        return min(n + 1, self.seq_len), min(dec, self.target_len)

    def loss(self, model, params, batch, rng, *, z_loss=0.0):
        return seq2seq_loss(model, params, batch, z_loss=z_loss)


def seq2seq_arrays(inputs, targets, seq_len, target_len, pad, start, task=None):
    """The encoder-decoder batch: input_ids / attention_mask, labels (-100 on padding), and
    decoder_input_ids = labels shifted right behind ``start`` (pad where labels are padding)."""
    input_ids = pad_to(inputs, seq_len, pad)
    labels = pad_to(targets, target_len, -100)
    dec = np.full_like(labels, pad)
    dec[:, 0] = start
    dec[:, 1:] = np.where(labels[:, :-1] == -100, pad, labels[:, :-1])
    out = {
        "input_ids": input_ids,
        "attention_mask": (np.arange(seq_len)[None] < np.array([len(s) for s in inputs])[:, None]).astype(np.int32),
        "decoder_input_ids": dec,
        "labels": labels,
    }
    if task is not None:
        out["task"] = np.asarray(task, np.int32)
    return out

"""BART denoising: sentence permutation + text infilling (fairseq ``DenoisingDataset``, bart.large settings).

LSG-BART itself was not pretrained (it is BART converted to LSG attention and fine-tuned as seq2seq, see
``sft.py``); this objective continues BART-style pretraining for BART / LSG-BART models.

Per example x (no specials): sentences (runs ending in a ``full_stop_ids`` token) are all permuted;
then ``ceil(mask_ratio * n)`` tokens are masked in spans with Poisson(``poisson_lambda``) lengths (zero
allowed: a zero-length span inserts a mask), span starts uniform without replacement, overlapping spans
merging; each masked run becomes one ``<mask>`` (``replace_length = 1``), or with ``mask_random`` a random
token. Source = ``<s> noised </s>``, labels = ``<s> x </s>`` (the original order), decoder input = labels
shifted right behind ``decoder_start_token_id`` (``</s>`` for BART). Every token is treated as a word
start (fairseq masks whole GPT-2 words; word boundaries are not known to a generic tokenizer).
"""

from __future__ import annotations

import math

import numpy as np

from . import Objective, register
from .sft import seq2seq_loss

__all__ = ["BartDenoising", "permute_sentences", "text_infilling"]


def permute_sentences(x, rng, full_stops: set):
    sents, start = [], 0
    for i, t in enumerate(x):
        if t in full_stops:
            sents.append(list(x[start : i + 1]))
            start = i + 1
    if start < len(x):
        sents.append(list(x[start:]))
    order = rng.permutation(len(sents))
    return [t for i in order for t in sents[i]]


def text_infilling(x, rng, *, mask_ratio: float, lam: float, mask_id: int, vocab_size: int, mask_random: float, low: int = 4):
    """(noised tokens, number of tokens masked)."""
    x = list(x)
    n = len(x)
    num = int(math.ceil(mask_ratio * n))
    if num == 0:
        return x, 0
    lengths = []
    while sum(lengths) < num:
        lengths.append(int(rng.poisson(lam)))
    lengths[-1] -= sum(lengths) - num
    spans = [ln for ln in lengths if ln > 0]
    inserts = len(lengths) - len(spans)
    masked = np.zeros(n, bool)
    starts = rng.choice(n, size=min(len(spans), n), replace=False)
    for s, ln in zip(starts, spans):
        masked[s : s + ln] = True
    out = []
    for i in range(n):
        if masked[i] and i > 0 and masked[i - 1]:
            continue  # replace_length = 1: a run of masked tokens becomes one token
        if masked[i]:
            out.append(int(rng.integers(low, vocab_size)) if rng.random() < mask_random else mask_id)
        else:
            out.append(x[i])
    for _ in range(inserts):  # zero-length spans: insert a mask at a random position
        p = int(rng.integers(0, len(out) + 1))
        out.insert(p, int(rng.integers(low, vocab_size)) if rng.random() < mask_random else mask_id)
    return out, int(masked.sum())


@register
class BartDenoising(Objective):
    name = "bart"
    kind = "tokens"
    families = ("bart", "lsg_bart")
    defaults = {
        "mask_ratio": 0.3,
        "poisson_lambda": 3.5,
        "mask_random": 0.1,
        "permute_sentences": 1.0,
        "full_stop_ids": [],
        "decoder_start_token_id": None,
    }

    def check(self):
        self.vocab.need("bos", "eos", "mask")

    @property
    def example_len(self) -> int:
        return min(self.seq_len, self.target_len) - 2

    def decoder_start(self) -> int:
        start = self.opts["decoder_start_token_id"]
        if start is None:
            start = getattr(self.model_config, "decoder_start_token_id", None)
        return int(self.vocab.eos if start is None else start)

    def example(self, x, rng):
        o, v = self.opts, self.vocab
        stops = set(int(i) for i in o["full_stop_ids"])
        x = [int(t) for t in x]
        src = permute_sentences(x, rng, stops) if stops and rng.random() < o["permute_sentences"] else list(x)
        src, _ = text_infilling(src, rng, mask_ratio=o["mask_ratio"], lam=o["poisson_lambda"], mask_id=v.mask,
                                vocab_size=v.size, mask_random=o["mask_random"])
        return ([v.bos] + src)[: self.seq_len - 1] + [v.eos], [v.bos] + x + [v.eos]

    def build(self, examples, rng):
        from .longlm import seq2seq_arrays

        inputs, targets = zip(*(self.example(x, rng) for x in examples))
        return seq2seq_arrays(inputs, targets, self.seq_len, self.target_len, self.vocab.pad, self.decoder_start())

    # -- packing: chunks of one document each, several per row (plain BART) ------------------------
    def pack_refusal(self):
        return _lsg_refusal(self.family)

    def pack_lengths(self, x):
        """``<s> x </s>`` on both sides: infilling collapses each masked span to one token (a zero-length
        span inserts one, rarely beyond n: such an input is cut to n + 2, as rows are cut at seq_len)."""
        n = len(x) + 2
        return min(n, self.seq_len), min(n, self.target_len)

    def loss(self, model, params, batch, rng, *, z_loss=0.0):
        return seq2seq_loss(model, params, batch, z_loss=z_loss)


def _lsg_refusal(family: str) -> str:
    if family == "lsg_bart":
        return ("LSG-BART's encoder global tokens attend to and are seen by every token of a row, which would mix "
                "packed examples (pack plain BART models)")
    return ""

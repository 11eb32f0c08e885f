"""GLM autoregressive blank infilling (``blocklm_utils.ConstructBlockStrategy``, glm spec §3 and §8).

A sample is ``[CLS] tokens`` (documents in the token stream are separated by eos). One mode is drawn
per batch: with ``bert_prob`` token-level spans, with ``gap_sentence_prob`` whole sentences, else a
document-level span (``gpt``):

* token level: span lengths ~ Poisson(3) restricted to 1..39, drawn until they cover
  ``floor(0.15 * len)`` (not cut), placed uniformly with >= 1 kept token between spans; mask ``[MASK]``;
  with ``block_mask_prob`` each Part-B input token (not sop) becomes ``[dBLOCK]``;
* sentence level: sentences end at a ``sentence_end_ids`` token (or eos); they are shuffled and taken
  until ``floor(0.15 * len)`` tokens are covered; mask ``[sMASK]`` (task-mask models) else ``[MASK]``;
* document level: ``gen_len = randint(floor(gpt_min_ratio * len), len - 2)``; with ``gpt_infill_prob``
  suffix generation ``prefix [gMASK] [sop] suffix[:-1]`` with targets = suffix (no eop, block ids of
  gMASK 0, sop 1, then 2, 3, ...), else one span of gen_len at a random place in the block layout.

Block layout (``make_block_data``): Part A = the text with each span replaced by its mask token at
positions 0, 1, ...; Part B = the spans in a shuffled order, each ``[sop] span`` as input and
``span [eop]`` as target, at the position of its mask token with block positions 1..L+1; loss on Part B
only; ``attention_mask`` = sep = len(Part A) (bidirectional A, causal B). Loss: cross-entropy summed over
the loss mask, divided by its count (``pretrain_glm.forward_step``). Differences from the original:
spans are placed over the whole sample rather than per document inside it, and the per-batch
``short_seq_prob`` splitting is not done.
"""

from __future__ import annotations

import numpy as np

from ..config import TrainConfigError
from ..losses import token_cross_entropy
from . import Objective, pad_to, place_spans, poisson_span_lengths, register

__all__ = ["GLMBlankInfilling", "make_block_data"]


def make_block_data(tokens, spans, mask_ids, rng, *, sop, eop, dblock=None, block_mask_prob=0.0, shuffle=True):
    """The two-part layout for ``spans`` [(start, end)] of ``tokens`` (sorted, disjoint), each masked with
    ``mask_ids[i]``. Returns (input_ids, targets, loss_mask, position_ids, block_position_ids, sep)."""
    tokens = list(tokens)
    a_ids, _a_pos, mask_pos, pos = [], [], [], 0
    for (s, e), m in zip(spans, mask_ids):
        a_ids += tokens[pos:s]
        mask_pos.append(len(a_ids))
        a_ids.append(m)
        pos = e
    a_ids += tokens[pos:]
    sep = len(a_ids)
    ids, tgt = list(a_ids), list(a_ids)
    loss, p1, p2 = [0] * sep, list(range(sep)), [0] * sep
    order = rng.permutation(len(spans)) if shuffle else np.arange(len(spans))
    for i in order:
        s, e = spans[i]
        span = tokens[s:e]
        inp = [sop] + span
        if dblock is not None and block_mask_prob > 0:
            inp = [sop] + [dblock if rng.random() < block_mask_prob else t for t in span]
        ids += inp
        tgt += span + [eop]
        loss += [1] * (len(span) + 1)
        p1 += [mask_pos[i]] * (len(span) + 1)
        p2 += list(range(1, len(span) + 2))
    return ids, tgt, loss, p1, p2, sep


def _sentences(tokens, ends: set) -> list[tuple[int, int]]:
    out, start = [], 1  # position 0 is [CLS]
    for i in range(1, len(tokens)):
        if tokens[i] in ends:
            out.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        out.append((start, len(tokens)))
    return out


@register
class GLMBlankInfilling(Objective):
    name = "glm"
    kind = "tokens"
    families = ("glm",)
    defaults = {
        "bert_prob": 1.0,
        "gap_sentence_prob": 0.0,
        "gpt_min_ratio": 0.5,
        "gpt_infill_prob": 0.5,
        "mask_ratio": 0.15,
        "gap_sentence_ratio": 0.15,
        "avg_block_length": 3.0,
        "max_block_length": 39,
        "block_mask_prob": 0.0,
        "task_mask": False,
        "sentence_end_ids": [],
    }

    def check(self):
        v = self.vocab
        v.need("cls", "mask", "sop", "eop")
        if self.opts["task_mask"]:
            v.need("gmask", "smask")
        if self.opts["block_mask_prob"] > 0:
            v.need("dblock")
        if self.opts["bert_prob"] + self.opts["gap_sentence_prob"] > 1:
            raise TrainConfigError("objective.options: bert_prob + gap_sentence_prob must be <= 1")
        if self.example_len < 8:
            raise TrainConfigError(f"data.seq_len {self.seq_len} is too short for GLM blank infilling")

    @property
    def doc_separator(self):
        return self.vocab.eos

    @property
    def example_len(self) -> int:
        # [CLS] + n tokens + 2 per span (mask in A, sop/eop in B); at most floor(0.15 n) + 1 spans
        r = max(self.opts["mask_ratio"], self.opts["gap_sentence_ratio"])
        n = self.seq_len
        while n > 0 and n + 1 + 2 * (int(r * n) + 1) > self.seq_len:
            n -= 1
        return n

    def _token_spans(self, sample, rng):
        o = self.opts
        n = len(sample) - 1  # spans stay off [CLS]
        for _ in range(100):  # the original drops a sample whose spans do not fit; we redraw
            lengths = poisson_span_lengths(rng, int(o["mask_ratio"] * len(sample)), o["avg_block_length"], o["max_block_length"], cut=False)
            if sum(lengths) + len(lengths) - 1 <= n:
                starts = place_spans(rng, n, lengths, min_gap=1)
                return [(s + 1, s + 1 + ln) for s, ln in zip(starts, lengths)]
        raise ValueError(f"cannot place {o['mask_ratio']:.0%} of a {n}-token sample in Poisson spans")

    def _sentence_spans(self, sample, rng):
        o, v = self.opts, self.vocab
        ends = set(int(i) for i in o["sentence_end_ids"]) | ({v.eos} if v.eos is not None else set())
        sents = _sentences(sample, ends)
        need = int(o["gap_sentence_ratio"] * len(sample))
        picked, covered = [], 0
        for i in rng.permutation(len(sents)):
            if covered >= need:
                break
            picked.append(sents[i])
            covered += sents[i][1] - sents[i][0]
        return sorted(picked)

    def build(self, examples, rng):
        o, v = self.opts, self.vocab
        mask, smask, gmask = v.mask, (v.id("smask") if o["task_mask"] else v.mask), (v.id("gmask") if o["task_mask"] else v.mask)
        sop, eop = v.id("sop"), v.id("eop")
        dblock = v.extra.get("dblock")
        r = rng.random()
        mode = "token" if r < o["bert_prob"] else "sentence" if r < o["bert_prob"] + o["gap_sentence_prob"] else "doc"
        samples = [[v.cls] + [int(t) for t in x] for x in examples]
        if mode == "doc":
            L = min(len(s) for s in samples)
            gen_len = int(rng.integers(int(o["gpt_min_ratio"] * L), L - 2 + 1))
        rows = []
        for s in samples:
            if mode == "token":
                spans = self._token_spans(s, rng)
                rows.append(make_block_data(s, spans, [mask] * len(spans), rng, sop=sop, eop=eop, dblock=dblock, block_mask_prob=o["block_mask_prob"]))
            elif mode == "sentence":
                spans = self._sentence_spans(s, rng)
                rows.append(make_block_data(s, spans, [smask] * len(spans), rng, sop=sop, eop=eop))
            else:
                g = min(gen_len, len(s) - 2)
                if rng.random() < o["gpt_infill_prob"]:
                    rows.append(self._suffix(s, g, gmask, sop))
                else:
                    start = int(rng.integers(1, len(s) - g + 1))
                    rows.append(make_block_data(s, [(start, start + g)], [gmask], rng, sop=sop, eop=eop))
        S = self.seq_len
        ids = pad_to([r[0] for r in rows], S, v.pad)
        labels = pad_to([r[1] for r in rows], S, -100)
        loss_mask = pad_to([r[2] for r in rows], S, 0)
        pos = np.stack([pad_to([r[3] for r in rows], S, 0), pad_to([r[4] for r in rows], S, 0)], axis=1)
        return {
            "input_ids": ids,
            "labels": np.where(loss_mask > 0, labels, -100).astype(np.int32),
            "loss_mask": loss_mask,
            "position_ids": pos.astype(np.int32),
            "attention_mask": np.asarray([r[5] for r in rows], np.int32),
        }

    @staticmethod
    def _suffix(s, g, gmask, sop):
        prefix, suffix = s[: len(s) - g], s[len(s) - g :]
        ids = prefix + [gmask, sop] + suffix[:-1]
        sep = len(prefix) + 1
        tgt = prefix + [gmask] + suffix
        loss = [0] * sep + [1] * len(suffix)
        p1 = list(range(sep)) + [sep - 1] * len(suffix)
        p2 = [0] * sep + list(range(1, len(suffix) + 1))
        return ids, tgt, loss, p1, p2, sep

    def loss(self, model, params, batch, rng, *, z_loss=0.0):
        out = model.forward(params, input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        return token_cross_entropy(out.logits, batch["labels"], batch["loss_mask"], z_loss=z_loss)

    def num_tokens(self, batch):
        return int(np.sum(np.asarray(batch["input_ids"]) != self.vocab.pad))

"""Supervised fine-tuning as the model cards run it.

* ``seq2seq`` — summarisation / question generation / data-to-text (LongLM, LSG-BART, PALM): encoder
  reads ``source </s>``, the decoder learns ``target </s>`` behind ``decoder_start_token_id``
  (default: the model config's). Loss: token cross-entropy, optional label smoothing.
* ``classification`` — GLUE-style (COCO-LM): ``[CLS] a [SEP] (b [SEP])``, cross-entropy over the classes,
  or MSE when there is one output (STS-B), as the HF heads compute it.
* ``span_extraction`` — SQuAD-style (COCO-LM): ``[CLS] question [SEP] context [SEP]``; start / end targets
  index the context tokens (the [CLS] position means "no answer", SQuAD 2.0); loss
  0.5 * (CE(start) + CE(end)).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..config import TrainConfigError
from ..losses import token_cross_entropy
from . import Objective, pad_to, register

__all__ = ["Seq2SeqFineTuning", "Classification", "SpanExtraction", "seq2seq_loss"]


def seq2seq_loss(model, params, batch, *, z_loss=0.0, label_smoothing=0.0):
    out = model.forward(
        params,
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        **packed_kwargs(model, batch),
    )
    return token_cross_entropy(out.logits, batch["labels"], z_loss=z_loss, label_smoothing=label_smoothing)


def packed_kwargs(model, batch) -> dict:
    """The packed-row inputs of a batch (``lmzoo.train.packing``) that ``model.forward`` takes: segment ids
    always, per-segment positions where positions are learned (BART; T5's relative bias needs none)."""
    import inspect

    from ..packing import PACKED_KEYS

    takes = inspect.signature(model.forward).parameters
    return {k: batch[k] for k in PACKED_KEYS if k in batch and k in takes}


@register
class Seq2SeqFineTuning(Objective):
    name = "seq2seq"
    kind = "pairs"
    families = ("t5", "bart", "lsg_bart", "palm")
    defaults = {"decoder_start_token_id": None, "label_smoothing": 0.0}

    def check(self):
        self.vocab.need("eos")

    def build(self, examples, rng):
        from .longlm import seq2seq_arrays

        v = self.vocab
        if self._is_palm:  # PALM's forward takes labels [CLS] target [SEP] and shifts them itself
            c = self.model_config
            srcs = [[c.bos_token_id] + list(s)[: self.seq_len - 2] + [c.eos_token_id] for s, _ in examples]
            tgts = [[c.bos_token_id] + list(t)[: self.target_len - 2] + [c.eos_token_id] for _, t in examples]
            return {
                "input_ids": pad_to(srcs, self.seq_len, c.pad_token_id),
                "attention_mask": pad_to([[1] * len(r) for r in srcs], self.seq_len, 0),
                "labels": pad_to(tgts, self.target_len, c.pad_token_id),
            }
        inputs, targets = zip(*(self.example(x, rng) for x in examples))
        return seq2seq_arrays(inputs, targets, self.seq_len, self.target_len, v.pad, self.decoder_start())

    def decoder_start(self) -> int:
        start = self.opts["decoder_start_token_id"]
        if start is None:
            start = getattr(self.model_config, "decoder_start_token_id", None)
        if start is None:
            raise TrainConfigError("seq2seq: set objective.options.decoder_start_token_id (the model config has none)")
        return int(start)

    def example(self, x, rng):
        s, t = x
        return list(s)[: self.seq_len - 1] + [self.vocab.eos], (list(t) + [self.vocab.eos])[: self.target_len]

    # -- packing: several (source, target) pairs per row (T5, BART) ----------------------------------
    def pack_refusal(self):
        from .bart import _lsg_refusal

        if self._is_palm:
            return "PALM's forward shifts its labels itself and takes no segment ids"
        return _lsg_refusal(self.family)

    def pack_lengths(self, x):
        s, t = x
        return min(len(s) + 1, self.seq_len), min(len(t) + 1, self.target_len)

    @property
    def _is_palm(self) -> bool:
        return getattr(self.model_config, "family", "") == "palm"

    def loss(self, model, params, batch, rng, *, z_loss=0.0):
        if self._is_palm:
            from .palm import palm_decoder_loss

            return palm_decoder_loss(model, params, batch)[0]
        return seq2seq_loss(model, params, batch, z_loss=z_loss, label_smoothing=self.opts["label_smoothing"])

    def num_tokens(self, batch):
        if self._is_palm:
            return int(np.sum(batch["attention_mask"]) + np.sum(np.asarray(batch["labels"]) != self.model_config.pad_token_id))
        return super().num_tokens(batch)


def encode_pair(a, b, cls_id, sep_id, max_len):
    """``[CLS] a [SEP] (b [SEP])`` with token types 0 / 1, truncating the longer part first."""
    a, b = list(a), (list(b) if b is not None else None)
    budget = max_len - (3 if b is not None else 2)
    while len(a) + (len(b) if b else 0) > budget:
        if b and len(b) >= len(a):
            b.pop()
        else:
            a.pop()
    ids = [cls_id] + a + [sep_id]
    types = [0] * len(ids)
    if b is not None:
        ids += b + [sep_id]
        types += [1] * (len(b) + 1)
    return ids, types


@register
class Classification(Objective):
    name = "classification"
    kind = "labels"
    families = ("cocolm",)
    defaults = {"num_labels": 2}

    def check(self):
        self.vocab.need("cls", "sep")

    def build(self, examples, rng):
        v = self.vocab
        rows, types, labels = [], [], []
        for (a, b), y in examples:
            ids, tt = encode_pair(a, b, v.cls, v.sep, self.seq_len)
            rows.append(ids)
            types.append(tt)
            labels.append(y)
        dtype = np.float32 if self.opts["num_labels"] == 1 else np.int32
        return {
            "input_ids": pad_to(rows, self.seq_len, v.pad),
            "attention_mask": pad_to([[1] * len(r) for r in rows], self.seq_len, 0),
            "token_type_ids": pad_to(types, self.seq_len, 0),
            "labels": np.asarray(labels, dtype),
        }

    def loss(self, model, params, batch, rng, *, z_loss=0.0):
        out = model.forward(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits.astype(jnp.float32)
        y = batch["labels"]
        if self.opts["num_labels"] == 1:
            err = jnp.square(logits[:, 0] - y)
            return {"loss": jnp.sum(err), "mse": jnp.sum(err), "count": jnp.asarray(y.shape[0], jnp.float32)}
        return token_cross_entropy(logits, y, z_loss=z_loss)


@register
class SpanExtraction(Objective):
    name = "span_extraction"
    kind = "spans"
    families = ("cocolm",)
    defaults = {}

    def check(self):
        self.vocab.need("cls", "sep")

    def build(self, examples, rng):
        v = self.vocab
        rows, types, starts, ends = [], [], [], []
        for q, c, (s, e) in examples:
            q = list(q)[: self.seq_len // 4]
            c = list(c)[: self.seq_len - len(q) - 3]
            ids, tt = encode_pair(q, c, v.cls, v.sep, self.seq_len)
            off = len(q) + 2  # context starts after [CLS] q [SEP]
            if s < 0 or e >= len(c):  # no answer, or the answer was cut away: point at [CLS]
                s_, e_ = 0, 0
            else:
                s_, e_ = s + off, e + off
            rows.append(ids)
            types.append(tt)
            starts.append(s_)
            ends.append(e_)
        return {
            "input_ids": pad_to(rows, self.seq_len, v.pad),
            "attention_mask": pad_to([[1] * len(r) for r in rows], self.seq_len, 0),
            "token_type_ids": pad_to(types, self.seq_len, 0),
            "start_positions": np.asarray(starts, np.int32),
            "end_positions": np.asarray(ends, np.int32),
        }

    def loss(self, model, params, batch, rng, *, z_loss=0.0):
        out = model.forward(params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s = token_cross_entropy(out.start_logits, batch["start_positions"])
        e = token_cross_entropy(out.end_logits, batch["end_positions"])
        return {"loss": 0.5 * (s["loss"] + e["loss"]), "nll": 0.5 * (s["nll"] + e["nll"]), "count": s["count"]}

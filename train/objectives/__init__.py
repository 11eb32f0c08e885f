"""Training objectives, one file per family (plus supervised fine-tuning), each in two halves:

* ``build(examples, rng) -> dict[str, np.ndarray]``: the batch layout, in numpy, seeded, with fixed
  shapes — exactly as the original pipeline lays it out (see each file's docstring);
* ``loss(model, params, batch, rng, z_loss) -> dict`` of float32 *sums* with a ``count`` to divide by,
  computed with the model's pure ``forward``.

Encoder-decoder objectives that can pack (``data.pack``: longlm, seq2seq and bart on T5 / BART) also
give ``example(x, rng) -> (inputs, targets)`` for one example and ``pack_lengths(x)``, the upper bounds
of its built lengths; ``build_packed`` lays groups of them out as packed rows (``lmzoo.train.packing``).

``OBJECTIVES`` maps config names to classes; the loader feeds each the kind of example it asks for.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..config import DataSection, TrainConfigError
from ..tokenizer import Vocab

__all__ = ["Objective", "OBJECTIVES", "make_objective", "pad_to", "register"]


class Objective:
    """Base class. ``kind`` says what the loader hands ``build``:

    ``tokens`` — 1-D int arrays of ``example_len`` raw tokens cut from the corpus (pretraining);
    ``pairs``  — (source ids, target ids) from jsonl ``source`` / ``target`` fields;
    ``labels`` — (ids of text [+ text pair], label) for classification;
    ``spans``  — (question ids, context ids, answer start/end in context tokens or -1) for extraction.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "tokens"
    families: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, vocab: Vocab, data: DataSection, options: Mapping[str, Any] | None = None, model_config=None):
        self.model_config = model_config
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TrainConfigError(
                f"objective {self.name!r}: unknown options {unknown}; known: {sorted(self.defaults) or 'none'}"
            )
        self.opts = {**self.defaults, **options}
        self.vocab = vocab
        self.seq_len = data.seq_len
        self.target_len = data.target_len
        self.pack = bool(getattr(data, "pack", False))
        self.check()
        if self.pack:
            reason = self.pack_refusal()
            if reason:
                raise TrainConfigError(f"data.pack=true: objective {self.name!r} cannot pack rows: {reason}")

    def check(self) -> None:
        """Validate options against the lengths (raise TrainConfigError)."""

    @property
    def example_len(self) -> int:
        """Raw tokens per ``tokens`` example."""
        return self.seq_len

    def build(self, examples: Sequence[Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def loss(self, model, params, batch, rng, *, z_loss: float = 0.0) -> dict:
        raise NotImplementedError

    # -- packing (data.pack) ---------------------------------------------------------------------
    def pack_refusal(self) -> str:
        """Why this objective cannot pack rows ("" when it can)."""
        return ("it lays out one example per row (packing with segment ids is implemented for the encoder-decoder "
                "objectives longlm, seq2seq and bart on T5 / BART models)")

    @property
    def family(self) -> str:
        return getattr(self.model_config, "family", "")

    def example(self, x, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """(inputs, targets) of one example, as ``build`` lays it out in an unpacked row."""
        raise NotImplementedError

    def pack_lengths(self, x) -> tuple[int, int]:
        """Upper bounds of ``example(x, .)``'s (input, target) lengths: the room a packed row keeps for it."""
        raise NotImplementedError

    def decoder_start(self) -> int:
        raise NotImplementedError

    def build_packed(self, groups: Sequence[Sequence[Any]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One packed row per group (see ``lmzoo.train.packing``). An example longer than its budget (a
        rare worst case of the noise) is cut to it as the unpacked layout cuts at the row length."""
        from ..packing import packed_seq2seq_arrays

        rows = []
        for group in groups:
            row = []
            for x in group:
                inputs, targets = self.example(x, rng)
                e, d = self.pack_lengths(x)
                if len(inputs) > e:
                    inputs = list(inputs[: e - 1]) + [inputs[-1]]  # keep the closing </s>
                row.append((inputs, list(targets[:d])))
            rows.append(row)
        return packed_seq2seq_arrays(rows, self.seq_len, self.target_len, self.vocab.pad, self.decoder_start())

    def num_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Tokens processed for a batch (for tokens/s): non-pad encoder + decoder positions."""
        n = 0
        for key in ("attention_mask", "decoder_attention_mask"):
            if key in batch and np.ndim(batch[key]) == 2:
                n += int(np.sum(batch[key]))
        if "labels" in batch and "decoder_attention_mask" not in batch:
            n += int(np.sum(np.asarray(batch["labels"]) != -100))
        return n


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls


def make_objective(name: str, vocab: Vocab, data: DataSection, options: Mapping[str, Any] | None = None, model_config=None) -> Objective:
    _load_all()
    if name not in OBJECTIVES:
        raise TrainConfigError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](vocab, data, options, model_config=model_config)


def _load_all() -> None:
    import importlib

    for name in _MODULES:  # registration side effects
        importlib.import_module(f"{__name__}.{name}")


_MODULES = ("longlm", "sft", "glm", "bart", "palm", "cocolm")


def pad_to(seqs: Sequence[Sequence[int]], length: int, value: int, dtype=np.int32) -> np.ndarray:
    """Stack right-padded rows; a row longer than ``length`` is an error (layouts must fit)."""
    out = np.full((len(seqs), length), value, dtype)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"row {i} has {len(s)} tokens, more than the layout length {length}")
        out[i, : len(s)] = s
    return out


def poisson_span_lengths(rng: np.random.Generator, total: int, lam: float, max_len: int | None = None, *, cut: bool = True) -> list[int]:
    """Span lengths ~ Poisson(lam) restricted to >= 1 (and <= max_len), drawn until they cover
    ``total`` tokens; with ``cut`` the last span is shortened so they sum to exactly ``total``."""
    ks = np.arange(1, (max_len or max(40, int(lam * 10))) + 1)
    logp = ks * np.log(lam) - lam - np.cumsum(np.log(ks))
    p = np.exp(logp - logp.max())
    p /= p.sum()
    out: list[int] = []
    while sum(out) < total:
        out.append(int(rng.choice(ks, p=p)))
    if cut and out:
        out[-1] -= sum(out) - total
    return [s for s in out if s > 0]


def place_spans(rng: np.random.Generator, n: int, lengths: Sequence[int], min_gap: int = 1) -> list[int]:
    """Uniformly random starts for spans of ``lengths`` (in the given order) in a text of n tokens,
    with at least ``min_gap`` unmasked tokens between consecutive spans. Returns the starts."""
    k = len(lengths)
    free = n - sum(lengths) - min_gap * max(k - 1, 0)
    if free < 0:
        raise ValueError(f"{k} spans of {sum(lengths)} tokens do not fit in {n} tokens")
    # stars and bars: k+1 gaps summing to `free`, each >= 0, uniformly over compositions
    cuts = np.sort(rng.choice(free + k, size=k, replace=False)) if k else np.zeros(0, np.int64)
    gaps = np.diff(np.concatenate([[-1], cuts])) - 1  # the first k gaps
    starts, pos = [], 0
    for i, (g, ln) in enumerate(zip(gaps, lengths)):
        pos += int(g) + (min_gap if i > 0 else 0)
        starts.append(pos)
        pos += ln
    return starts

"""BART's byte-level BPE tokenizer (GPT-2 ``vocab.json`` + ``merges.txt``) on the ``tokenizers`` library,
giving the ids of transformers' ``BartTokenizer``.

Sequences are ``<s> A </s>`` and, for pairs, ``<s> A </s></s> B </s>``; ``<mask>`` swallows the space
before it (``lstrip``); no prefix space is added unless asked (``add_prefix_space``). The special tokens
keep the ids the vocabulary gives them (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["BartTokenizer"]

SPECIALS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}


class BartTokenizer:
    """Encode / decode like ``transformers.BartTokenizer``; build with :meth:`from_pretrained` or from files."""

    def __init__(self, vocab_file: str, merges_file: str, *, add_prefix_space: bool = False,
                 model_max_length: Optional[int] = None):
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
        except ImportError as e:  # pragma: no cover
            raise ImportError("BartTokenizer needs the `tokenizers` package (pip install tokenizers)") from e
        for f in (vocab_file, merges_file):
            if not os.path.exists(f):
                raise FileNotFoundError(f"{f}: no such file (BART needs vocab.json and merges.txt)")
        with open(vocab_file, encoding="utf-8") as f:
            try:
                vocab = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{vocab_file}: not a JSON vocabulary ({e})") from None
        missing = [t for t in SPECIALS.values() if t not in vocab]
        if missing:
            raise ValueError(f"{vocab_file}: the BART special tokens {missing} are not in the vocabulary")
        bpe = models.BPE.from_file(vocab_file, merges_file, unk_token=None)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tok.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, lstrip=(name == "mask"), rstrip=False, normalized=False, special=True)
                    for name, t in SPECIALS.items()]
        tok.add_special_tokens(specials)
        self.vocab = vocab
        self.ids = {name: int(vocab[t]) for name, t in SPECIALS.items()}
        tok.post_processor = processors.RobertaProcessing(
            sep=(SPECIALS["eos"], self.ids["eos"]), cls=(SPECIALS["bos"], self.ids["bos"]),
            add_prefix_space=add_prefix_space, trim_offsets=True,
        )
        self._tok = tok
        self.add_prefix_space = add_prefix_space
        self.model_max_length = model_max_length

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], **kwargs) -> "BartTokenizer":
        """From a checkpoint folder's ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``)."""
        folder = os.fspath(folder)
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            kwargs.setdefault("add_prefix_space", bool(cfg.get("add_prefix_space", False)))
            if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < 10**9:
                kwargs.setdefault("model_max_length", cfg["model_max_length"])
        return cls(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), **kwargs)

    # -- ids --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    bos_token_id = property(lambda self: self.ids["bos"])
    pad_token_id = property(lambda self: self.ids["pad"])
    eos_token_id = property(lambda self: self.ids["eos"])
    unk_token_id = property(lambda self: self.ids["unk"])
    mask_token_id = property(lambda self: self.ids["mask"])

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, text: str, text_pair: Optional[str] = None, *, add_special_tokens: bool = True,
               max_length: Optional[int] = None, truncation: bool = False) -> list[int]:
        if not isinstance(text, str) or (text_pair is not None and not isinstance(text_pair, str)):
            raise TypeError("text (and text_pair) must be str")
        ids = self._tok.encode(text, text_pair, add_special_tokens=add_special_tokens).ids
        if truncation:
            limit = max_length or self.model_max_length
            if limit is None:
                raise ValueError("truncation=True needs max_length (or a model_max_length)")
            if len(ids) > limit:
                # BartTokenizer's longest-first truncation of a single text keeps the final </s>
                ids = ids[: limit - 1] + [self.eos_token_id] if add_special_tokens and text_pair is None else ids[:limit]
        return ids

    def __call__(self, texts: Union[str, Sequence[str]], *, padding: Union[bool, str] = True, truncation: bool = False,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = "np") -> dict:
        """Batch encode: right-padded ``input_ids`` and ``attention_mask`` (numpy int64)."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        rows = [self.encode(t, truncation=truncation, max_length=max_length) for t in batch]
        width = max(len(r) for r in rows)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max_length
        elif not padding and len({len(r) for r in rows}) > 1:
            raise ValueError("texts of different lengths need padding=True")
        ids = np.full((len(rows), width), self.pad_token_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # -- decoding -------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {len(self)})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

"""The family's tokenizer, loaded from the files the original ships, and its special-token ids.

* ``spiece.model`` (LongLM / T5): sentencepiece pieces keep their ids; ``<extra_id_k>`` is
  ``sp_size + extra_ids - 1 - k`` (transformers' T5Tokenizer rule, so ``<extra_id_0>`` is the last id).
* ``tokenizer.json``: a ``tokenizers`` tokenizer (BART byte-level BPE, GLM, ...).
* ``vocab.txt``: WordPiece through ``tokenizers`` (PALM / COCO-LM style BERT vocabularies).

:class:`Vocab` carries the ids objectives need; ``None`` where the vocabulary has no such token.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from .config import TrainConfigError

__all__ = ["Vocab", "Tokenizer", "load_tokenizer"]


@dataclasses.dataclass(frozen=True)
class Vocab:
    size: int
    pad: int = 0
    eos: Optional[int] = None
    bos: Optional[int] = None
    unk: Optional[int] = None
    mask: Optional[int] = None
    cls: Optional[int] = None
    sep: Optional[int] = None
    sentinels: tuple[int, ...] = ()  # <extra_id_0>, <extra_id_1>, ...
    extra: dict = dataclasses.field(default_factory=dict)  # family tokens: sop, eop, gmask, smask, dblock, ...

    def sentinel(self, k: int) -> int:
        if k >= len(self.sentinels):
            raise ValueError(f"sentinel <extra_id_{k}> does not exist (the vocabulary has {len(self.sentinels)})")
        return self.sentinels[k]

    def need(self, *names: str) -> None:
        missing = [n for n in names if (getattr(self, n, None) if n in _FIELDS else self.extra.get(n)) is None]
        if missing:
            raise TrainConfigError(f"the tokenizer has no {', '.join(missing)} token (needed by the objective)")

    def id(self, name: str) -> int:
        v = getattr(self, name) if name in _FIELDS else self.extra.get(name)
        if v is None:
            raise TrainConfigError(f"the tokenizer has no {name} token")
        return int(v)


_FIELDS = {f.name for f in dataclasses.fields(Vocab)}


class Tokenizer:
    """``encode(text) -> list[int]`` without special tokens, ``decode(ids) -> str``, and ``vocab``."""

    def __init__(self, encode, decode, vocab: Vocab, path: str):
        self._encode, self._decode, self.vocab, self.path = encode, decode, vocab, path

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])


def _find(path: str) -> str:
    if os.path.isdir(path):
        for name in ("spiece.model", "sentencepiece.model", "tokenizer.model", "tokenizer.json", "vocab.txt"):
            p = os.path.join(path, name)
            if os.path.exists(p):
                return p
        raise TrainConfigError(f"{path}: no tokenizer file (spiece.model, tokenizer.json or vocab.txt)")
    if not os.path.exists(path):
        raise TrainConfigError(f"{path}: no such tokenizer file")
    return path


def load_tokenizer(path: str, extra_ids: int = 100) -> Tokenizer:
    path = _find(os.fspath(path))
    if path.endswith(".model"):
        return _sentencepiece(path, extra_ids)
    if path.endswith(".json"):
        return _hf_tokenizers(path)
    if path.endswith(".txt"):
        return _wordpiece(path)
    raise TrainConfigError(f"{path}: unknown tokenizer format (expected .model, .json or vocab.txt)")


def _sentencepiece(path: str, extra_ids: int) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    n = sp.get_piece_size()
    sentinels = tuple(n + extra_ids - 1 - k for k in range(extra_ids))
    names = {sp.id_to_piece(i): i for i in range(min(n, 8))}
    pad = sp.pad_id() if sp.pad_id() >= 0 else names.get("<pad>", 0)
    vocab = Vocab(
        size=n + extra_ids,
        pad=pad,
        eos=sp.eos_id() if sp.eos_id() >= 0 else None,
        bos=sp.bos_id() if sp.bos_id() >= 0 else None,
        unk=sp.unk_id() if sp.unk_id() >= 0 else None,
        sentinels=sentinels,
    )
    sentinel_piece = {s: f"<extra_id_{k}>" for k, s in enumerate(sentinels)}

    def decode(ids):
        out, run = [], []
        for i in ids:
            if i in sentinel_piece:
                out.append(sp.decode(run))
                out.append(sentinel_piece[i])
                run = []
            elif 0 <= i < n and i not in (vocab.pad, vocab.eos, vocab.bos):
                run.append(i)
        out.append(sp.decode(run))
        return "".join(out)

    return Tokenizer(lambda t: sp.encode(t), decode, vocab, path)


def _from_tokenizers(tok, path: str) -> Tokenizer:
    get = tok.token_to_id

    def first(*names):
        for nm in names:
            i = get(nm)
            if i is not None:
                return i
        return None

    vocab = Vocab(
        size=tok.get_vocab_size(with_added_tokens=True),
        pad=first("<pad>", "[PAD]") or 0,
        eos=first("</s>", "<|endoftext|>", "<eos>", "[SEP]"),
        bos=first("<s>", "[CLS]"),
        unk=first("<unk>", "[UNK]"),
        mask=first("<mask>", "[MASK]"),
        cls=first("[CLS]", "<s>"),
        sep=first("[SEP]", "</s>"),
        extra={k: v for k, v in {
            "sop": first("<|startofpiece|>", "[sop]", "<sop>"),
            "eop": first("<|endofpiece|>", "[eop]", "<eop>"),
            "gmask": first("[gMASK]"),
            "smask": first("[sMASK]"),
            "dblock": first("[dBLOCK]"),
        }.items() if v is not None},
    )
    return Tokenizer(
        lambda t: tok.encode(t, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=True),
        vocab,
        path,
    )


def _hf_tokenizers(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TrainConfigError(f"{path}: cannot read tokenizer ({e})") from None
    return _from_tokenizers(tok, path)


def _wordpiece(path: str) -> Tokenizer:
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(path, lowercase=False)
    return _from_tokenizers(tok, path)

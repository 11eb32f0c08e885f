"""COCO-LM tokenizer: a punctuation-splitting pre-tokenizer, sentencepiece pieces, fairseq ``dict.txt`` ids.

Ids come from the dictionary, not from the sentencepiece model: ``[CLS]``=0, ``[PAD]``=1, ``[SEP]``=2,
``[UNK]``=3, then dict.txt in file order, then ``[MASK]`` last. Single input ``[CLS] A [SEP]``, pair
``[CLS] A [SEP] [SEP] B [SEP]`` (RoBERTa layout). Cased.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Iterable, Optional, Sequence, Union

import numpy as np

__all__ = ["CocoLMTokenizer", "CocoLMDictionary", "pre_tokenize", "is_punctuation"]

# fairseq's special words and the names COCO-LM gives them
_ALIASES = {
    "<s>": "[CLS]", "<pad>": "[PAD]", "</s>": "[SEP]", "<unk>": "[UNK]", "<mask>": "[MASK]",
    "[CLS]": "[CLS]", "[PAD]": "[PAD]", "[SEP]": "[SEP]", "[UNK]": "[UNK]", "[MASK]": "[MASK]",
}
_QUOTES = str.maketrans("‘’´“”—–-", "'''\"\"---")
_CLITICS = [
    (r"' ([smdSMDtT])\b", r"'\1"),
    (r"' ll\b", "'ll"),
    (r"' re\b", "'re"),
    (r"' ve\b", "'ve"),
    (r"' LL\b", "'LL "),
    (r"' RE\b", "'RE "),
    (r"' VE\b", "'VE "),
]


def is_punctuation(ch: str) -> bool:
    """ASCII non-alphanumeric printable characters, or any Unicode punctuation (category P*)."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _leading_punct_end(tok: str) -> int:
    """Index of the first non-punctuation character after position 0 (0 if there is none)."""
    for j in range(1, len(tok)):
        if not is_punctuation(tok[j]):
            return j
    return 0


def _trailing_punct_start(tok: str) -> int:
    """One past the last non-punctuation character before the final one (len(tok) if there is none)."""
    for j in range(len(tok) - 2, -1, -1):
        if not is_punctuation(tok[j]):
            return j + 1
    return len(tok)


def _split_punct(tokens: Iterable[str]) -> list[str]:
    """Split leading and trailing punctuation runs off each whitespace token."""
    out: list[str] = []
    for tok in tokens:
        if len(tok) > 1 and is_punctuation(tok[0]):
            j = _leading_punct_end(tok)
            head, rest = tok[:j], tok[j:]
            if head:
                out.append(head)
            if rest and is_punctuation(rest[-1]):
                k = _trailing_punct_start(rest)
                out.extend(p for p in (rest[:k], rest[k:]) if p)
            elif rest:
                out.append(rest)
        elif len(tok) > 1 and is_punctuation(tok[-1]):
            k = _trailing_punct_start(tok)
            out.extend(p for p in (tok[:k], tok[k:]) if p)
        else:
            out.append(tok)
    return out


def pre_tokenize(text: str) -> str:
    """The original ``SentencepiecePreTokenizer``: normalise quotes and dashes, split punctuation off
    words, re-attach clitics ('s, 'll, ...); returns the words joined by single spaces."""
    text = text.strip().replace("``", '"').replace("''", '"').translate(_QUOTES)
    line = " ".join(_split_punct(text.split()))
    for pat, rep in _CLITICS:
        line = re.sub(pat, rep, line)
    return " ".join(line.split())


class CocoLMDictionary:
    """fairseq ``Dictionary`` with COCO-LM's aliases: specials first, dict.txt order, ``[MASK]`` last."""

    def __init__(self):
        self.symbols: list[str] = []
        self.indices: dict[str, int] = {}
        for word in ("<s>", "<pad>", "</s>", "<unk>"):
            self.add_symbol(word)
        self.cls_index, self.pad_index, self.sep_index, self.unk_index = 0, 1, 2, 3

    def add_symbol(self, word: str, overwrite: bool = False) -> int:
        word = _ALIASES.get(word, word)
        if word in self.indices and not overwrite:
            return self.indices[word]
        self.indices[word] = len(self.symbols)
        self.symbols.append(word)
        return self.indices[word]

    @classmethod
    def load(cls, path: str) -> "CocoLMDictionary":
        d = cls()
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        for n, line in enumerate(lines):
            parts = line.rstrip().rsplit(" ", 1)
            word = parts[0]
            field = parts[1] if len(parts) > 1 else str(len(lines) - n)
            overwrite = field == "#fairseq:overwrite"
            if overwrite:
                word, field = word.rsplit(" ", 1)
            try:
                int(field)
            except ValueError:
                raise ValueError(f"{path}:{n + 1}: expected '<token> <count>', got {line.rstrip()!r}") from None
            if word in d.indices and not overwrite:
                continue  # duplicate: the first one keeps its id
            d.add_symbol(word, overwrite=overwrite)
        return d

    def index(self, token: str) -> int:
        return self.indices.get(_ALIASES.get(token, token), self.unk_index)

    def __len__(self) -> int:
        return len(self.symbols)


class CocoLMTokenizer:
    """``tokenizer(texts, pairs)`` -> padded ``input_ids`` / ``attention_mask`` numpy arrays."""

    vocab_files = ("sp.model", "dict.txt")

    def __init__(self, sp_model_file: str, dict_file: str):
        import sentencepiece as spm

        for p in (sp_model_file, dict_file):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: no such file (COCO-LM needs sp.model and dict.txt)")
        self.sp = spm.SentencePieceProcessor()
        if not self.sp.Load(sp_model_file):
            raise ValueError(f"{sp_model_file}: not a sentencepiece model")
        self.dictionary = CocoLMDictionary.load(dict_file)
        self.mask_token_id = self.dictionary.add_symbol("<mask>")
        self.cls_token_id = self.dictionary.cls_index
        self.pad_token_id = self.dictionary.pad_index
        self.sep_token_id = self.dictionary.sep_index
        self.unk_token_id = self.dictionary.unk_index

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "CocoLMTokenizer":
        folder = os.fspath(folder)
        return cls(os.path.join(folder, "sp.model"), os.path.join(folder, "dict.txt"))

    @property
    def vocab_size(self) -> int:
        return len(self.dictionary)

    # -- pieces and ids -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        pieces = self.sp.EncodeAsPieces(pre_tokenize(text))
        # drop a lone "▁" piece that ends the text or precedes punctuation (shorter, same text)
        return [
            p for i, p in enumerate(pieces)
            if not (p == "\u2581" and (i == len(pieces) - 1 or is_punctuation(pieces[i + 1][0])))
        ]

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]):
        if isinstance(tokens, str):
            return self.dictionary.index(tokens)
        return [self.dictionary.index(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]):
        if isinstance(ids, (int, np.integer)):
            return self._symbol(int(ids))
        return [self._symbol(int(i)) for i in ids]

    def _symbol(self, i: int) -> str:
        if not 0 <= i < len(self.dictionary):
            raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self.dictionary)})")
        return self.dictionary.symbols[i]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return [self.cls_token_id] + ids + [self.sep_token_id] if add_special_tokens else ids

    def encode_plus(self, text_a: str, text_b: Optional[str] = None, add_special_tokens: bool = True, max_length: int = 512) -> dict:
        """``[CLS] A [SEP]`` or ``[CLS] A [SEP] [SEP] B [SEP]``; a pair is cut to max_length-4 pieces by
        popping from the longer side (B on ties), a single text to max_length-2."""
        a = self.tokenize(text_a)
        b = self.tokenize(text_b) if text_b is not None else None
        if b is not None:
            while len(a) + len(b) > max_length - 4:
                (a if len(a) > len(b) else b).pop()
        else:
            a = a[: max(max_length - 2, 0)]
        ids_a, ids_b = self.convert_tokens_to_ids(a), (self.convert_tokens_to_ids(b) if b is not None else None)
        if not add_special_tokens:
            return {"input_ids": ids_a + (ids_b or [])}
        ids = [self.cls_token_id] + ids_a + [self.sep_token_id]
        if ids_b is not None:
            ids += [self.sep_token_id] + ids_b + [self.sep_token_id]
        return {"input_ids": ids}

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        text_pair: Union[None, str, Sequence[str]] = None,
        *,
        max_length: int = 512,
        padding: Union[bool, str] = True,
    ) -> dict[str, np.ndarray]:
        """Batch encode; ``padding`` True/"longest" pads to the longest row, "max_length" to max_length."""
        texts = [text] if isinstance(text, str) else list(text)
        if text_pair is None:
            pairs = [None] * len(texts)
        else:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
        rows = [self.encode_plus(t, p, max_length=max_length)["input_ids"] for t, p in zip(texts, pairs)]
        if padding == "max_length":
            width = max_length
        elif padding in (True, "longest"):
            width = max(len(r) for r in rows)
        elif padding in (False, "do_not_pad"):
            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows differ in length; pass padding=True to pad them")
            width = len(rows[0])
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        ids = np.full((len(rows), width), self.pad_token_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Pieces concatenated, spaces dropped, "▁" back to spaces (as the original)."""
        specials = {self.cls_token_id, self.pad_token_id, self.sep_token_id, self.mask_token_id}
        toks = [self._symbol(int(i)) for i in ids if not (skip_special_tokens and int(i) in specials)]
        return "".join(toks).replace(" ", "").replace("\u2581", " ").strip()

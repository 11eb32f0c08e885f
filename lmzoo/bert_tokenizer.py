"""BERT WordPiece tokenizer (Chinese and other ``vocab.txt`` vocabularies) built on the ``tokenizers`` library.

Gives the ids of transformers' ``BertTokenizer``: clean-up of control characters, CJK characters split one
per token, lower-casing with accent stripping (``do_lower_case``; ``strip_accents`` follows it unless
set), whitespace and punctuation splits, greedy longest-match-first WordPiece with ``##`` continuations,
``[UNK]`` for a word that cannot be pieced together (or is longer than 100 characters), and the special
tokens kept whole when they appear in the text. Single inputs become ``[CLS] A [SEP]``, pairs
``[CLS] A [SEP] B [SEP]`` with token types 0 / 1.

    tok = BertTokenizer.from_pretrained("path/to/folder")   # reads vocab.txt (+ tokenizer_config.json)
    batch = tok(["今天天气很好", "你好"], padding="max_length", max_length=128, truncation=True)
    text = tok.decode(ids, skip_special_tokens=True)
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = ["BertTokenizer", "load_vocab", "join_cjk"]

SPECIAL_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_vocab(path: str) -> dict[str, int]:
    """vocab.txt: one token per line, the id is the line number (a repeated token keeps its last id)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such vocabulary file")
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    if not vocab:
        raise ValueError(f"{path}: empty vocabulary")
    return vocab


_CJK_SPACE = re.compile(
    r"(?<=[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\u3000-\u303f\uff00-\uffef]) "
    r"(?=[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\u3000-\u303f\uff00-\uffef])"
)


def join_cjk(text: str) -> str:
    """Remove the spaces that decoding puts between two CJK characters (or CJK punctuation)."""
    return _CJK_SPACE.sub("", text)


class BertTokenizer:
    """WordPiece tokenizer with transformers ``BertTokenizer``'s ids (a fast ``tokenizers`` pipeline)."""

    def __init__(
        self,
        vocab_file: str,
        *,
        do_lower_case: bool = True,
        strip_accents: Optional[bool] = None,
        tokenize_chinese_chars: bool = True,
        unk_token: str = "[UNK]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
        cls_token: str = "[CLS]",
        mask_token: str = "[MASK]",
        model_max_length: Optional[int] = None,
    ):
        self.vocab = load_vocab(vocab_file)
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self.do_lower_case = do_lower_case
        self.model_max_length = model_max_length
        self.unk_token, self.sep_token, self.pad_token = unk_token, sep_token, pad_token
        self.cls_token, self.mask_token = cls_token, mask_token
        if unk_token not in self.vocab:
            raise ValueError(f"{vocab_file}: the unknown token {unk_token!r} is not in the vocabulary")
        tok = Tokenizer(models.WordPiece(self.vocab, unk_token=unk_token, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=tokenize_chinese_chars, strip_accents=strip_accents, lowercase=do_lower_case
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        specials = [t for t in (unk_token, sep_token, pad_token, cls_token, mask_token) if t in self.vocab]
        # Special tokens in the text are kept whole, before normalisation (BertTokenizer's never_split).
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.special_tokens = specials
        if cls_token in self.vocab and sep_token in self.vocab:
            cls, sep = (cls_token, self.vocab[cls_token]), (sep_token, self.vocab[sep_token])
            tok.post_processor = processors.TemplateProcessing(
                single=f"{cls_token}:0 $A:0 {sep_token}:0",
                pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
                special_tokens=[cls, sep],
            )
        self._tok = tok

    @classmethod
    def from_pretrained(cls, folder: str, **kwargs) -> "BertTokenizer":
        """A folder with vocab.txt (and optionally tokenizer_config.json), or the vocab.txt path itself."""
        folder = os.fspath(folder)
        vocab = folder if os.path.isfile(folder) else os.path.join(folder, "vocab.txt")
        cfg_path = os.path.join(os.path.dirname(vocab), "tokenizer_config.json")
        settings = {}
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "model_max_length", *SPECIAL_TOKENS):
                if isinstance(cfg.get(k), (str, bool, int)) or (k == "strip_accents" and k in cfg):
                    settings[k] = cfg[k]
        settings.update(kwargs)
        return cls(vocab, **settings)

    # -- ids ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _id(self, token: str) -> Optional[int]:
        return self.vocab.get(token)

    cls_token_id = property(lambda self: self._id(self.cls_token))
    sep_token_id = property(lambda self: self._id(self.sep_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    mask_token_id = property(lambda self: self._id(self.mask_token))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.vocab[t] for t in self.special_tokens]

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]):
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.vocab[self.unk_token])
        return [self.vocab.get(t, self.vocab[self.unk_token]) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]]):
        if isinstance(ids, (int, np.integer)):
            return self.ids_to_tokens.get(int(ids), self.unk_token)
        return [self.ids_to_tokens.get(int(i), self.unk_token) for i in ids]

    # -- encoding -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of one text, without [CLS] / [SEP]."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, text_pair: Optional[str] = None, *, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return list(self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"])

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        text_pair: Union[None, str, Sequence[str]] = None,
        *,
        add_special_tokens: bool = True,
        padding: Union[bool, str] = False,
        truncation: Union[bool, str] = False,
        max_length: Optional[int] = None,
        return_token_type_ids: bool = True,
        return_attention_mask: bool = True,
        return_tensors: Optional[str] = None,
    ) -> dict:
        """transformers-style batch encoding: ``input_ids``, ``token_type_ids``, ``attention_mask``.

        ``padding``: False, True / "longest", or "max_length"; ``truncation``: False, True /
        "longest_first", "only_first", "only_second". ``return_tensors="np"`` gives int64 arrays
        (padding is then required for a ragged batch).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"text and text_pair differ in length: {len(texts)} vs {len(pairs)}")
            inputs = list(zip(texts, pairs))
        else:
            inputs = texts
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if truncation not in (False, True, "longest_first", "only_first", "only_second", "do_not_truncate"):
            raise ValueError(f"unknown truncation {truncation!r}")
        limit = max_length if max_length is not None else self.model_max_length
        if padding == "max_length" and limit is None:
            raise ValueError("padding='max_length' needs max_length")
        tok = self._tok
        try:
            if truncation not in (False, "do_not_truncate"):
                if limit is None:
                    raise ValueError("truncation needs max_length")
                strategy = "longest_first" if truncation is True else truncation
                tok.enable_truncation(limit, strategy=strategy)
            else:
                tok.no_truncation()
            if padding in (True, "longest", "max_length"):
                tok.enable_padding(
                    pad_id=self.pad_token_id if self.pad_token_id is not None else 0,
                    pad_token=self.pad_token,
                    length=limit if padding == "max_length" else None,
                )
            else:
                tok.no_padding()
            try:
                encs = tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
            except Exception as e:  # the library raises a bare Exception for impossible truncations
                raise ValueError(f"cannot encode with truncation={truncation!r}, max_length={limit}: {e}") from None
        finally:
            tok.no_truncation()
            tok.no_padding()
        out = {"input_ids": [e.ids for e in encs]}
        if return_token_type_ids:
            out["token_type_ids"] = [e.type_ids for e in encs]
        if return_attention_mask:
            out["attention_mask"] = [e.attention_mask for e in encs]
        if return_tensors is not None:
            if return_tensors != "np":
                raise ValueError(f"return_tensors must be None or 'np', got {return_tensors!r}")
            lengths = {len(r) for r in out["input_ids"]}
            if len(lengths) > 1:
                raise ValueError("rows differ in length: pass padding=True to return arrays")
            out = {k: np.asarray(v, np.int64) for k, v in out.items()}
        if single and return_tensors is None:
            out = {k: v[0] for k, v in out.items()}
        return out

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True) -> str:
        """Tokens joined with spaces, ``##`` pieces glued (as BertTokenizer.decode)."""
        ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)]
        self._tok.decoder = decoders.WordPiece(prefix="##", cleanup=clean_up_tokenization_spaces)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, **kwargs) -> list[str]:
        return [self.decode(r, **kwargs) for r in rows]

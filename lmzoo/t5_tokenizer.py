"""LongLM's tokenizer: a SentencePiece model plus ``<extra_id_k>`` sentinels, ids as transformers' T5Tokenizer.

Matches the slow ``T5Tokenizer`` of transformers 4.46 with its defaults (``legacy=True``, ``extra_ids=100``):
regular pieces keep their SentencePiece ids; ``<extra_id_k>`` is ``sp_size + extra_ids - 1 - k`` (so
``<extra_id_0>`` is the last id); whitespace next to a sentinel is dropped; text between special tokens is
encoded by SentencePiece chunk by chunk; ``</s>`` is appended. When the SentencePiece model has no
``<pad>`` piece (LongLM's uses the SentencePiece default layout), ``<pad>`` gets the next free id, as
transformers adds it.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["T5Tokenizer"]


class T5Tokenizer:
    def __init__(
        self,
        vocab_file: str | os.PathLike,
        *,
        extra_ids: int = 100,
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
    ):
        import sentencepiece as spm

        path = os.fspath(vocab_file)
        if os.path.isdir(path):
            path = os.path.join(path, "spiece.model")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no SentencePiece model (spiece.model)")
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(path)
        self.vocab_file = path
        self.sp_size = self.sp.get_piece_size()
        self.extra_ids = extra_ids
        self.eos_token, self.unk_token, self.pad_token = eos_token, unk_token, pad_token
        self.added: dict[str, int] = {f"<extra_id_{k}>": self.sp_size + extra_ids - 1 - k for k in range(extra_ids)}
        self._strip_around = set(self.added)  # sentinels swallow neighbouring whitespace
        next_id = self.sp_size + extra_ids
        for tok in (pad_token, eos_token, unk_token):
            pid = self._piece_id(tok)
            if pid is None:
                self.added[tok] = next_id
                next_id += 1
            else:
                self.added[tok] = pid
        self.id_to_added = {v: k for k, v in self.added.items()}
        alternatives = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    def _piece_id(self, piece: str) -> Optional[int]:
        pid = self.sp.piece_to_id(piece)
        return pid if self.sp.id_to_piece(pid) == piece else None

    # ids ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp_size + self.extra_ids

    def __len__(self) -> int:
        return max(self.id_to_added.keys() | {self.vocab_size - 1}) + 1

    @property
    def eos_token_id(self) -> int:
        return self.added[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.added[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self.added[self.unk_token]

    def sentinel_id(self, k: int) -> int:
        if not 0 <= k < self.extra_ids:
            raise ValueError(f"sentinel <extra_id_{k}> does not exist (extra_ids={self.extra_ids})")
        return self.added[f"<extra_id_{k}>"]

    # encode ---------------------------------------------------------------------------------------------
    def tokenize_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without the trailing ``</s>``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        parts = self._split.split(text)
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2 == 1:
                ids.append(self.added[part])
                continue
            if i > 0 and parts[i - 1] in self._strip_around:
                part = part.lstrip()
            if i + 1 < len(parts) and parts[i + 1] in self._strip_around:
                part = part.rstrip()
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenize_ids(text)
        if add_special_tokens and (not ids or ids[-1] != self.eos_token_id):
            ids.append(self.eos_token_id)
        return ids

    def __call__(self, texts: str | Sequence[str], *, max_length: Optional[int] = None, padding: bool = True, truncation: bool = False):
        """Batch-encode to numpy ``input_ids`` / ``attention_mask`` (right padding with pad_token_id)."""
        single = isinstance(texts, str)
        batch = [self.encode(t) for t in ([texts] if single else texts)]
        if truncation and max_length:
            batch = [b[: max_length - 1] + [self.eos_token_id] if len(b) > max_length else b for b in batch]
        width = max(len(b) for b in batch) if padding else None
        if max_length and padding == "max_length":
            width = max_length
        ids = np.full((len(batch), width), self.pad_token_id, np.int64)
        mask = np.zeros_like(ids)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = b
            mask[i, : len(b)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # decode ---------------------------------------------------------------------------------------------
    def _token(self, i: int) -> str:
        if i in self.id_to_added:
            return self.id_to_added[i]
        if not 0 <= i < self.sp_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self)})")
        return self.sp.id_to_piece(i)

    def _pieces_to_string(self, tokens: list[str], specials: set) -> str:
        tokens = list(tokens)
        if tokens and tokens[0].startswith("\u2581"):
            tokens[0] = tokens[0][1:]
        out, run, prev_special = "", [], False
        for t in tokens:
            if t in specials:  # special tokens are written out, not decoded by SentencePiece
                if not prev_special:
                    out += " "
                out += self.sp.decode(run) + t
                prev_special, run = True, []
            else:
                run.append(t)
                prev_special = False
        return (out + self.sp.decode(run)).strip()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``, laid out as transformers' slow T5Tokenizer.decode does."""
        tokens = [self._token(int(i)) for i in ids]
        specials = set(self.added)
        # sentinels past the SentencePiece vocabulary are joined as separate words
        separate = {t for t, i in self.added.items() if t.startswith("<extra_id_") and i >= self.sp_size}
        texts, run = [], []
        for t in tokens:
            if skip_special_tokens and t in specials:
                continue
            if t in separate:
                if run:
                    text = self._pieces_to_string(run, specials)
                    if text:
                        texts.append(text)
                    run = []
                texts.append(t)
            else:
                run.append(t)
        if run:
            texts.append(self._pieces_to_string(run, specials))
        return " ".join(texts)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

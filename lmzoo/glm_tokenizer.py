"""GLM tokenizers: GPT-2 BPE (glm-2b / glm-10b), sentencepiece ``cog-pretrain.model`` (glm-large-chinese /
glm-10b-chinese) and BERT WordPiece (glm-large / glm-515m), with GLM's command tokens at the original ids.

Text is split on the command tokens first; each chunk is encoded on its own (as the original does). The blank
tokens ``[MASK]``, ``[sMASK]``, ``[gMASK]`` swallow the whitespace before them (the original's ``lstrip``), the
whitespace after them stays with the next chunk. Contexts are ``[CLS] text <eos>`` (HF; ``[CLS] text [SEP]``
for the BERT vocabulary, as HF's ``GLMBertTokenizer`` builds them). The text vocabularies come from the usual
files (``vocab.json`` + ``merges.txt``, the ``.model`` file, ``vocab.txt``), which the user supplies.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

__all__ = ["GLMTokenizer"]

BLANKS = ("[MASK]", "[sMASK]", "[gMASK]")


class GLMTokenizer:
    """Encode / decode with GLM's special ids. Build with :meth:`from_gpt2`, :meth:`from_sentencepiece`, :meth:`from_bert`."""

    def __init__(self, kind: str, encoder, decoder, text_vocab_size: int, specials: dict[str, int], *, eos_token: str, task_mask: bool):
        self.kind = kind
        self._encode_text = encoder
        self._decode_text = decoder
        self.text_vocab_size = text_vocab_size
        self.specials = dict(specials)  # token string -> id
        self.id_to_special = {v: k for k, v in self.specials.items()}
        self.eos_token = eos_token
        self.task_mask = task_mask
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_gpt2(cls, vocab_file: str, merges_file: str, *, dblock: bool = False) -> "GLMTokenizer":
        """glm-2b / glm-10b: GPT-2 byte-level BPE; ``<|endoftext|>`` is the last text id (50256), then
        sop, eop, [CLS], [MASK], [SEP], [UNUSED], [gMASK], [sMASK] (+ [dBLOCK])."""
        from tokenizers import Tokenizer
        from tokenizers.decoders import ByteLevel as ByteLevelDecoder
        from tokenizers.models import BPE
        from tokenizers.pre_tokenizers import ByteLevel

        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        if "<|endoftext|>" not in vocab:
            raise ValueError(f"{vocab_file}: no <|endoftext|> entry; not a GPT-2 vocabulary")
        tok = Tokenizer(BPE.from_file(vocab_file, merges_file))
        tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
        tok.decoder = ByteLevelDecoder()
        n = len(vocab)
        names = ["<|startofpiece|>", "<|endofpiece|>", "[CLS]", "[MASK]", "[SEP]", "[UNUSED]", "[gMASK]", "[sMASK]"]
        if dblock:
            names.append("[dBLOCK]")
        specials = {"<|endoftext|>": vocab["<|endoftext|>"], **{s: n + i for i, s in enumerate(names)}}
        return cls(
            "gpt2",
            lambda t: tok.encode(t, add_special_tokens=False).ids,
            lambda ids: tok.decode(ids, skip_special_tokens=False),
            n,
            specials,
            eos_token="<|endoftext|>",
            task_mask=True,
        )

    @classmethod
    def from_sentencepiece(cls, model_file: str) -> "GLMTokenizer":
        """glm-large-chinese / glm-10b-chinese (HF ids): pieces 0..N-1, then <|endoftext|> N, [SEP] N+1, [CLS] N+2,
        [MASK] N+3, [UNUSED1] N+4, [UNUSED2] N+5, sop N+6, eop N+7, [sMASK] N+8, [gMASK] N+9."""
        import sentencepiece as spm

        if not os.path.exists(model_file):
            raise FileNotFoundError(f"{model_file}: no such sentencepiece model (GLM's Chinese models use cog-pretrain.model)")
        sp = spm.SentencePieceProcessor(model_file=model_file)
        n = sp.get_piece_size()
        newline = sp.piece_to_id("<n>")
        has_newline = newline != sp.unk_id() and sp.id_to_piece(newline) == "<n>"

        def enc(text):
            if has_newline and "\n" in text:
                out = []
                for i, line in enumerate(text.split("\n")):
                    if i:
                        out.append(newline)
                    if line:
                        out += sp.encode(line)
                return out
            return sp.encode(text)

        def dec(ids):
            text = sp.decode([int(i) for i in ids])
            return text.replace("<n>", "\n") if has_newline else text

        names = ["<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNUSED1]", "[UNUSED2]", "<|startofpiece|>", "<|endofpiece|>", "[sMASK]", "[gMASK]"]
        specials = {s: n + i for i, s in enumerate(names)}
        return cls("chinese", enc, dec, n, specials, eos_token="<|endoftext|>", task_mask=True)

    @classmethod
    def from_bert(cls, vocab_file: str, *, lowercase: bool = True) -> "GLMTokenizer":
        """glm-large / glm-515m: BERT uncased WordPiece ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103 in
        the real vocab), then sop = N, eop = N+1. Only [MASK] blanks (no task masks)."""
        from tokenizers import BertWordPieceTokenizer
        from tokenizers.models import WordPiece

        with open(vocab_file, encoding="utf-8") as f:
            words = [w.rstrip("\n") for w in f]
        ids = {w: i for i, w in enumerate(words)}
        for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            if s not in ids:
                raise ValueError(f"{vocab_file}: no {s} entry; not a BERT vocabulary")
        tok = BertWordPieceTokenizer(WordPiece.read_file(vocab_file), lowercase=lowercase)
        n = len(words)
        specials = {s: ids[s] for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
        specials["<|startofpiece|>"] = n
        specials["<|endofpiece|>"] = n + 1
        return cls(
            "bert",
            lambda t: tok.encode(t, add_special_tokens=False).ids,
            lambda ids_: tok.decode(ids_, skip_special_tokens=False),
            n,
            specials,
            eos_token="[SEP]",
            task_mask=False,
        )

    # -- ids ----------------------------------------------------------------------------------------
    def _id(self, name: str) -> int:
        return self.specials[name]

    @property
    def cls_token_id(self) -> int:
        return self._id("[CLS]")

    @property
    def sop_token_id(self) -> int:
        return self._id("<|startofpiece|>")

    @property
    def eop_token_id(self) -> int:
        return self._id("<|endofpiece|>")

    @property
    def eos_token_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self._id("[PAD]") if self.kind == "bert" else self.eos_token_id

    @property
    def mask_token_id(self) -> int:
        return self._id("[MASK]")

    @property
    def smask_token_id(self) -> Optional[int]:
        return self.specials.get("[sMASK]")

    @property
    def gmask_token_id(self) -> Optional[int]:
        return self.specials.get("[gMASK]")

    @property
    def mask_token_ids(self) -> list[int]:
        return [self.specials[b] for b in BLANKS if b in self.specials]

    @property
    def default_mask(self) -> str:
        """The blank the original appends to a prompt that has none."""
        return "[gMASK]" if self.task_mask else "[MASK]"

    def __len__(self) -> int:
        return max(self.specials.values()) + 1

    # -- encode / decode ------------------------------------------------------------------------------
    def tokenize_ids(self, text: str) -> list[int]:
        """Text (with command tokens) -> ids, without [CLS]/eos."""
        parts = self._split.split(text)
        out: list[int] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            if part in self.specials:
                out.append(self.specials[part])
                continue
            if i + 1 < len(parts) and parts[i + 1] in BLANKS:
                part = part.rstrip()  # a blank token swallows the whitespace before it
            if part:
                out += self._encode_text(part)
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenize_ids(text)
        return [self.cls_token_id] + ids + [self.eos_token_id] if add_special_tokens else ids

    def encode_for_blanks(self, text: str) -> list[int]:
        """A blank-infilling context: [CLS] text eos, with the default blank appended when there is none."""
        if not any(b in text for b in BLANKS if b in self.specials):
            text = text + " " + self.default_mask
        return self.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        pieces, run = [], []
        for i in ids:
            i = int(i)
            if i in self.id_to_special and (i >= self.text_vocab_size or self.kind == "bert"):
                if run:
                    pieces.append(self._decode_text(run))
                    run = []
                if not skip_special_tokens:
                    pieces.append(self.id_to_special[i])
            else:
                run.append(i)
        if run:
            pieces.append(self._decode_text(run))
        return "".join(pieces) if self.kind != "bert" else " ".join(pieces)

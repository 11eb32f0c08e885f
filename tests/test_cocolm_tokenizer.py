"""COCO-LM tokenizer on a small sentencepiece model and a dict.txt built here (ids from dict.txt order)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest

from lmzoo.cocolm_tokenizer import CocoLMDictionary, CocoLMTokenizer, pre_tokenize

from .conftest import require

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged, that a single man must be in want of a wife.",
    "COCO-LM corrects and contrasts text sequences (with a small generator).",
    "They'll say \"hello\" -- and we'll answer: goodbye!",
    "Numbers like 1234 and 56.7 appear; so do dashes - and quotes.",
    "Language models learn from large corpora of text.",
] * 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    spm = require("sentencepiece")
    folder = tmp_path_factory.mktemp("cocolm_tok")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=90, model_type="unigram",
        character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
    )
    (folder / "sp.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(1, sp.get_piece_size())]
    random.Random(0).shuffle(pieces)  # ids must follow dict.txt, not the sentencepiece order
    lines = [f"{p} {1000 - i}" for i, p in enumerate(pieces)]
    lines.insert(5, "<s> 7")  # a special listed in dict.txt keeps its id and takes no new one
    lines.insert(9, f"{pieces[0]} 3")  # a duplicate keeps the first id
    (folder / "dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, pieces


@pytest.fixture(scope="module")
def tok(files):
    return CocoLMTokenizer.from_pretrained(files[0])


def test_special_ids_and_dict_order(tok, files):
    _, pieces = files
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(["<s>", "[CLS]", "<pad>", "</s>", "[SEP]", "<unk>"]) == [0, 0, 1, 2, 2, 3]
    # dict.txt order from id 4; the "<s>" and duplicate lines add nothing
    assert [tok.convert_tokens_to_ids(p) for p in pieces] == list(range(4, 4 + len(pieces)))
    assert tok.mask_token_id == tok.vocab_size - 1 == 4 + len(pieces)
    assert tok.convert_tokens_to_ids("<mask>") == tok.convert_tokens_to_ids("[MASK]") == tok.mask_token_id
    assert tok.convert_tokens_to_ids("not-a-piece") == 3
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, tok.mask_token_id]) == ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]


def test_pieces_map_through_the_dictionary(tok):
    pieces = tok.tokenize("The quick brown fox")
    assert "".join(pieces).replace("\u2581", " ").strip() == "The quick brown fox"
    ids = tok.encode("The quick brown fox")
    assert ids == [tok.dictionary.indices[p] for p in pieces]
    assert tok.encode("The quick brown fox", add_special_tokens=True) == [0] + ids + [2]
    assert tok.sp.EncodeAsIds("The quick brown fox") != ids  # the sentencepiece ids are not used


def test_pair_layout_and_batch_padding(tok):
    a, b = tok.encode("The fox."), tok.encode("A wife!")
    assert tok.encode_plus("The fox.", "A wife!")["input_ids"] == [0] + a + [2, 2] + b + [2]
    batch = tok(["The fox.", "Language models learn from large corpora of text."], ["A wife!", "Text."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == np.int64 and ids.shape == mask.shape
    n0 = len(a) + len(b) + 4
    assert list(ids[0, :n0]) == [0] + a + [2, 2] + b + [2]
    assert (ids[0, n0:] == 1).all() and mask[0].sum() == n0 and mask[1].all()


def test_truncation_pops_the_longer_side(tok):
    long, short = "Language models learn from large corpora of text.", "The fox."
    a, b = tok.tokenize(long), tok.tokenize(short)
    n = len(b)
    assert len(a) > n + 2

    def pair(max_length):
        return tok.encode_plus(long, short, max_length=max_length)["input_ids"]

    ids = tok.convert_tokens_to_ids
    assert pair(2 * n + 1 + 4) == [0] + ids(a[: n + 1]) + [2, 2] + ids(b) + [2]  # only A shrinks
    assert pair(2 * n + 4) == [0] + ids(a[:n]) + [2, 2] + ids(b) + [2]
    assert pair(2 * n - 1 + 4) == [0] + ids(a[:n]) + [2, 2] + ids(b[: n - 1]) + [2]  # a tie pops B
    assert tok.encode_plus(long, max_length=5)["input_ids"] == [0] + ids(a[:3]) + [2]


def test_pre_tokenizer():
    assert pre_tokenize("  Hello, world!  ") == "Hello , world !"
    assert pre_tokenize("(hello).") == "( hello )."  # a trailing run stays together
    assert pre_tokenize("x!?y (a)(b) [c]. {d}") == "x!?y ( a)(b ) [ c ]. { d }"
    assert pre_tokenize("a ' s b ' t") == "a 's b 't"
    assert pre_tokenize("It's John's; they'll go") == "It's John's ; they'll go"
    assert pre_tokenize("``quoted'' \u201csmart\u201d \u2018x\u2019") == "\" quoted \" \" smart \" ' x '"
    assert pre_tokenize("a\u2014b \u2013 c") == "a-b - c"
    assert pre_tokenize("...") == "..."
    assert pre_tokenize("U.S.A. e-mail") == "U.S.A . e-mail"


def test_lone_space_piece_before_punctuation_is_dropped(tok):
    pieces = tok.tokenize("fox , dog !")
    assert "\u2581" not in pieces
    assert "".join(pieces).replace("\u2581", " ").strip().replace(" ", "") == "fox,dog!"


def test_decode(tok):
    ids = tok.encode_plus("The quick brown fox.")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "The quick brown fox."
    assert tok.decode(ids) == "[CLS] The quick brown fox.[SEP]"  # what the original returns
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_bad_files(tmp_path, files):
    with pytest.raises(FileNotFoundError, match="dict.txt"):
        CocoLMTokenizer.from_pretrained(tmp_path)
    bad = tmp_path / "dict.txt"
    bad.write_text("hello world\n")
    with pytest.raises(ValueError, match="expected '<token> <count>'"):
        CocoLMDictionary.load(str(bad))

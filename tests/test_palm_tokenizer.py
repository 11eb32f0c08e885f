"""lmzoo.bert_tokenizer gives transformers' BertTokenizer ids (Chinese vocab.txt, PALM's tokenizer)."""

import os

import numpy as np
import pytest

from .conftest import require
from lmzoo.bert_tokenizer import BertTokenizer, join_cjk
from .parity import case_dir

SPECIALS = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHINESE = list("今天天气很好我们去公园玩吧你是谁中国人民银行北京上海的了在有一个不")
PUNCT = list("，。！？、；：“”（）《》,.!?;:'\"()-")
WORDS = ["hello", "world", "he", "##llo", "##s", "##ing", "play", "cafe", "naive", "resume", "a", "b", "##b", "un", "##aff", "##able",
         "123", "##4", "ok", "gpu", "jax", "x"]  # fmt: skip

TEXTS = [
    "今天天气很好，我们去公园玩吧！",
    "你是谁？我是中国人民银行的一个人。",
    "Hello World, playing JAX on GPU!",
    "Café naïve résumé CAFÉ",  # accents are stripped by lower-casing
    "unaffable hellos helloing",
    "北京鸭子🦆和上海😀",  # unknown characters and emoji
    "  tabs\tand\nnewlines\u3000全角空格  ",
    "控制字符\x00\x07在\ufffd这里",
    "[CLS] 特殊 [SEP] 词 [MASK] [unused1] [cls]",  # specials kept whole; lower-case [cls] is split
    "1234 12345 ok!!! ...",
    "x" * 120,  # longer than 100 characters: one [UNK]
    "中" + "x" * 101 + "国",
    "",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ ａｂｃ",
    "不在词表里的字：龘靐齉",
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(SPECIALS + CHINESE + PUNCT + WORDS) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def pair(vocab_file):
    transformers = require("transformers")
    ref = transformers.BertTokenizer(vocab_file, do_lower_case=True)
    return BertTokenizer(vocab_file, do_lower_case=True), ref


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_bert_tokenizer(pair, text):
    tok, ref = pair
    assert tok.tokenize(text) == ref.tokenize(text)
    assert tok.encode(text) == ref.encode(text)


def test_unknown_and_special_ids(pair):
    tok, ref = pair
    ids = tok.encode("龘 [MASK] x")
    assert ids[0] == tok.cls_token_id == 101 and ids[-1] == tok.sep_token_id == 102
    assert tok.unk_token_id == 100 and tok.mask_token_id == 103 and tok.pad_token_id == 0
    assert ids[1] == 100 and ids[2] == 103


def test_pairs_padding_truncation(pair):
    tok, ref = pair
    a, b = TEXTS[:4], TEXTS[4:8]
    for kwargs in (
        dict(padding=True),
        dict(padding="max_length", max_length=24, truncation=True),
        dict(padding="longest", max_length=30, truncation="only_second"),
    ):
        got = tok(a, b, return_tensors="np", **kwargs)
        want = ref(a, b, return_tensors="np", **kwargs)
        for k in ("input_ids", "token_type_ids", "attention_mask"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} {kwargs}")
    got = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_token_type_ids=False)
    want = ref(TEXTS, padding="max_length", max_length=16, truncation=True, return_token_type_ids=False)
    assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]


def test_decode_matches(pair):
    tok, ref = pair
    for text in TEXTS[:6] + TEXTS[8:10]:
        ids = ref.encode(text)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert join_cjk(tok.decode(ref.encode("今天天气很好，我们去公园玩吧！"), skip_special_tokens=True)) == "今天天气很好，我们去公园玩吧！"


def test_cased_vocab_keeps_case_and_accents(vocab_file):
    transformers = require("transformers")
    tok = BertTokenizer(vocab_file, do_lower_case=False)
    ref = transformers.BertTokenizer(vocab_file, do_lower_case=False)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text


def test_palm_case_vocab(tmp_path):
    """The PALM case's own (synthetic, BERT-Chinese-layout) vocabulary through from_pretrained."""
    transformers = require("transformers")
    folder = os.path.join(case_dir("palm-tiny"), "bert")
    tok = BertTokenizer.from_pretrained(folder)
    ref = transformers.BertTokenizer.from_pretrained(folder, do_lower_case=True)
    texts = ["一丁七万丈三上下不与", "丑专且丕世 丘丙业丛东", "乘 乙 九 龘 [SEP] abc"]
    batch = tok(texts, padding=True, return_tensors="np")
    want = ref(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) == (101, 102, 0)


def test_bad_input_is_named(tmp_path, vocab_file):
    with pytest.raises(FileNotFoundError, match="vocab"):
        BertTokenizer(str(tmp_path / "nope.txt"))
    tok = BertTokenizer(vocab_file)
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="sideways")
    with pytest.raises(ValueError, match="max_length"):
        tok("a", padding="max_length")
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "a b"], return_tensors="np")
    with pytest.raises(ValueError, match="truncat"):
        tok("今天天气很好", "你好" * 3, truncation="only_second", max_length=4)


def test_palm_folder_tokenizer_feeds_generate():
    """``lmzoo.palm.load_tokenizer``: the pipeline's text side (what ``lmzoo generate --text`` uses)."""
    from lmzoo.palm import load_tokenizer

    tok = load_tokenizer(case_dir("palm-beam"))
    assert tok.sequence_length == 128  # configuration.json's preprocessor
    batch = tok(["一丁七万丈", "三上下不与丑专且丕世"])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 12) and batch["input_ids"][0, 0] == 101 and batch["input_ids"][0, 6] == 102
    assert batch["input_ids"][0, 7:].tolist() == [0] * 5 and batch["attention_mask"][0].sum() == 7
    assert tok.decode([101, 106, 107, 108, 102, 0]) == "一丁丂"  # spaces between CJK removed, specials skipped

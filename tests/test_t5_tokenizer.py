"""LongLM's tokenizer gives the ids (and text) of transformers' slow T5Tokenizer on the same .model file."""

from __future__ import annotations

import random

import pytest

from lmzoo.t5_tokenizer import T5Tokenizer

from .conftest import require

TEXTS = [
    "小咕噜对，<extra_id_1>",
    "the quick  brown fox <extra_id_0> jumps<extra_id_5>over",
    "  leading space and trailing  ",
    "未知字符𠀀 and ünïcode",
    "</s> eos inside </s>",
    "<pad> pad <unk>",
    "",
    "a<extra_id_99>b",
    "天空 <extra_id_2> 月亮。 the dog .",
    "dog , cat ! fox ?",
]


@pytest.fixture(scope="module", params=["t5-layout", "sentencepiece-default-layout"])
def spm_model(request, tmp_path_factory):
    spm = require("sentencepiece")
    rnd = random.Random(0)
    zh = "小咕噜对着窗外的月亮说话，天空慢慢变成了深蓝色。她想起了很久以前的故事，那时候村子里还有一条小河。"
    en = "the quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence".split()
    lines = []
    for _ in range(300):
        a = list(zh)
        rnd.shuffle(a)
        rnd.shuffle(en)
        lines += ["".join(a[:30]), " ".join(en[:10])]
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(lines))
    ids = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) if request.param == "t5-layout" else {}
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=150, character_coverage=1.0,
        minloglevel=2, **ids,
    )
    return str(d / "spiece.model")


def test_ids_and_text_match_transformers(spm_model):
    transformers = require("transformers")
    transformers.logging.set_verbosity_error()
    hf = transformers.T5Tokenizer(spm_model)
    ours = T5Tokenizer(spm_model)
    assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id)
    assert len(ours) == len(hf)
    for t in TEXTS:
        want = hf(t)["input_ids"]
        assert ours.encode(t) == want, t
        for skip in (False, True):
            assert ours.decode(want, skip_special_tokens=skip) == hf.decode(want, skip_special_tokens=skip), (t, skip)


def test_sentinels_count_down_from_the_last_id(spm_model):
    tok = T5Tokenizer(spm_model)
    assert tok.sentinel_id(0) == tok.sp_size + 99
    assert tok.sentinel_id(1) == tok.sp_size + 98
    assert tok.encode("x<extra_id_1>")[-2:] == [tok.sentinel_id(1), tok.eos_token_id]
    with pytest.raises(ValueError, match="extra_id_100"):
        tok.sentinel_id(100)


def test_batch_encoding_pads_right(spm_model):
    tok = T5Tokenizer(spm_model)
    batch = tok(["天空", "the quick brown fox jumps"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    n = int(batch["attention_mask"][0].sum())
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all() and batch["input_ids"][0, n - 1] == tok.eos_token_id


def test_bad_ids_are_named(spm_model):
    tok = T5Tokenizer(spm_model)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 10_000])

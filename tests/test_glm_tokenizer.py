"""GLM tokenizers on small vocabularies the tests build: ids equal to the reference tokenizers', special ids
at the original positions, blank whitespace handling, and blank infilling text in -> text out."""

import json

import pytest

from lmzoo.glm_tokenizer import GLMTokenizer

from .conftest import require

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tsinghua University is located in Beijing, China.",
    "GLM fills blanks: short spans, sentences and whole documents.",
    "Language models predict the next token (or the masked one).",
] * 20


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A byte-level BPE vocab.json + merges.txt with <|endoftext|> as the LAST text id, as GPT-2's."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("gpt2")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=400, min_frequency=2, special_tokens=[])
    tok.save_model(str(d))
    vocab = json.loads((d / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    return str(d / "vocab.json"), str(d / "merges.txt"), len(vocab)


def test_gpt2_special_ids_follow_the_original_layout(gpt2_files):
    vocab, merges, n = gpt2_files
    tok = GLMTokenizer.from_gpt2(vocab, merges)
    # glm-10b: eos 50256 = n-1, sop 50257, eop 50258, [CLS] 50259, [MASK] 50260, [SEP] 50261, [UNUSED] 50262,
    # [gMASK] 50263, [sMASK] 50264
    assert tok.eos_token_id == tok.pad_token_id == n - 1
    assert (tok.sop_token_id, tok.eop_token_id, tok.cls_token_id, tok.mask_token_id) == (n, n + 1, n + 2, n + 3)
    assert (tok.specials["[SEP]"], tok.gmask_token_id, tok.smask_token_id) == (n + 4, n + 6, n + 7)
    assert tok.mask_token_ids == [n + 3, n + 7, n + 6]
    assert tok.default_mask == "[gMASK]"


def test_gpt2_ids_equal_transformers(gpt2_files):
    require("transformers")
    from transformers import GPT2TokenizerFast

    vocab, merges, n = gpt2_files
    ref = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    tok = GLMTokenizer.from_gpt2(vocab, merges)
    text = "Tsinghua University is located in [MASK], China. The fox [sMASK] jumps[gMASK]"
    ids = tok.encode(text)
    want = (
        [tok.cls_token_id]
        + ref.encode("Tsinghua University is located in")  # the space before a blank is swallowed
        + [tok.mask_token_id]
        + ref.encode(", China. The fox")
        + [tok.smask_token_id]
        + ref.encode(" jumps")  # the space after a blank stays
        + [tok.gmask_token_id, tok.eos_token_id]
    )
    assert ids == want
    for s in CORPUS[:4]:
        assert tok.encode(s, add_special_tokens=False) == ref.encode(s)
    assert tok.decode(tok.encode(CORPUS[0], add_special_tokens=False)) == CORPUS[0]
    assert tok.decode([tok.cls_token_id, *ref.encode(" fox"), tok.mask_token_id]) == "[CLS] fox[MASK]"


def test_sentencepiece_ids(tmp_path):
    spm = require("sentencepiece")
    model_prefix = str(tmp_path / "cog")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(["清华大学位于北京。", "GLM 是一个通用语言模型。", "自然语言处理很有趣。"] * 30))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=model_prefix, vocab_size=34, character_coverage=1.0, minloglevel=2,
        user_defined_symbols=["<n>"], bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    sp = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
    tok = GLMTokenizer.from_sentencepiece(model_prefix + ".model")
    n = sp.get_piece_size()
    # glm-10b-chinese / glm-large-chinese (HF ids): eos 50000, [SEP] 50001, [CLS] 50002, [MASK] 50003,
    # sop 50006, eop 50007, [sMASK] 50008, [gMASK] 50009
    assert (tok.eos_token_id, tok.specials["[SEP]"], tok.cls_token_id, tok.mask_token_id) == (n, n + 1, n + 2, n + 3)
    assert (tok.sop_token_id, tok.eop_token_id, tok.smask_token_id, tok.gmask_token_id) == (n + 6, n + 7, n + 8, n + 9)
    ids = tok.encode("清华大学位于[MASK]。\n自然语言")
    want = [n + 2] + sp.encode("清华大学位于") + [n + 3] + sp.encode("。") + [sp.piece_to_id("<n>")] + sp.encode("自然语言") + [n]
    assert ids == want
    assert tok.decode(tok.encode("清华大学位于北京。", add_special_tokens=False)) == "清华大学位于北京。"
    with pytest.raises(FileNotFoundError, match="cog-pretrain"):
        GLMTokenizer.from_sentencepiece(str(tmp_path / "missing.model"))


def test_bert_wordpiece_ids(tmp_path):
    require("transformers")
    from transformers import BertTokenizer

    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += sorted({w.strip(".,():").lower() for s in CORPUS for w in s.split()} | {".", ",", "(", ")", ":", "##s", "##ing"})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    ref = BertTokenizer(str(vocab), do_lower_case=True)
    tok = GLMTokenizer.from_bert(str(vocab))
    n = len(words)
    # glm-large: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, sop 30522 = N, eop 30523 = N + 1
    assert (tok.pad_token_id, tok.specials["[UNK]"], tok.cls_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 100, 101, 102, 103)
    assert (tok.sop_token_id, tok.eop_token_id) == (n, n + 1)
    assert tok.mask_token_ids == [103] and tok.default_mask == "[MASK]"
    text = "The quick brown fox [MASK] over the lazy dog."
    assert tok.encode(text) == ref.encode(text)  # [CLS] ... [SEP], [MASK] kept as one token


def test_fill_blanks_text_in_text_out(gpt2_files, tmp_path):
    """Text with blanks in, text with the blanks filled out, on a random model over the test vocabulary."""
    from lmzoo.glm import GLMConfig, GLMForConditionalGeneration
    from lmzoo.glm_infill import fill_blanks

    vocab, merges, n = gpt2_files
    tok = GLMTokenizer.from_gpt2(vocab, merges)
    cfg = GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, max_sequence_length=64, vocab_size=len(tok) + 3)
    model = GLMForConditionalGeneration(cfg, seed=0)
    texts = ["The quick [MASK] fox jumps over the [sMASK] dog.", "Tsinghua University is located in"]
    out = fill_blanks(model, tok, texts, max_gen_length=4)
    spans = fill_blanks(model, tok, texts, max_gen_length=4, return_ids=True)
    assert len(spans[0]) == 2 and len(spans[1]) == 1  # two blanks; one [gMASK] appended to the prompt with none
    ctx0 = tok.encode_for_blanks(texts[0])
    assert [m for m, _ in spans[0]] == [i for i, t in enumerate(ctx0) if t in tok.mask_token_ids]
    assert out[0].startswith("[CLS]The quick") and "[MASK]" not in out[0] and "[sMASK]" not in out[0]
    (m1, s1), (m2, s2) = spans[0]
    d = tok.decode
    assert out[0] == d(ctx0[:m1]) + d(s1) + d(ctx0[m1 + 1 : m2]) + d(s2) + d(ctx0[m2 + 1 :])
    assert out[1].startswith("[CLS]Tsinghua University is located in") and out[1].endswith("<|endoftext|>")

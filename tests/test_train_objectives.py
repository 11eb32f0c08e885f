"""Objective layouts on seeded samples (mask rates, span lengths, sentinel order, 2D positions, loss
masks) and, for every family, a few training steps on a tiny corpus whose loss falls."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from lmzoo.train import config as C
from lmzoo.train.loop import run
from lmzoo.train.objectives import make_objective, place_spans, poisson_span_lengths
from lmzoo.train.objectives.bart import permute_sentences, text_infilling
from lmzoo.train.objectives.cocolm import cocolm_mask, crop_span, scl_loss
from lmzoo.train.objectives.glm import make_block_data
from lmzoo.train.objectives.longlm import continuation, span_infilling
from lmzoo.train.objectives.palm import bert_mask, split_context
from lmzoo.train.tokenizer import Tokenizer, Vocab


def data(seq_len=64, target_len=32, batch_size=8):
    return C.DataSection(batch_size=batch_size, seq_len=seq_len, target_len=target_len)


# ---- LongLM -------------------------------------------------------------------------------------------
T5_VOCAB = Vocab(size=300, pad=3, eos=2, bos=1, unk=0, sentinels=tuple(299 - k for k in range(100)))


def test_longlm_span_infilling_layout():
    rng = np.random.default_rng(0)
    lengths, rates = [], []
    for _ in range(300):
        x = list(rng.integers(4, 200, 200))
        inp, tgt, spans = span_infilling(x, rng, mask_rate=0.15, span_lambda=3.0, sentinels=T5_VOCAB.sentinels, first_sentinel=1)
        assert sum(ln for _, ln in spans) == 30  # exactly round(0.15 * n) masked
        rates.append(sum(ln for _, ln in spans) / len(x))
        lengths += [ln for _, ln in spans[:-1]]  # the last span is cut to hit the total
        # sentinels <extra_id_1>, <extra_id_2>, ... in order, the same in input and target
        sent_in = [t for t in inp if t >= 200]
        sent_tg = [t for t in tgt if t >= 200]
        assert sent_in == sent_tg == [T5_VOCAB.sentinel(k) for k in range(1, len(spans) + 1)]
        assert T5_VOCAB.sentinel(0) not in inp
        # spans are separated by kept tokens and the pair reconstructs x
        assert all(s2 > s1 + l1 for (s1, l1), (s2, _) in zip(spans, spans[1:]))
        fill = {}
        cur = None
        for t in tgt:
            if t >= 200:
                cur = t
                fill[cur] = []
            else:
                fill[cur].append(t)
        rebuilt = [u for t in inp for u in (fill[t] if t >= 200 else [t])]
        assert rebuilt == x
    # zero-truncated Poisson(3) has mean 3 / (1 - e^-3) = 3.157
    assert abs(np.mean(lengths) - 3.157) < 0.15
    assert np.mean(rates) == pytest.approx(0.15)


def test_longlm_continuation_and_batch():
    rng = np.random.default_rng(1)
    x = list(range(10, 40))
    inp, tgt, p = continuation(x, rng, marker=T5_VOCAB.sentinel(1))
    assert inp == x[:p] + [T5_VOCAB.sentinel(1)] and tgt == [T5_VOCAB.sentinel(1)] + x[p:]
    obj = make_objective("longlm", T5_VOCAB, data(32, 16), {"continuation_prob": 0.5})
    b = obj.build([list(rng.integers(4, 200, obj.example_len)) for _ in range(64)], np.random.default_rng(2))
    assert 0.3 < b["task"].mean() < 0.7
    for i in range(64):
        n_in = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, n_in - 1] == 2 and np.all(b["input_ids"][i, n_in:] == 3)  # </s>, then pad
        lab = b["labels"][i]
        assert lab[0] == T5_VOCAB.sentinel(1)  # both tasks start their target with <extra_id_1>
        assert b["decoder_input_ids"][i, 0] == 1  # LongLM's decoder start
        np.testing.assert_array_equal(b["decoder_input_ids"][i, 1:][lab[:-1] != -100], lab[:-1][lab[:-1] != -100])
    with pytest.raises(C.TrainConfigError, match="target_len"):
        make_objective("longlm", T5_VOCAB, data(64, 8))
    with pytest.raises(C.TrainConfigError, match="unknown options"):
        make_objective("longlm", T5_VOCAB, data(), {"mask_ratio": 0.2})


def test_span_placement_is_uniform_and_separated():
    rng = np.random.default_rng(0)
    firsts = [place_spans(rng, 10, [2, 2], min_gap=1)[0] for _ in range(4000)]
    # starts (a, b) with b >= a + 3, b <= 8: first-start counts 6,5,4,3,2,1 of 21
    hist = np.bincount(firsts, minlength=6)[:6] / len(firsts)
    np.testing.assert_allclose(hist, np.array([6, 5, 4, 3, 2, 1]) / 21, atol=0.02)
    assert poisson_span_lengths(rng, 17, 3.0) and sum(poisson_span_lengths(rng, 17, 3.0)) == 17


# ---- GLM ----------------------------------------------------------------------------------------------
GLM_VOCAB = Vocab(size=120, pad=0, eos=1, cls=2, mask=3, sep=4, extra={"sop": 5, "eop": 6, "gmask": 7, "smask": 8, "dblock": 9})


def test_glm_block_layout_matches_the_worked_example():
    # spec §3: [CLS] x1..x6, spans (x3) and (x5 x6), Part B order (x5 x6) then (x3)
    CLS, M, SOP, EOP = 2, 3, 5, 6
    toks = [CLS, 11, 12, 13, 14, 15, 16]

    class Fixed:
        def permutation(self, n):
            return np.array([1, 0])

    ids, tgt, loss, pos, blk, sep = make_block_data(toks, [(3, 4), (5, 7)], [M, M], Fixed(), sop=SOP, eop=EOP)
    assert ids == [CLS, 11, 12, M, 14, M, SOP, 15, 16, SOP, 13]
    assert tgt[6:] == [15, 16, EOP, 13, EOP]
    assert loss == [0] * 6 + [1] * 5
    assert pos == [0, 1, 2, 3, 4, 5, 5, 5, 5, 3, 3]
    assert blk == [0] * 6 + [1, 2, 3, 1, 2]
    assert sep == 6


def test_glm_modes():
    rng = np.random.default_rng(0)
    ex = [list(rng.integers(20, 120, 60)) for _ in range(4)]
    tok = make_objective("glm", GLM_VOCAB, data(96), {"bert_prob": 1.0})
    for seed in range(20):
        b = tok.build(ex, np.random.default_rng(seed))
        for i in range(4):
            sep = b["attention_mask"][i]
            n_mask = int(np.sum(b["input_ids"][i, :sep] == 3))
            masked = int(b["loss_mask"][i].sum()) - n_mask  # Part B targets minus one eop per span
            assert masked >= int(0.15 * 61)
            assert b["input_ids"][i, 0] == 2 and np.all(b["position_ids"][i, 1, :sep] == 0)
            assert np.all(b["loss_mask"][i, :sep] == 0)
            # every Part-B position is the position of a mask token in Part A
            partb = b["loss_mask"][i] == 1
            assert set(b["position_ids"][i, 0][partb]) <= set(np.nonzero(b["input_ids"][i, :sep] == 3)[0])
    sent = make_objective("glm", GLM_VOCAB, data(96), {"bert_prob": 0.0, "gap_sentence_prob": 1.0, "task_mask": True, "sentence_end_ids": [50]})
    ex2 = [[t if j % 7 else 50 for j, t in enumerate(e)] for e in ex]
    b = sent.build(ex2, np.random.default_rng(0))
    assert np.all(np.sum(b["input_ids"] == 8, axis=1) >= 1)  # [sMASK]
    doc = make_objective("glm", GLM_VOCAB, data(96), {"bert_prob": 0.0, "gap_sentence_prob": 0.0, "gpt_infill_prob": 1.0, "task_mask": True})
    b = doc.build(ex, np.random.default_rng(0))
    for i in range(4):
        sep = b["attention_mask"][i]
        assert b["input_ids"][i, sep - 1] == 7 and b["input_ids"][i, sep] == 5  # ... [gMASK] [sop] suffix
        n = int(b["loss_mask"][i].sum())
        assert np.all(b["position_ids"][i, 0, sep : sep + n] == sep - 1)
        assert list(b["position_ids"][i, 1, sep : sep + n]) == list(range(1, n + 1))
        assert 6 not in b["labels"][i]  # suffix generation has no eop
        assert n >= int(0.5 * 61)


# ---- BART, PALM, COCO-LM ------------------------------------------------------------------------------
def test_bart_infilling_and_permutation():
    rng = np.random.default_rng(0)
    x = list(range(10, 110))
    perm = permute_sentences(x, rng, {19, 49, 79})
    assert sorted(perm) == x and perm != x
    removed = []
    for _ in range(200):
        out, n_masked = text_infilling(x, rng, mask_ratio=0.3, lam=3.5, mask_id=5, vocab_size=200, mask_random=0.0)
        assert 5 in out
        kept = [t for t in out if t != 5]
        assert kept == [t for t in x if t in set(kept)]  # order kept
        removed.append(len(x) - len(kept))
    assert 20 < np.mean(removed) <= 30  # ceil(0.3 n) masked, minus overlaps of merged spans
    v = Vocab(size=200, pad=1, bos=0, eos=2, mask=5)
    obj = make_objective("bart", v, data(64, 64), {"full_stop_ids": [19]})
    b = obj.build([x[:obj.example_len]] * 2, rng)
    assert b["labels"][0, 0] == 0 and b["decoder_input_ids"][0, 0] == 2 and b["input_ids"][0, 0] == 0


def test_palm_split_and_bert_mask():
    x = list(range(10, 60))
    assert split_context(x, 0.8, set()) == 40
    assert split_context(x, 0.8, {35}) == 26  # snapped back to the sentence end
    rng = np.random.default_rng(0)
    kinds = np.zeros(3)
    for _ in range(300):
        out, lab = bert_mask(x, rng, rate=0.15, mask_id=3, vocab_size=100)
        sel = np.array(lab) != -100
        assert sel.sum() == 8
        o = np.array(out)[sel]
        kinds += [np.sum(o == 3), np.sum((o != 3) & (o != np.array(x)[sel])), np.sum(o == np.array(x)[sel])]
    frac = kinds / kinds.sum()
    np.testing.assert_allclose(frac, [0.8, 0.1, 0.1], atol=0.03)


def test_cocolm_mask_crop_and_scl():
    rng = np.random.default_rng(0)
    s = [0] + list(range(10, 110)) + [2]
    ids, m = cocolm_mask(s, rng, rate=0.15, mask_id=4, protect={0, 2, 1})
    assert m.sum() == 15 and not m[0] and not m[-1] and np.all(ids[m] == 4)
    c = crop_span(s, rng, 0.9)
    assert len(c) == int(0.9 * len(s)) and c == s[s.index(c[0]) : s.index(c[0]) + len(c)]
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    g = np.stack([a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)], 1).reshape(6, 8)
    sim = g @ g.T / 0.5
    np.fill_diagonal(sim, -np.inf)
    logp = sim - np.log(np.sum(np.exp(sim), axis=1, keepdims=True))
    want = -0.5 * sum(logp[i, i ^ 1] for i in range(6))
    assert float(scl_loss(a, b, 0.5)) == pytest.approx(want, rel=1e-5)


# ---- every family trains ------------------------------------------------------------------------------
def _stream_examples(n_examples, length, rng, low=20, high=60):
    """A learnable corpus: a few repeated 'sentences' of token ids."""
    phrases = [list(rng.integers(low, high, 6)) for _ in range(5)]
    stream = [t for _ in range(n_examples * length // 6 + 1) for t in phrases[rng.integers(0, 5)]]
    return [np.asarray(stream[i * length : (i + 1) * length], np.int32) for i in range(n_examples)]


FAMILIES = {
    "bart": ("bart", {"vocab_size": 64, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                      "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64},
             Vocab(size=64, pad=1, bos=0, eos=2, mask=3), {}),
    "glm": ("glm", {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "max_sequence_length": 64},
            Vocab(size=64, pad=0, eos=1, cls=2, mask=3, sep=4, extra={"sop": 5, "eop": 6}), {}, 3e-3),
    "palm": ("palm", {"encoder": "bert", "bert": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 64, "max_position_embeddings": 64},
                      "dec_layers": 1, "dec_hidden_size": 32, "dec_heads": 2, "dec_ff_size": 64, "max_pos": 64,
                      "bos_token_id": 5, "eos_token_id": 6, "pad_token_id": 0},
             Vocab(size=64, pad=0, cls=5, sep=6, mask=7, eos=6), {}),
    "cocolm": ("cocolm", {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                          "max_position_embeddings": 64, "heads": ["generator", "binary", "clm"], "need_pooler": True, "generator_layers": 1},
               Vocab(size=64, pad=1, cls=0, sep=2, mask=3), {}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_and_loss_falls(tmp_path, family):
    objective, model_cfg, vocab, options, *lr = FAMILIES[family]
    fam = "bart" if family == "bart" else family
    cfg = C.TrainConfig.from_dict({
        "model": {"family": fam, "config": model_cfg},
        "mesh": {"data": 1},
        "optim": {"lr": lr[0] if lr else 1e-2, "warmup_steps": 3, "schedule": "constant", "clip_norm": 1.0},
        "data": {"batch_size": 8, "seq_len": 32, "target_len": 32, "prefetch": 0},
        "objective": {"name": objective, "options": options},
        "loop": {"steps": 30, "log_every": 5, "save_every": 0, "out_dir": str(tmp_path), "progress": False, "tensorboard": False},
    })
    tok = Tokenizer(lambda t: [], lambda ids: "", vocab, "")
    from lmzoo.train.objectives import make_objective as mk

    n = mk(objective, vocab, cfg.data, options).example_len
    ex = _stream_examples(64, n, np.random.default_rng(0))
    res = run(cfg, tokenizer=tok, train_examples=ex, devices=jax.devices()[:1])
    assert res.status == "done"
    losses = {}
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            losses[r["step"]] = r
    assert losses[30]["loss"] < losses[5]["loss"], losses
    # the falling term: the whole loss, or for COCO-LM (dominated by the 50x copy loss) its generator MLM
    key = "gen" if family == "cocolm" else "loss"
    assert losses[30][key] < 0.8 * losses[5][key], {s: r[key] for s, r in losses.items()}


def test_seq2seq_layouts():
    import types

    v = Vocab(size=50, pad=0, eos=2, bos=1)
    t5 = make_objective("seq2seq", v, data(8, 6), {"decoder_start_token_id": 1})
    b = t5.build([([5, 6, 7], [8, 9]), ([5] * 20, [9] * 20)], np.random.default_rng(0))
    assert b["input_ids"][0].tolist() == [5, 6, 7, 2, 0, 0, 0, 0] and b["input_ids"][1, -1] == 2
    assert b["labels"][0].tolist() == [8, 9, 2, -100, -100, -100] and b["decoder_input_ids"][0].tolist() == [1, 8, 9, 2, 0, 0]
    palm_cfg = types.SimpleNamespace(family="palm", bos_token_id=101, eos_token_id=102, pad_token_id=0)
    palm = make_objective("seq2seq", v, data(8, 6), model_config=palm_cfg)
    b = palm.build([([5, 6, 7], [8, 9])], np.random.default_rng(0))
    assert b["input_ids"][0].tolist() == [101, 5, 6, 7, 102, 0, 0, 0]
    assert b["labels"][0].tolist() == [101, 8, 9, 102, 0, 0] and "decoder_input_ids" not in b


def test_scl_gradient_is_finite_for_an_all_padding_row():
    """A zero pooled vector (e.g. an all-padding row) must not turn the contrastive gradient into NaN."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32).at[2].set(0.0)
    b = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32).at[2].set(0.0)
    ga, gb = jax.grad(lambda a, b: scl_loss(a, b, 0.5), argnums=(0, 1))(a, b)
    assert np.isfinite(np.asarray(ga)).all() and np.isfinite(np.asarray(gb)).all()
    assert np.isfinite(float(scl_loss(a, b, 0.5)))

"""Packing several examples per row with segment ids (data.pack): attend() with segment ids equals a dense
block-diagonal reference on both paths; a packed batch gives each example the logits and the summed loss
it gets alone in a row (T5 and BART, XLA; T5 on the Pallas kernel); the packer's groups and layout; a
short packed run's loss falls; objectives that cannot pack refuse data.pack=true by name."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmzoo.attention import attend, segment_positions
from lmzoo.layers import t5_relative_position_bucket
from lmzoo.train import config as C
from lmzoo.train.config import TrainConfigError
from lmzoo.train.data import Loader, document_pieces, read_corpus
from lmzoo.train.loop import build_model, run
from lmzoo.train.objectives import make_objective
from lmzoo.train.objectives.longlm import seq2seq_arrays
from lmzoo.train.objectives.sft import packed_kwargs
from lmzoo.train.packing import pack_groups
from lmzoo.train.tokenizer import Vocab, load_tokenizer

DATA = os.path.join(os.path.dirname(__import__("lmzoo").__file__), "data")
T5_VOCAB = Vocab(size=300, pad=3, eos=2, bos=1, unk=0, sentinels=tuple(299 - k for k in range(100)))
TINY_T5 = {"vocab_size": 600, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
           "eos_token_id": 2, "pad_token_id": 3, "decoder_start_token_id": 1, "dropout_rate": 0.0}
BART_VOCAB = Vocab(size=64, pad=1, bos=0, eos=2, mask=3)
TINY_BART = {"vocab_size": 64, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
             "dropout": 0.0}


# ---- attend() --------------------------------------------------------------------------------------
def _segments(rng, B, L, max_seg=3):
    """Rows of 1..k consecutive segments then padding (0)."""
    out = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, L - 2), size=max_seg, replace=False))
        pos = 0
        for k, c in enumerate(cuts, 1):
            out[b, pos:c] = k
            pos = c
    return out


def _dense_reference(q, k, v, visible, scale, bias=None):
    """Softmax attention with the float32 minimum added to hidden scores, in float64 numpy."""
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    if bias is not None:
        s = s + bias
    s = np.where(visible[:, None], s, s + np.finfo(np.float32).min)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v.astype(np.float64))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_attend_with_segment_ids_equals_a_block_diagonal_reference(impl):
    rng = np.random.default_rng(0)
    B, L, H, D = 2, 40, 2, 8
    q, k, v = (rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(3))
    seg = _segments(rng, B, L)
    key_mask = (seg > 0).astype(np.int32)
    table = rng.standard_normal((8, H)).astype(np.float32)
    bucket = lambda rel: t5_relative_position_bucket(rel, bidirectional=False, num_buckets=8, max_distance=16)  # noqa: E731
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    same = seg[:, :, None] == seg[:, None, :]  # built by hand: the block-diagonal mask
    bias = np.transpose(table[np.asarray(bucket(j - i))], (2, 0, 1))[None]
    cases = {
        "encoder": (dict(key_mask=key_mask), same & (key_mask[:, None, :] > 0), None),
        "causal+bias": (dict(causal=True, bias_table=table, bucket_fn=bucket), same & (j <= i)[None], bias),
    }
    real = seg > 0
    for name, (kw, visible, ref_bias) in cases.items():
        got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl, scale=D**-0.5, q_segment_ids=seg,
                     kv_segment_ids=seg, **kw)
        want = _dense_reference(q, k, v, visible, D**-0.5, ref_bias)
        np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-5, atol=1e-5, err_msg=f"{impl} {name}")


def test_segment_positions_restart_per_segment():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


# ---- packed == unpacked -----------------------------------------------------------------------------
def _packed_and_unpacked(obj, groups, seed=1):
    """The packed batch of ``groups`` and the same built examples one per row (same noise)."""
    packed = obj.build_packed(groups, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    pairs = [obj.example(x, rng) for g in groups for x in g]
    unpacked = seq2seq_arrays([p[0] for p in pairs], [p[1] for p in pairs], obj.seq_len, obj.target_len, obj.vocab.pad,
                              obj.decoder_start())
    return packed, unpacked


def _logits(model, batch):
    return np.asarray(model.forward(model.params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    decoder_input_ids=batch["decoder_input_ids"], **packed_kwargs(model, batch)).logits)


def _assert_packed_equals_unpacked(model, obj, packed, unpacked):
    sums_p, sums_u = (jax.device_get(obj.loss(model, model.params, b, None)) for b in (packed, unpacked))
    logits_p, logits_u = _logits(model, packed), _logits(model, unpacked)
    n = 0
    for r in range(packed["input_ids"].shape[0]):
        for s in range(1, packed["segment_ids"][r].max() + 1):
            rows = packed["decoder_segment_ids"][r] == s
            real = unpacked["labels"][n] != -100
            assert rows.sum() == real.sum()
            np.testing.assert_allclose(logits_p[r][rows], logits_u[n][real], rtol=1e-5, atol=1e-5)
            n += 1
    assert n == unpacked["input_ids"].shape[0]
    assert sums_p["count"] == sums_u["count"] == (unpacked["labels"] != -100).sum()
    np.testing.assert_allclose(sums_p["loss"], sums_u["loss"], rtol=1e-5)


def _groups(obj, lengths, rows, seed=0):
    rng = np.random.default_rng(seed)
    examples = [rng.integers(10, obj.vocab.size - 100 if obj.vocab.sentinels else obj.vocab.size, n).astype(np.int32) for n in lengths]
    groups = pack_groups(examples, obj.pack_lengths, obj.seq_len, obj.target_len, seed=seed)
    assert max(len(g) for g in groups) >= 3  # several examples share a row
    return groups[:rows]


@pytest.fixture(scope="module")
def t5_case():
    model = build_model(C.ModelSection(family="t5", config=TINY_T5))
    obj = make_objective("longlm", T5_VOCAB, C.DataSection(seq_len=48, target_len=48, pack=True), model_config=model.config)
    groups = _groups(obj, [9, 14, 6, 20, 11, 8, 16, 5], rows=2)
    return model, obj, _packed_and_unpacked(obj, groups)


def test_packed_t5_gives_each_example_its_unpacked_logits_and_loss(t5_case):
    model, obj, (packed, unpacked) = t5_case
    _assert_packed_equals_unpacked(model, obj, packed, unpacked)


def test_packed_t5_on_the_pallas_kernel(t5_case, kernel_calls):
    model, obj, (packed, unpacked) = t5_case
    cls = type(model)
    pallas = cls(dataclasses.replace(model.config, attention_impl="pallas"), params=model.params)
    logits_u, logits_p = _logits(model, unpacked), _logits(pallas, packed)
    assert kernel_calls and all(c.get("q_segment_ids") is not None for c in kernel_calls)
    n = 0
    for r in range(2):
        for s in range(1, packed["segment_ids"][r].max() + 1):
            rows = packed["decoder_segment_ids"][r] == s
            np.testing.assert_allclose(logits_p[r][rows], logits_u[n][unpacked["labels"][n] != -100], rtol=1e-5, atol=1e-5)
            n += 1


def test_packed_bart_gives_each_example_its_unpacked_logits_and_loss():
    model = build_model(C.ModelSection(family="bart", config=TINY_BART))
    obj = make_objective("bart", BART_VOCAB, C.DataSection(seq_len=48, target_len=48, pack=True), model_config=model.config)
    groups = _groups(obj, [9, 14, 6, 20, 11, 8, 16, 5], rows=2)
    packed, unpacked = _packed_and_unpacked(obj, groups)
    # learned positions restart per segment: a layout without them must give other logits
    assert packed["position_ids"][0, packed["segment_ids"][0] == 2][0] == 0
    _assert_packed_equals_unpacked(model, obj, packed, unpacked)


# ---- the packer --------------------------------------------------------------------------------------
def test_pack_groups_and_layout():
    v = Vocab(size=50, pad=0, eos=2, bos=1)
    obj = make_objective("seq2seq", v, C.DataSection(seq_len=24, target_len=12, pack=True), {"decoder_start_token_id": 1})
    rng = np.random.default_rng(0)
    pairs = [(list(rng.integers(5, 50, rng.integers(1, 14))), list(rng.integers(5, 50, rng.integers(0, 6)))) for _ in range(60)]
    pairs[0] = (pairs[0][0] + [7] * 30, pairs[0][1] + [8] * 20)  # longer than a row: cut as unpacked
    groups = pack_groups(pairs, obj.pack_lengths, 24, 12, seed=3)
    assert groups == pack_groups(pairs, obj.pack_lengths, 24, 12, seed=3)  # a pure function of the seed
    # every example exactly once, whole; each group within both budgets
    flat = [id(x) for g in groups for x in g]
    assert sorted(flat) == sorted(id(x) for x in pairs)
    for g in groups:
        assert sum(obj.pack_lengths(x)[0] for x in g) <= 24 and sum(obj.pack_lengths(x)[1] for x in g) <= 12
    assert len(groups) < len(pairs) / 2
    groups = sorted(groups, key=lambda g: not any(x is pairs[0] for x in g))  # the cut example's row first
    b = obj.build_packed(groups[:4], np.random.default_rng(0))
    for r, g in enumerate(groups[:4]):
        seg, dseg = b["segment_ids"][r], b["decoder_segment_ids"][r]
        n = len(g)
        assert sorted(set(seg.tolist()) - {0}) == list(range(1, n + 1))
        used = int((seg > 0).sum())  # segments 1..n back to back from the row start, then padding
        assert (seg[:used] > 0).all() and (np.diff(seg[:used]) >= 0).all() and (seg[used:] == 0).all()
        assert (b["attention_mask"][r] == (seg > 0)).all()
        for k, (src, tgt) in enumerate(g, 1):
            src_k = list(src)[:23] + [2]
            tgt_k = (list(tgt) + [2])[:12]
            assert b["input_ids"][r][seg == k].tolist() == src_k
            assert b["position_ids"][r][seg == k].tolist() == list(range(len(src_k)))
            assert b["labels"][r][dseg == k].tolist() == tgt_k
            assert b["decoder_position_ids"][r][dseg == k].tolist() == list(range(len(tgt_k)))
            # decoder input: the segment's targets shifted right behind the start token
            assert b["decoder_input_ids"][r][dseg == k].tolist() == [1] + tgt_k[:-1]
        # padding: pad ids, -100 labels, segment 0
        assert (b["input_ids"][r][seg == 0] == 0).all() and (b["labels"][r][dseg == 0] == -100).all()
        assert (b["labels"][r] != -100).sum() == sum(len((list(t) + [2])[:12]) for _, t in g)  # the loss count


def test_packed_loader_is_a_pure_function_of_step():
    obj = make_objective("longlm", T5_VOCAB, C.DataSection(seq_len=32, target_len=32, pack=True))
    rng = np.random.default_rng(0)
    pieces = document_pieces([rng.integers(4, 200, n) for n in rng.integers(3, 70, 40)], obj.example_len)
    assert all(2 <= len(p) <= obj.example_len for p in pieces)
    groups = pack_groups(pieces, obj.pack_lengths, 32, 32, seed=0)
    a = Loader(groups, obj.build_packed, batch_size=4, seed=5, prefetch=0)
    b = Loader(groups, obj.build_packed, batch_size=4, seed=5, prefetch=1)
    batches = [next(a) for _ in range(4)]
    b.restore({"step": 2})
    again = next(b)
    b.close()
    assert sorted(again) == sorted(batches[2])
    for k in again:
        np.testing.assert_array_equal(again[k], batches[2][k])


def test_packed_training_run_loss_falls(tmp_path):
    tok = load_tokenizer(os.path.join(DATA, "demo_spiece.model"))
    docs = read_corpus(os.path.join(DATA, "demo_corpus.txt"))
    pieces = document_pieces([tok.encode(d) for d in docs], 20)  # short examples: about three per row
    cfg = C.TrainConfig.from_dict({
        "model": {"family": "t5", "config": TINY_T5},
        "mesh": {"data": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 5, "schedule": "constant"},
        "data": {"batch_size": 8, "seq_len": 64, "target_len": 32, "pack": True, "prefetch": 1},
        "objective": {"name": "longlm"},
        "loop": {"steps": 30, "log_every": 5, "save_every": 0, "out_dir": str(tmp_path), "progress": False, "tensorboard": False},
    })
    res = run(cfg, tokenizer=tok, train_examples=pieces, devices=jax.devices()[:2])
    assert res.status == "done"
    rows = {r["step"]: r for r in map(json.loads, open(os.path.join(tmp_path, "metrics.jsonl")))}
    assert rows[30]["loss"] < 0.8 * rows[5]["loss"], {s: r["loss"] for s, r in rows.items()}
    obj = make_objective("longlm", tok.vocab, cfg.data)
    assert len(pieces) / len(pack_groups(pieces, obj.pack_lengths, 64, 32)) > 2


# ---- refusals ------------------------------------------------------------------------------------------
def test_objectives_that_cannot_pack_refuse_by_name(models):
    import types

    packed = C.DataSection(seq_len=32, target_len=32, pack=True)
    glm_vocab = Vocab(size=64, pad=0, eos=1, cls=2, mask=3, sep=4, extra={"sop": 5, "eop": 6})
    with pytest.raises(TrainConfigError, match="objective 'glm' cannot pack"):
        make_objective("glm", glm_vocab, packed)
    with pytest.raises(TrainConfigError, match="objective 'classification' cannot pack"):
        make_objective("classification", Vocab(size=64, pad=1, cls=0, sep=2, mask=3), packed)
    palm = types.SimpleNamespace(family="palm", bos_token_id=5, eos_token_id=6, pad_token_id=0)
    with pytest.raises(TrainConfigError, match="objective 'seq2seq' cannot pack rows: PALM"):
        make_objective("seq2seq", Vocab(size=64, pad=0, eos=6), packed, model_config=palm)
    lsg = types.SimpleNamespace(family="lsg_bart", decoder_start_token_id=2)
    with pytest.raises(TrainConfigError, match="objective 'bart' cannot pack rows: LSG-BART"):
        make_objective("bart", BART_VOCAB, packed, model_config=lsg)
    # the LSG-BART forward itself refuses segment ids
    m = models("lsg-bart-local")
    ids = np.full((1, 8), 5, np.int32)
    with pytest.raises(ValueError, match="LSG-BART cannot take packed rows"):
        m(input_ids=ids, decoder_input_ids=ids, segment_ids=np.ones_like(ids), decoder_segment_ids=np.ones_like(ids))

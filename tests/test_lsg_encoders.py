"""LSG attention in the encoders with a relative-position bias (COCO-LM, T5/LongLM) and ``--to-lsg`` for them.

The property that matters: in the short-input fallback an LSG model is exactly its source model run on the
sequence ``[globals; tokens]`` (globals as leading rows, which is where the bias rule puts them); on the
block path the bias follows the same positions, checked against a dense reference built by hand.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmzoo
from lmzoo.cocolm import LSGCocoLMModel, relative_position_bucket_vector
from lmzoo.configuration import ConfigError
from lmzoo.convert.checkpoint import open_checkpoint
from lmzoo.convert.cli import main as convert_main
from lmzoo.convert.lsg import order_positions
from lmzoo.layers import t5_relative_position_bucket
from lmzoo.lsg_attention import MIN, lsg_attention
from lmzoo.t5 import LSGT5ForConditionalGeneration

from .parity import assert_close, case_dir

COCO_SRC = case_dir("cocolm-cls")  # classifier head, 64 positions, 32 relative buckets up to distance 64
T5_SRC = case_dir("longlm-tiny")  # eos 1, pad 0, decoder start 1
G = 4


def _convert(src, dst, *extra):
    args = [src, str(dst), "--to-lsg", "--num-global-tokens", str(G), "-q", *extra]
    assert convert_main(args) == 0
    return str(dst)


@pytest.fixture(scope="module")
def coco_lsg(tmp_path_factory):
    """cocolm-cls converted for 256 tokens, blocks of 8, sparse norm keys (8 per side, factor 2)."""
    dst = _convert(COCO_SRC, tmp_path_factory.mktemp("coco") / "lsg", "--max-length", "256", "--block-size", "8",
                   "--sparse-block-size", "8", "--format", "pytorch")
    return dst, lmzoo.from_pretrained(dst)


def _variant(model, impl="xla", **changes):
    """The same weights under other LSG settings (a new model: its own compiled programs)."""
    params = model.params
    if changes.get("num_hidden_layers") == 1:  # COCO-LM's first layer only: a smaller program to compile
        params = dict(params, encoder={k: v for k, v in params["encoder"].items() if k != "layer_1"})
    return type(model)(model.config.replace(attention_impl=impl, **changes), params)


def _ids(n, t, seed=0, vocab=199):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(n, t))
    mask = np.ones_like(ids)
    mask[-1, t - t // 4:] = 0
    return ids, mask


# ----------------------------------------------------------------------------------------------------
# COCO-LM
# ----------------------------------------------------------------------------------------------------


def test_cocolm_fallback_is_the_source_model_on_globals_then_tokens(coco_lsg, models):
    """t <= 2 * block_size: the LSG model equals cocolm-cls run on [globals; tokens] (globals as leading
    rows), with the LSG authors' output rule: globals dropped, token 0's row is global 0's."""
    _, lsg = coco_lsg
    src = models("cocolm-cls")
    ids, mask = _ids(2, 14)
    emb = lsg.params["embeddings"]
    glob = np.asarray(emb["global_embeddings"]["embedding"][:G])
    pos0 = np.asarray(emb["position_embeddings"]["embedding"][0])
    word = np.asarray(emb["word_embeddings"]["embedding"])[ids]
    # the source adds position_embeddings[position_ids]: the globals get position 0, minus its vector
    ref = src(inputs_embeds=np.concatenate([np.broadcast_to(glob - pos0, (2, G, 64)), word], 1).astype(np.float32),
              attention_mask=np.concatenate([np.ones((2, G), int), mask], 1),
              position_ids=np.concatenate([np.zeros((2, G), int), np.broadcast_to(np.arange(14), (2, 14))], 1))
    want = np.array(ref.last_hidden_state)[:, G:]
    want[:, 0] = np.asarray(ref.last_hidden_state)[:, 0]
    # the converted config (norm sparsity, block 8) and local-only with block_size >= t take the same path
    for model in (lsg, _variant(lsg, sparsity_type="none", block_size=16)):
        out = model(input_ids=ids, attention_mask=mask)
        assert_close(out.last_hidden_state, want, name="last_hidden_state")
        assert_close(out.logits, ref.logits, name="logits")  # the classifier reads global 0


@pytest.mark.parametrize("sparsity", [None, "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh"])
def test_cocolm_long_input_every_sparsity_type(coco_lsg, sparsity):
    """45 tokens, blocks of 8: adaptive padding to 48 and 6 blocks; padded keys in the last row (one layer)."""
    _, lsg = coco_lsg
    model = _variant(lsg, sparsity_type=sparsity, num_hidden_layers=1)
    ids, mask = _ids(2, 45, seed=1)
    kw = {"lsh_key": jax.random.key(3)} if sparsity == "lsh" else {}
    out = model(input_ids=ids, attention_mask=mask, **kw)
    assert out.last_hidden_state.shape == (2, 45, 64) and out.logits.shape == (2, 3)
    assert np.isfinite(np.asarray(out.last_hidden_state)).all()
    if sparsity == "lsh":
        with pytest.raises(ValueError, match="lsh_key"):
            model(input_ids=ids, attention_mask=mask)


def test_cocolm_pallas_matches_xla_local_global(coco_lsg):
    """Local + global keys with the bias on the kernel (globals as a key prefix) vs the XLA path."""
    _, lsg = coco_lsg
    ids, mask = _ids(2, 45, seed=2)
    want = _variant(lsg, sparsity_type="none")(input_ids=ids, attention_mask=mask)
    got = _variant(lsg, "pallas", sparsity_type="none")(input_ids=ids, attention_mask=mask)
    assert_close(got.last_hidden_state, want.last_hidden_state, name="pallas last_hidden_state")
    assert_close(got.logits, want.logits, name="pallas logits")
    with pytest.raises(ConfigError, match="sparse keys"):
        _variant(lsg, "pallas", sparsity_type="norm")


def test_cocolm_to_lsg_writes_tiled_positions_globals_and_keys(coco_lsg, tmp_path):
    dst, model = coco_lsg
    assert type(model) is LSGCocoLMModel and model.config.heads == ("classifier",)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert (cfg["max_position_embeddings"], cfg["block_size"], cfg["sparse_block_size"], cfg["sparsity_type"],
            cfg["num_global_tokens"], cfg["pool_with_global"], cfg["adaptive"]) == (256, 8, 8, "norm", G, True, True)
    old, new = open_checkpoint(COCO_SRC), open_checkpoint(dst)
    src_pos = old["cocolm.embeddings.position_embeddings.weight"].numpy().astype(np.float32)
    table = new["cocolm.embeddings.position_embeddings.weight"].numpy()
    assert table.shape == (256, 64)
    np.testing.assert_array_equal(table, src_pos[np.arange(256) % 64])  # new position p = old p mod 64
    glob = new["cocolm.embeddings.global_embeddings.weight"].numpy()
    emb = old["cocolm.embeddings.word_embeddings.weight"].numpy().astype(np.float64)
    pos = order_positions(src_pos.astype(np.float64), 64, np.random.default_rng(123))
    assert glob.shape == (512, 64)
    np.testing.assert_allclose(glob[0], pos[0] + emb[0], rtol=1e-6, atol=1e-6)  # [CLS]
    np.testing.assert_allclose(glob[5], pos[5] + emb[199], rtol=1e-6, atol=1e-6)  # [MASK], the last id
    for k in old:  # everything else is the source's
        if k in new and "position" not in k:
            np.testing.assert_array_equal(new[k].numpy(), old[k].numpy().astype(new[k].numpy().dtype))
    back = lmzoo.from_pretrained(model.save_pretrained(tmp_path / "export", format="safetensors"))
    assert type(back) is LSGCocoLMModel and back.config == model.config
    jax.tree.map(np.testing.assert_array_equal, back.params, model.params)


def test_to_lsg_refuses_what_it_cannot_convert_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_main([case_dir("glm-blank"), str(out), "--to-lsg", "-q"]) == 1
    assert "GLM has no encoder" in capsys.readouterr().err and not out.exists()
    assert convert_main([COCO_SRC, str(out), "--to-lsg", "--block-size", "6", "--sparsity-factor", "4", "-q"]) == 1
    assert "sparsity_factor" in capsys.readouterr().err and not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary folder left either


# ----------------------------------------------------------------------------------------------------
# T5 / LongLM
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_lsg(tmp_path_factory):
    """longlm-tiny converted with blocks of 8, lsh sparse keys (8 per side, factor 2), globals 1.. from id 7."""
    dst = _convert(T5_SRC, tmp_path_factory.mktemp("t5") / "lsg", "--max-length", "1024", "--block-size", "8",
                   "--sparse-block-size", "8", "--sparsity-type", "lsh", "--mask-token-id", "7")
    return dst, lmzoo.from_pretrained(dst)


def test_t5_fallback_is_the_source_model_on_globals_then_tokens(t5_lsg, models):
    """t <= 2 * block_size: LSG-T5's logits and encoder states (globals passed to the decoder) are those of
    longlm-tiny run on [globals; tokens] with the globals unmasked in encoder and cross-attention."""
    _, lsg = t5_lsg
    src = models("longlm-tiny")
    ids, mask = _ids(2, 14)
    dec = ids[:, :5]
    glob = np.asarray(lsg.params["encoder"]["global_embeddings"]["embedding"][:G])
    word = np.asarray(lsg.params["shared"]["embedding"])[ids]
    ref = src(inputs_embeds=np.concatenate([np.broadcast_to(glob, (2, G, 64)), word], 1),
              attention_mask=np.concatenate([np.ones((2, G), int), mask], 1), decoder_input_ids=dec)
    out = lsg(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, lsh_key=jax.random.key(0))  # (unused here)
    assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, name="encoder_last_hidden_state")
    assert_close(out.logits, ref.logits, name="logits")


def test_t5_to_lsg_writes_globals_and_keys(t5_lsg):
    dst, model = t5_lsg
    assert type(model) is LSGT5ForConditionalGeneration
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert (cfg["block_size"], cfg["sparse_block_size"], cfg["sparsity_type"], cfg["num_global_tokens"],
            cfg["pass_global_tokens_to_decoder"], cfg["model_type"]) == (8, 8, "lsh", G, True, "t5")
    old, new = open_checkpoint(T5_SRC), open_checkpoint(dst)
    emb = old["shared.weight"].numpy()
    glob = new["encoder.global_embeddings.weight"].numpy()
    assert glob.shape == (512, 64)
    np.testing.assert_allclose(glob[0], emb[1], rtol=1e-6)  # eos: T5 has no positions to add
    np.testing.assert_allclose(glob[1:], np.broadcast_to(emb[7], (511, 64)), rtol=1e-6)  # --mask-token-id
    assert set(new) - set(old) == {"encoder.global_embeddings.weight"}
    for k in new:
        if k in old:
            np.testing.assert_array_equal(new[k].numpy(), old[k].numpy())


def test_t5_generates_from_a_long_input(t5_lsg):
    """45 tokens (6 blocks, lsh sparse keys): greedy generation, and the forward fed its output predicts
    the same tokens (generation encodes with the same globals, cross mask and default lsh key)."""
    _, model = t5_lsg
    ids, mask = _ids(2, 45, seed=4)
    out = model.generate(ids, attention_mask=mask, max_length=6, num_beams=1, do_sample=False)
    assert out.shape[0] == 2 and out[0, 0] == 1
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out[:, :-1], lsh_key=jax.random.key(0)).logits
    live = np.cumsum(out[:, :-1] == 1, axis=1) - (out[:, :1] == 1) == 0  # before eos (the start token is 1 too)
    np.testing.assert_array_equal(np.where(live, np.argmax(logits, -1), 0), np.where(live, out[:, 1:], 0))
    with pytest.raises(ValueError, match="LSG-T5 cannot take packed rows"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=out, segment_ids=mask)


# ----------------------------------------------------------------------------------------------------
# The attention function against a dense reference
# ----------------------------------------------------------------------------------------------------


def _coco_bucket(P=256, bins=32, max_rel=64):
    vec = jnp.asarray(relative_position_bucket_vector(P, bins, max_rel))
    return lambda rel: jnp.take(vec, jnp.clip(rel + P - 1, 0, 2 * P - 2))


def _t5_bucket(rel):
    return t5_relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=20)


def _dense_reference(q, k, v, mask, table, bucket_fn, scale, allowed):
    """float64 softmax attention over all G + t keys, the bias at positions (-G..-1, 0..t-1), keys outside
    ``allowed`` [H, t, t] (token query x token key) removed; globals see and are seen by everything."""
    n, H, T, d = q.shape
    t = T - G
    pos = np.concatenate([np.arange(G) - G, np.arange(t)])
    bias = np.asarray(table, np.float64)[np.asarray(bucket_fn(jnp.asarray(pos[None, :] - pos[:, None])))]  # [T,T,H]
    keep = np.ones((H, T, T), bool)
    keep[:, G:, G:] = allowed
    s = np.einsum("nhqd,nhkd->nhqk", *(np.asarray(a, np.float64) for a in (q, k))) * scale
    s = s + bias.transpose(2, 0, 1)[None] + np.concatenate([np.zeros((n, G)), mask], 1)[:, None, None, :]
    s = np.where(keep[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("nhqk,nhkd->nhqd", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64))


@pytest.mark.parametrize("steps", ["one-step", "several-steps"])
@pytest.mark.parametrize("family", ["cocolm", "t5"])
def test_block_path_equals_a_dense_reference_with_the_bias_rule(family, steps, monkeypatch):
    """Local + global (sparsity none) and stride sparse keys (exact token positions, per head) on the block
    path equal dense attention with the same visible keys and the bias at the rule's positions; with T5's
    scale (1.0) and bucket the kernel path agrees too. "several-steps": the XLA loop takes runs of at most 2 blocks,
    so the global queries' softmax is merged from several partial ones, each with its own bias offset."""
    rng = np.random.default_rng(0)
    n, H, d, B, t = 2, 4, 8, 8, 40
    if steps == "several-steps":
        import lmzoo.lsg_attention as lsg

        monkeypatch.setattr(lsg, "_XLA_CHUNK_QUERIES", 2 * B)
    scale, bucket_fn = (d**-0.5, _coco_bucket()) if family == "cocolm" else (1.0, _t5_bucket)
    table = jnp.asarray(rng.normal(size=(32, H)), jnp.float32)
    q, k, v = (jnp.asarray(rng.normal(size=(n, H, G + t, d)), jnp.float32) for _ in range(3))
    mask = np.zeros((n, t), np.float32)
    mask[1, 33:] = MIN
    blk = np.arange(t) // B
    local = np.abs(blk[:, None] - blk[None, :]) <= 1

    def run(sparsity, impl="xla"):
        fn = jax.jit(lambda q, k, v, m, tab: lsg_attention(
            q, k, v, m, num_global_tokens=G, block_size=B, sparse_block_size=8, sparsity_factor=2, sparsity_type=sparsity,
            impl=impl, scale=scale, bias_table=tab, bucket_fn=bucket_fn))
        return fn(q, k, v, jnp.asarray(mask), table)

    want = _dense_reference(q, k, v, mask, table, bucket_fn, scale, np.broadcast_to(local, (H, t, t)))
    for impl in ("xla", "pallas") if family == "t5" else ("xla",):
        assert_close(run("none", impl), want, name=f"{family} none {impl}")
    # stride: head h sees tokens j*2 + h%2 of the 8 sparse tokens before and after its window
    sparse = np.zeros((H, t, t), bool)
    for h in range(H):
        for i in range(t // B):
            s_lo = (i - 1) * B // 2 - 8
            for sp in list(range(s_lo, s_lo + 8)) + list(range((i + 2) * B // 2, (i + 2) * B // 2 + 8)):
                if 0 <= sp < t // 2:
                    sparse[h, i * B:(i + 1) * B, sp * 2 + h % 2] = True
    assert not (sparse & local).any()  # a regular geometry: sparse keys never repeat local ones
    want = _dense_reference(q, k, v, mask, table, bucket_fn, scale, sparse | local)
    assert_close(run("stride"), want, name=f"{family} stride")

"""LongLM / T5: parity cases, live parity against transformers, export round trips, compile counting."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import lmzoo
from lmzoo.generation import compile_count

from .conftest import require
from .parity import assert_close, case_dir, cases, load_generate_records, load_npz

T5_CASES = cases(("longlm-",))
# parity/README.md: longlm-gated's logits are ill-conditioned (float64 moves them 1.9e-4): atol 5e-4 there.
ILL_CONDITIONED = {("longlm-gated", "logits"): dict(atol=5e-4, rtol=0.0)}

_models: dict = {}


def load_case_model(name):
    if name not in _models:
        _models[name] = lmzoo.from_pretrained(case_dir(name))
    return _models[name]


def test_cases_present():
    assert {"longlm-tiny", "longlm-gated"} <= set(T5_CASES)


@pytest.mark.parametrize("name", T5_CASES)
def test_forward_matches_original(name):
    model = load_case_model(name)
    out = model(**load_npz(name))
    for key, want in load_npz(name, "outputs.npz").items():
        tol = ILL_CONDITIONED.get((name, key), {})
        assert_close(out[key], want, name=f"{name}:{key}", **tol)


@pytest.mark.parametrize("name", T5_CASES)
def test_generate_matches_original(name):
    model = load_case_model(name)
    records = load_generate_records(name)
    assert records
    for i, r in enumerate(records):
        got = model.generate(np.array(r["input_ids"]), attention_mask=np.array(r["attention_mask"]), **r["kwargs"])
        want = np.array(r["output_ids"])
        assert got.shape == want.shape, f"{name} record {i}: shape {got.shape} != {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=f"{name} record {i} ({r['kwargs']})")


def test_generate_compiles_once_per_bucket_and_beam_width():
    model = lmzoo.from_pretrained(case_dir("longlm-tiny"))
    rng = np.random.default_rng(0)
    before = compile_count(model)
    for length, max_length in ((11, 12), (17, 20), (30, 25)):
        ids = rng.integers(2, 190, size=(2, length))
        model.generate(ids, max_length=max_length, num_beams=1, decoder_start_token_id=1)
    assert compile_count(model) - before == 1  # same input bucket (<=32), same cache bucket (<=64)
    for length in (9, 23):
        ids = rng.integers(2, 190, size=(2, length))
        model.generate(ids, max_length=15, num_beams=3, length_penalty=1.5, decoder_start_token_id=1)
    assert compile_count(model) - before == 2  # one more for beam width 3


def test_sampling_is_reproducible_from_seed():
    model = load_case_model("longlm-tiny")
    ids = np.random.default_rng(1).integers(2, 190, size=(2, 12))
    kw = dict(do_sample=True, top_p=0.9, top_k=40, temperature=0.7, max_length=16, decoder_start_token_id=1)
    a = model.generate(ids, seed=3, **kw)
    b = model.generate(ids, seed=3, **kw)
    c = model.generate(ids, seed=4, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a[:, 0] == 1).all()


def test_bad_generate_arguments_are_named():
    model = load_case_model("longlm-tiny")
    ids = np.array([[5, 6, 7]])
    with pytest.raises(TypeError, match="num_beam"):
        model.generate(ids, num_beam=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(np.array([[5, 600]]))
    with pytest.raises(TypeError, match="unexpected keyword"):
        model(input_ids=ids, decoder_input_ids=ids, bogus=ids)


# --------------------------------------------------------------------------------------------------
# live parity vs transformers on random tiny configs (both FFN variants)
def _random_hf_t5(feed_forward_proj: str, tie: bool, seed: int):
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=3,
        relative_attention_num_buckets=16, relative_attention_max_distance=40, feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tie, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # the default init is too gentle to catch much
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=[("relu", True), ("gated-gelu", False)], ids=["relu-tied", "gated-untied"])
def live_pair(request, tmp_path_factory):
    torch = require("torch")
    hf = _random_hf_t5(*request.param, seed=7)
    d = tmp_path_factory.mktemp("hf_t5")
    hf.save_pretrained(d, safe_serialization=request.param[0] == "relu")  # one .safetensors, one .bin
    return hf, lmzoo.from_pretrained(str(d)), torch


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 96, size=(2, 37))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    ids[1, 25:] = 0
    dec = rng.integers(2, 96, size=(2, 21))
    return ids, mask, dec


def test_live_forward_matches_transformers(live_pair):
    hf, model, torch = live_pair
    ids, mask, dec = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec))
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    assert_close(out.logits, ref.logits.numpy(), name="logits")
    assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state.numpy(), name="encoder")


def test_live_loss_matches_transformers(live_pair):
    hf, model, torch = live_pair
    ids, mask, dec = _inputs(1)
    labels = dec.copy()
    labels[0, 15:] = -100
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref.loss.numpy(), name="loss", atol=1e-5, rtol=1e-5)
    assert_close(out.logits, ref.logits.numpy(), name="logits")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=1, max_length=14),
        dict(num_beams=3, max_length=14, length_penalty=1.3, no_repeat_ngram_size=2, early_stopping=True, min_length=5),
        dict(num_beams=2, max_new_tokens=9, repetition_penalty=1.4, early_stopping="never", num_return_sequences=2),
    ],
    ids=["greedy", "beam3", "beam2-never-nrs2"],
)
def test_live_generate_matches_transformers(live_pair, kwargs):
    hf, model, torch = live_pair
    ids, mask, _ = _inputs(2)
    # make some token the model actually emits the eos, so rows finish early
    with torch.no_grad():
        probe = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_length=8, num_beams=1, do_sample=False)
    eos = int(probe[0, 3])
    kw = dict(kwargs, eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0, do_sample=False)
    with torch.no_grad():
        want = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).numpy()
    got = model.generate(ids, attention_mask=mask, **kw)
    assert got.shape == want.shape, (got, want)
    np.testing.assert_array_equal(got, want)


def test_few_row_decoding_multiplies_by_out_major_copies(live_pair):
    """On CPU a search with 1 to 32 rows multiplies by out-major ([out, in]) copies of the matrices the
    decoding step reads, made once per params and kept on the model: the decoder's and an untied LM head's
    kernels, not the encoder's nor the cross-attention key / value projections (those run once, before the
    loop). The copies are the kernels transposed, and the tokens are those of the plain step. None are made
    when they would take more than ``out_major_decode_max_bytes``."""
    from lmzoo.convert.keymap import flatten_tree

    _, model, _ = live_pair
    ids, mask, _ = _inputs(2)
    kw = dict(num_beams=2, max_length=12, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
    model.drop_decode_copies()
    try:
        model.out_major_decode_weights = False
        plain = model.generate(ids, attention_mask=mask, **kw)
        assert model._out_major is None
        model.out_major_decode_weights = True
        fast = model.generate(ids, attention_mask=mask, **kw)
        np.testing.assert_array_equal(fast, plain)
        sources, copies = model._out_major
        flat = flatten_tree(model.params)
        assert all(sources[k] is flat[k] for k in sources)
        want = {k for k in flat if k[0] in ("decoder", "lm_head") and k[-1] == "kernel"
                and k[-3:-1] not in (("cross_attn", "k"), ("cross_attn", "v"))}
        per_block = 4 + 2 + (3 if model.config.is_gated else 2)  # self q k v o, cross q o, the MLP
        assert set(copies) == want and len(want) == 3 * per_block + (not model.config.tie_word_embeddings)
        for k in want:
            np.testing.assert_array_equal(np.asarray(copies[k]), np.asarray(flat[k]).T, err_msg=str(k))
        model.generate(ids, attention_mask=mask, **kw)
        assert model._out_major[1] is copies  # kept, not remade
        model._out_major = (sources, {k: v * 0 for k, v in copies.items()})  # the step really reads them
        assert not np.array_equal(model.generate(ids, attention_mask=mask, **kw), plain)
        block = model.params["decoder"]["block_0"]["mlp"]
        name = "wi" if "wi" in block else "wi_0"
        block[name] = dict(block[name], kernel=block[name]["kernel"] + 0)  # a kernel replaced in place: remade
        np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, **kw), plain)
        assert model._out_major[1] is not copies
        model.drop_decode_copies()
        greedy = dict(kw, num_beams=1)
        one_plain = model.generate(ids[:1], attention_mask=mask[:1], **greedy)
        assert set(model._out_major[1]) == want  # one row, a matrix-vector product, reads them too
        held, one_copies = model._out_major
        model._out_major = (held, {k: v * 0 for k, v in one_copies.items()})
        assert not np.array_equal(model.generate(ids[:1], attention_mask=mask[:1], **greedy), one_plain)
        model.drop_decode_copies()
        model.out_major_decode_max_bytes = sum(flat[k].nbytes for k in want) - 1  # one byte short
        np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, **kw), plain)
        assert model._out_major[1] == {}  # too big to hold twice: the kernels as stored
    finally:
        del model.out_major_decode_weights
        model.__dict__.pop("out_major_decode_max_bytes", None)
        model.drop_decode_copies()


@pytest.mark.parametrize("fmt", ["pytorch", "safetensors", "orbax"])
def test_export_round_trip(live_pair, fmt, tmp_path):
    hf, model, torch = live_pair
    transformers = require("transformers")
    out = tmp_path / f"export-{fmt}"
    model.save_pretrained(out, format=fmt)
    ids, mask, dec = _inputs(3)
    again = lmzoo.from_pretrained(str(out))
    np.testing.assert_array_equal(
        np.asarray(again(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits),
        np.asarray(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits),
    )
    if fmt != "orbax":
        back = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
        with torch.no_grad():
            ref = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec))
        assert_close(np.asarray(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits), ref.logits.numpy(), name="logits")
        # every original weight came back unchanged
        sd_hf, sd_back = hf.state_dict(), back.state_dict()
        for k, v in sd_hf.items():
            np.testing.assert_array_equal(sd_back[k].numpy(), v.numpy(), err_msg=k)
    with open(out / "config.json") as f:
        assert lmzoo.detect_family(json.load(f)) == "t5"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".lmzoo")]  # no temp folders left


# --------------------------------------------------------------------------------------------------
# attention_impl="pallas": the block-sparse kernel (interpret mode on CPU) gives the same results
@pytest.mark.parametrize("name", T5_CASES)
def test_pallas_forward_matches_original(name):
    model = lmzoo.from_pretrained(case_dir(name), attention_impl="pallas")
    out = model(**load_npz(name))
    for key, want in load_npz(name, "outputs.npz").items():
        assert_close(out[key], want, name=f"{name}:{key}", **ILL_CONDITIONED.get((name, key), {}))


def test_pallas_beam_generation_matches_original():
    model = lmzoo.from_pretrained(case_dir("longlm-tiny"), attention_impl="pallas")
    r = load_generate_records("longlm-tiny")[3]  # beam 4 with eos override, early stopping
    got = model.generate(np.array(r["input_ids"]), attention_mask=np.array(r["attention_mask"]), **r["kwargs"])
    np.testing.assert_array_equal(got, np.array(r["output_ids"]))


def test_pallas_training_gradients_match_xla():
    import jax

    xla = load_case_model("longlm-tiny")
    pallas = lmzoo.from_pretrained(case_dir("longlm-tiny"), attention_impl="pallas")
    batch = load_npz("longlm-tiny")
    labels = batch["decoder_input_ids"].copy()
    labels[batch["decoder_attention_mask"] == 0] = -100
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)

    def grads(model):
        return jax.jit(jax.value_and_grad(lambda p: model.forward(p, **inputs).loss))(model.params)

    (lx, gx), (lp, gp) = grads(xla), grads(pallas)
    assert_close(lp, lx, name="loss", atol=1e-5, rtol=1e-5)
    # Gradients are compared normwise: the XLA path itself is ~1.2e-5 (4.6e-5 of max|g|) away from a
    # float64 evaluation on this peaky case, so elementwise relative checks would test rounding noise.
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gp)[0], jax.tree.leaves(gx)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= 1e-4 * scale + 1e-7, (jax.tree_util.keystr(path), np.abs(a - b).max(), scale)

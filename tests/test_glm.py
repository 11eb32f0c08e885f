"""GLM: parity cases through the public API, generation records, the infilling layout, heads, sharding."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmzoo
from lmzoo.glm import GLM_SIZES, GLMConfig, GLMForConditionalGeneration, build_attention_mask
from lmzoo.glm_infill import blank_layout, glm_decoding

from .conftest import require
from .parity import assert_close, case_dir, cases, load_generate_records, load_npz

GLM_CASES = cases(("glm-",))


def test_cases_present():
    assert {"glm-blank", "glm-4dmask", "glm-causal", "glm-incremental"} <= set(GLM_CASES)


@pytest.mark.parametrize("name", GLM_CASES)
def test_forward_parity(models, name):
    model = models(name)
    assert isinstance(model, GLMForConditionalGeneration)
    out = model(**load_npz(name))
    for key, want in load_npz(name, "outputs.npz").items():
        assert_close(out[key], want, name=f"{name}:{key}")
    if os.path.exists(os.path.join(case_dir(name), "inputs_step2.npz")):
        inputs2 = load_npz(name, "inputs_step2.npz")
        want2 = load_npz(name, "outputs_step2.npz")
        out2 = model(**inputs2)
        for key, want in want2.items():
            assert_close(out2[key], want, name=f"{name}:step2:{key}")
        if "mems" in inputs2:  # mems may also be a list of L+1 arrays, as the original takes them
            inputs2["mems"] = list(inputs2["mems"])
            assert_close(model(**inputs2).logits, want2["logits"], name=f"{name}:step2:list-mems")


def _sep_mask(sep, T):
    i = np.arange(T)
    return ((i[None, :] < sep) | (i[None, :] <= i[:, None]))[None, None].astype(np.int64)


@pytest.mark.parametrize("name", [c for c in GLM_CASES if load_generate_records(c)])
def test_generate_records(models, name):
    model = models(name)
    for n, rec in enumerate(load_generate_records(name)):
        kw = rec["kwargs"]
        if "output_ids" in rec:  # the original HF generate(): padded batch, full layout given
            got = model.generate(
                np.array(rec["input_ids"]),
                attention_mask=np.array(rec["attention_mask"]) if "attention_mask" in rec else None,
                position_ids=np.array(rec["position_ids"]),
                generation_attention_mask=np.array(rec["generation_attention_mask"]),
                **kw,
            )
            want = np.array(rec["output_ids"])
            assert got.shape == want.shape, f"record {n}: shape {got.shape} != {want.shape}"
            np.testing.assert_array_equal(got, want, err_msg=f"{name} record {n}")
        else:  # one example at a time, sep-form mask, each new token at the blank's position, block + 1
            G = kw["max_new_tokens"]
            for b, ids in enumerate(rec["input_ids"]):
                pos = np.array(rec["position_ids"][b])
                L = len(ids)
                full = np.concatenate([pos, np.stack([np.full(G, pos[0, -1]), pos[1, -1] + np.arange(1, G + 1)])], axis=1)
                got = model.generate(
                    np.array([ids]),
                    position_ids=full[None],
                    generation_attention_mask=_sep_mask(rec["sep"][b], L + G),
                    **kw,
                )
                want = rec["generated_ids"][b]
                np.testing.assert_array_equal(got[0, L : L + len(want)], want, err_msg=f"{name} record {n} row {b}")


def test_step_matches_full_forward(models):
    """The KV-cache step reproduces the full forward's logits at every generated position."""
    model = models("glm-blank")
    inputs = load_npz("glm-blank")
    ids, pos = inputs["input_ids"][:1], inputs["position_ids"][:1]  # row 0: context 12, sop + 4 tokens
    sep = 12
    full = np.asarray(model(input_ids=ids, position_ids=pos, attention_mask=np.array([sep])).logits)[0]
    dec = glm_decoding(model)
    T = ids.shape[1]
    mask = jnp.asarray(_sep_mask(sep, T) != 0)
    static, cache = dec.start(model.params, {"input_ids": jnp.asarray(ids[:, : sep + 1]), "position_ids": jnp.asarray(pos), "generation_attention_mask": mask}, T)
    step = jax.jit(dec.step)
    for i in range(sep, T):
        logits, cache = step(model.params, static, cache, jnp.asarray(ids[:, i]), jnp.int32(i))
        assert_close(logits[0], full[i], name=f"step {i}")


def test_gelu_variant_is_a_config_field():
    """tanh GELU (the original training code) is a config override; the parity rule tells it from erf (HF)."""
    name = "glm-causal"
    model = lmzoo.from_pretrained(case_dir(name), gelu_approximate=True)
    assert model.config.gelu_approximate and "gelu_approximate" not in GLMConfig().to_hf_config()
    got = np.asarray(model(**load_npz(name)).logits, np.float64)
    want = load_npz(name, "outputs.npz")["logits"]
    diff = np.abs(got - want)
    assert diff.max() > 5e-4 and (diff <= 1e-4 + 1e-4 * np.abs(want)).mean() < 0.99


def _numpy_glm(params, cfg, ids, pos, sep):
    """Float64 NumPy forward written from the spec (used for the attention_scale > 1 branch)."""
    from scipy.special import erf

    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    t = P["transformer"]
    ln = lambda x, p: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]
    x = P["word_embeddings"]["embedding"][ids] + t["position_embeddings"]["embedding"][pos[:, 0]] + t["block_position_embeddings"]["embedding"][pos[:, 1]]
    S, _n, d, a = ids.shape[1], cfg.num_attention_heads, cfg.head_dim, cfg.attention_scale
    i = np.arange(S)
    m = ((i[None, :] < np.asarray(sep)[:, None, None]) | (i[None, :] <= i[:, None]))[:, None].astype(np.float64)
    for li in range(cfg.num_layers):
        L = t[f"layers_{li}"]
        at = L["attention"]
        qkv = np.einsum("bsh,hknd->bsknd", ln(x, L["input_layernorm"]), at["qkv_kernel"]) + at["qkv_bias"]
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        sc = (q / np.sqrt(a)) @ (k.transpose(0, 1, 3, 2) / np.sqrt(d * a))
        sc = sc * m
        sc = (sc - sc.max(-1, keepdims=True)) * a + (-65504.0) * (1 - m)
        p_ = np.exp(sc - sc.max(-1, keepdims=True))
        p_ /= p_.sum(-1, keepdims=True)
        ctx = (p_ @ v).transpose(0, 2, 1, 3)
        x = x + np.einsum("bsnd,ndh->bsh", ctx, at["dense_kernel"]) + at["dense_bias"]
        h = ln(x, L["post_attention_layernorm"])
        mlp = L["mlp"]
        h = h @ mlp["dense_h_to_4h"]["kernel"] + mlp["dense_h_to_4h"]["bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = x + h @ mlp["dense_4h_to_h"]["kernel"] + mlp["dense_4h_to_h"]["bias"]
    y = ln(x, t["final_layernorm"])
    return y @ P["word_embeddings"]["embedding"].T


def test_attention_scale_branch_matches_numpy_reference():
    require("scipy")
    cfg = GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, max_sequence_length=16, vocab_size=50, attention_scale=2.0)
    model = GLMForConditionalGeneration(cfg, seed=3)
    params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), model.params)
    model.params = params
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (2, 9))
    pos = np.stack([np.stack([np.r_[np.arange(5), [2] * 4], np.r_[[0] * 5, 1 + np.arange(4)]])] * 2)
    got = model(input_ids=ids, position_ids=pos, attention_mask=np.array([5, 3])).logits
    assert_close(got, _numpy_glm(params, cfg, ids, pos, [5, 3]), name="attention_scale=2")


# ---- attention-mask forms ------------------------------------------------------------------------
def test_mask_forms_agree(models):
    """sep form == the explicit 4-D mask it stands for; 2-D mask = key padding only; None = causal."""
    model = models("glm-blank")
    inputs = load_npz("glm-blank")
    ids, pos = inputs["input_ids"], inputs["position_ids"]
    seps = inputs["attention_mask"]
    T = ids.shape[1]
    four_d = np.concatenate([_sep_mask(s, T) for s in seps])
    a = model(input_ids=ids, position_ids=pos, attention_mask=seps).logits
    b = model(input_ids=ids, position_ids=pos, attention_mask=four_d).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m2 = np.asarray(build_attention_mask(np.ones((2, T), np.int64), 2, T))
    assert m2.shape == (2, 1, 1, T) and m2.all()
    causal = np.asarray(build_attention_mask(None, 2, T))
    np.testing.assert_array_equal(causal[0, 0], np.tril(np.ones((T, T), bool)))
    with pytest.raises(ValueError, match="attention_mask"):
        build_attention_mask(np.ones((2, T, T)), 2, T)


def test_right_padding_does_not_change_generated_logits(models):
    """Property: for random contexts, Part-B logits are the same whether the context is right-padded
    (HF layout, pads masked as keys) or not (sep form), whatever the padding amount. Every call is padded
    at the END to one length (causal tail: invisible to earlier rows), so there is one compile."""
    model = models("glm-blank")
    rng = np.random.default_rng(0)
    T = 20
    for trial in range(4):
        Lc = int(rng.integers(4, 9))
        pad = int(rng.integers(1, 6))
        ctx = [258] + list(rng.integers(0, 255, Lc - 3)) + [259, 255]
        span = list(rng.integers(0, 255, 3))
        outs = []
        for n_pad in (0, pad):
            lay = blank_layout([ctx + [255] * n_pad], [[]], next_mask=[Lc - 2], max_gen_length=T, sop_id=256, pad_id=255)
            lay.generation_attention_mask[0, 0, :, Lc : Lc + n_pad] = 0  # the pads are padding, not text
            L = Lc + n_pad
            ids = np.concatenate([lay.input_ids[0], span])
            ids = np.concatenate([ids, np.full(T - len(ids), 255)])[None]
            logits = model(input_ids=ids, position_ids=lay.position_ids[:, :, :T], attention_mask=lay.generation_attention_mask[:, :, :T, :T]).logits
            outs.append(np.asarray(logits)[0, L : L + 4])
        assert_close(outs[1], outs[0], name=f"trial {trial}", atol=1e-5, rtol=1e-5)


# ---- blank-infilling layout (spec worked examples) -------------------------------------------------
def test_layout_worked_example():
    """Spec §3: [CLS] x1 x2 [MASK] x4 [MASK], spans (x5 x6) then (x3): positions and block positions."""
    CLS, MASK, SOP, PAD = 258, 259, 256, 255
    x = {i: 10 + i for i in range(1, 7)}
    ctx = [CLS, x[1], x[2], MASK, x[4], MASK]
    lay = blank_layout([ctx], [[(5, [x[5], x[6]])]], next_mask=[3], max_gen_length=2, sop_id=SOP, pad_id=PAD)
    ids = list(lay.input_ids[0]) + [x[3]]
    assert ids == [CLS, x[1], x[2], MASK, x[4], MASK, SOP, x[5], x[6], SOP, x[3]]
    assert list(lay.position_ids[0, 0]) == [0, 1, 2, 3, 4, 5, 5, 5, 5, 3, 3]
    assert list(lay.position_ids[0, 1]) == [0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    # query i sees key j iff j < sep (= 6) or j <= i
    np.testing.assert_array_equal(lay.generation_attention_mask[0, 0], _sep_mask(6, 11)[0, 0])


@pytest.mark.parametrize("blank", [259, 263, 262])  # [MASK], [sMASK], [gMASK]
def test_layout_single_blank_each_kind(blank):
    """HF build_inputs_for_generation: context 0..Lc-1, then the blank's position G times, block ids 1..G."""
    ctx = [258, 5, 6, blank, 7, 255]
    G = 4
    lay = blank_layout([ctx], next_mask=[3], max_gen_length=G, sop_id=256, pad_id=255)
    assert list(lay.input_ids[0]) == ctx + [256]
    assert list(lay.position_ids[0, 0]) == list(range(6)) + [3] * G
    assert list(lay.position_ids[0, 1]) == [0] * 6 + list(range(1, G + 1))
    m = lay.generation_attention_mask[0, 0]
    assert m[:6, :6].all() and not m[:6, 6:].any()  # Part A: bidirectional, never sees Part B
    np.testing.assert_array_equal(m[6:, 6:], np.tril(np.ones((G, G), np.int64)))
    assert m[6:, :6].all()


def test_layout_two_blanks_batch_padded():
    """Two blanks (of different kinds), two rows of different lengths: the second round keeps the first span
    (at its own blank's position) and pads Part B of the shorter row with masked slots."""
    r0 = [258, 5, 259, 6, 262, 255]  # [MASK] at 2, [gMASK] at 4
    r1 = [258, 263, 7, 259, 255]  # [sMASK] at 1, [MASK] at 3
    spans = [[(2, [20, 21, 22])], [(1, [30])]]
    lay = blank_layout([r0, r1], spans, next_mask=[4, 3], max_gen_length=3, sop_id=256, pad_id=255)
    assert lay.context_length == 6
    assert list(lay.input_ids[0]) == r0 + [256, 20, 21, 22] + [256]
    assert list(lay.input_ids[1]) == r1 + [255] + [256, 30, 255, 255] + [256]
    assert list(lay.position_ids[0, 0]) == [0, 1, 2, 3, 4, 5, 2, 2, 2, 2, 4, 4, 4]
    assert list(lay.position_ids[0, 1]) == [0] * 6 + [1, 2, 3, 4] + [1, 2, 3]
    assert list(lay.position_ids[1, 0])[6:] == [1, 1, 0, 0, 3, 3, 3]
    m1 = lay.generation_attention_mask[1, 0]
    assert not m1[:, 5].any()  # context pad slot
    assert not m1[:, 8:10].any()  # Part-B pad slots after the short first span
    assert m1[10, 6] and m1[10, 7] and m1[10, :5].all()  # the new sop sees the first span and the context


def test_fill_blanks_matches_cache_free_loop(models):
    """fill_blanks (KV cache, batched, HF layout) == a plain greedy loop on the forward, one row at a time,
    every later blank seeing the spans filled before it."""
    model = models("glm-blank")

    class Tok:  # the parity vocabulary's special ids (GPT-2 layout, 256 text ids)
        mask_token_ids = [259, 263, 262]
        sop_token_id, eop_token_id, pad_token_id = 256, 257, 255

        def encode_for_blanks(self, text):
            return [int(t) for t in text.split()]

    texts = ["258 10 259 11 12 262 255", "258 263 40 41 259 255"]
    G, T = 3, 16
    got = lmzoo.glm_infill.fill_blanks(model, Tok(), texts, max_gen_length=G, return_ids=True)

    def next_token(ids, pos, blk, sep):
        n = len(ids)  # pad the causal tail to one length T: it is invisible to row n-1
        fill = lambda x, v: np.array([x + [v] * (T - n)])
        logits = model(input_ids=fill(ids, 255), position_ids=np.stack([fill(pos, 0), fill(blk, 0)], 1), attention_mask=np.array([sep])).logits
        return int(np.argmax(np.asarray(logits)[0, n - 1]))

    for text, spans in zip(texts, got):
        ctx = Tok().encode_for_blanks(text)
        blanks = [i for i, t in enumerate(ctx) if t in Tok.mask_token_ids]
        assert [m for m, _ in spans] == blanks
        ids, pos, blk = list(ctx), list(range(len(ctx))), [0] * len(ctx)
        for (mpos, span), b in zip(spans, blanks):
            ids, pos, blk = ids + [256], pos + [b], blk + [1]
            want = []
            for _ in range(G):
                t = next_token(ids, pos, blk, len(ctx))
                if t == 257:
                    break
                want.append(t)
                ids, pos, blk = ids + [t], pos + [b], blk + [blk[-1] + 1]
            assert span == want


# ---- heads -------------------------------------------------------------------------------------------
def test_multiple_choice_scores_are_summed_log_probs(models):
    from lmzoo.glm import GLMForMultipleChoice

    base = models("glm-blank")
    mc = GLMForMultipleChoice(base.config, base.params)
    inputs = load_npz("glm-blank")
    choice_ids = [[[62, 115], [7]], [[71], [144, 88, 3]]]
    choice_indices = [[[12, 13], [12]], [[8], [8, 9, 10]]]
    out = mc(**inputs, choice_ids=choice_ids, choice_indices=choice_indices)
    logp = jax.nn.log_softmax(np.asarray(base(**inputs).logits, np.float64), axis=-1)
    want = np.array([[sum(logp[b, i, t] for t, i in zip(c, ci)) for c, ci in zip(cs, cis)] for b, (cs, cis) in enumerate(zip(choice_ids, choice_indices))])
    assert_close(out.logits, want, name="choice scores")
    padded = mc(**inputs, choice_ids=np.array([[[62, 115, -1], [7, -1, -1]], [[71, -1, -1], [144, 88, 3]]]),
                choice_indices=np.array([[[12, 13, -1], [12, -1, -1]], [[8, -1, -1], [8, 9, 10]]]))
    assert_close(padded.logits, want, name="padded choice arrays")


def test_cloze_scoring_layout_scores_each_choice_alone(models):
    """multiple_choice_layout packs the choices block-diagonally: each score equals that choice scored alone
    (sep form, teacher-forced) by the LM."""
    from lmzoo.glm import GLMForMultipleChoice
    from lmzoo.glm_infill import multiple_choice_layout

    base = models("glm-blank")
    mc = GLMForMultipleChoice(base.config, base.params)
    contexts = [[258, 40, 41, 259, 42, 255], [258, 50, 259, 51, 52, 53, 255]]
    choices = [[[10, 11], [12], [13, 14, 15]], [[20], [21, 22]]]
    lay = multiple_choice_layout(contexts, choices, mask_ids=[259, 263, 262], sop_id=256)
    assert lay["input_ids"].shape == (2, 6 + 2 + 1 + 3)
    assert list(lay["position_ids"][0, 0, 6:]) == [3] * 6 and list(lay["position_ids"][0, 1, 6:]) == [1, 2, 1, 1, 2, 3]
    scores = np.asarray(mc(**lay).logits)
    T = 12  # score each choice alone at one padded length (the causal tail is invisible)
    for b, (ctx, chs) in enumerate(zip(contexts, choices)):
        blank = ctx.index(259)
        for j, c in enumerate(chs):
            ids = ctx + [256] + c[:-1]
            n = len(ids)
            pos = list(range(len(ctx))) + [blank] * len(c) + [0] * (T - n)
            blk = [0] * len(ctx) + list(range(1, len(c) + 1)) + [0] * (T - n)
            logits = base(input_ids=np.array([ids + [255] * (T - n)]), position_ids=np.array([[pos, blk]]), attention_mask=np.array([len(ctx)])).logits
            logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[0], axis=-1)
            want = sum(logp[len(ctx) + k, t] for k, t in enumerate(c))
            assert_close(scores[b, j], want, name=f"row {b} choice {j}")
    assert scores[1, 2] == 0.0  # a missing third choice of row 1 scores 0 (padding)


def test_sequence_classification_head(models, tmp_path):
    from lmzoo.glm import GLMForSequenceClassification

    base = models("glm-blank")
    cfg = base.config.replace(num_labels=3)
    clf = GLMForSequenceClassification(cfg, seed=1)
    inputs = load_npz("glm-blank")
    out = clf(**inputs)
    assert out.logits.shape == (2, 3)
    h = np.asarray(out.hidden_states)[:, 0]
    p = clf.params["head"]
    want = np.tanh(h @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
    assert_close(out.logits, want, name="cls logits")
    # a round trip through the original key names keeps the head and selects the class from the keys
    d = clf.save_pretrained(tmp_path / "clf", format="pytorch")
    back = lmzoo.from_pretrained(d)
    assert isinstance(back, GLMForSequenceClassification)
    assert_close(back(**inputs).logits, out.logits, name="reloaded")
    # [B, C, S] inputs give [B, C] scores
    stacked = {k: np.stack([v, v], axis=1) for k, v in inputs.items()}
    assert clf(**stacked).logits.shape == (6, 2)  # [B*C, labels] viewed as (-1, C), as the original does


# ---- configs, sizes, sharding -------------------------------------------------------------------------
SPEC_PARAMS = {  # millions, from the spec's size table
    "glm-large": 334.69, "glm-roberta-large": 354.87, "glm-large-chinese": 355.66, "glm-515m": 514.63,
    "glm-2b": 1920.0, "glm-10b": 9881.0, "glm-10b-chinese": 9880.0,
}


@pytest.mark.parametrize("name", sorted(GLM_SIZES))
def test_released_configs_load(name):
    hf = GLM_SIZES[name]
    assert lmzoo.detect_family(hf) == "glm"
    cfg = GLMConfig.from_hf_config(hf)
    model_cls = lmzoo.modeling.model_class_for("glm", hf)
    assert model_cls is GLMForConditionalGeneration
    # the Flax tree has exactly the analytic parameter count (no allocation: eval_shape)
    m = model_cls.__new__(model_cls)
    m.config, m.module = cfg, model_cls.make_module(cfg)
    n = sum(int(np.prod(v)) for v in m.param_shapes().values())
    assert n == cfg.num_params()
    assert abs(n / 1e6 - SPEC_PARAMS[name]) / SPEC_PARAMS[name] < 2e-3, n


def test_config_bans_and_errors():
    cfg = GLMConfig.from_hf_config(GLM_SIZES["glm-10b-chinese"])
    assert cfg.generation_defaults()["bad_words_ids"] == [[50009]]
    with pytest.raises(lmzoo.ConfigError, match="num_attention_heads"):
        GLMConfig(hidden_size=100, num_attention_heads=16)
    with pytest.raises(lmzoo.ConfigError, match="relative_encoding"):
        GLMConfig(relative_encoding=True)


def test_generate_bans_exactly_the_given_ids(models):
    model = models("glm-blank")
    rec = load_generate_records("glm-blank")[0]
    args = dict(position_ids=np.array(rec["position_ids"]), generation_attention_mask=np.array(rec["generation_attention_mask"]))
    ids = np.array(rec["input_ids"])
    base = model.generate(ids, **args, max_new_tokens=4, eos_token_id=257, pad_token_id=255)
    assert 282 in base[0]  # a vocab-padding row the model picks: padding rows are NOT masked
    banned = model.generate(ids, **args, max_new_tokens=4, eos_token_id=257, pad_token_id=255, bad_words_ids=[[282]])
    assert 282 not in banned[:, 13:]
    np.testing.assert_array_equal(banned[1], base[1])  # the other row never wanted 282
    with pytest.raises(ValueError, match="position_ids cover"):
        model.generate(ids, position_ids=np.array(rec["position_ids"])[:, :, :14], max_new_tokens=12)
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(ids + 1000, max_new_tokens=2)


def test_sampling_is_reproducible(models):
    model = models("glm-blank")
    rec = load_generate_records("glm-blank")[0]
    kw = dict(position_ids=np.array(rec["position_ids"]), generation_attention_mask=np.array(rec["generation_attention_mask"]),
              max_new_tokens=6, do_sample=True, top_p=0.9, top_k=0, eos_token_id=257, pad_token_id=255)
    ids = np.array(rec["input_ids"])
    a = model.generate(ids, seed=3, **kw)
    b = model.generate(ids, seed=3, **kw)
    c = model.generate(ids, seed=4, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape[1] >= 14 and not np.array_equal(a, c)


def test_sharded_forward_on_8_devices_and_10b_memory(models):
    """A scaled-down GLM sharded over (data 2, fsdp 2, tensor 2) gives the unsharded logits; the real 10B
    config's per-device parameter memory under the same rules is computed (fp16) and printed."""
    from lmzoo.sharding import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    small = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=8, max_sequence_length=32, vocab_size=256)
    ref = GLMForConditionalGeneration(small, seed=0)
    sharded = GLMForConditionalGeneration(small, jax.tree.map(np.asarray, ref.params), mesh=mesh)
    qkv = sharded.params["transformer"]["layers_0"]["attention"]["qkv_kernel"]
    assert qkv.sharding.shard_shape(qkv.shape) == (32, 3, 4, 8)  # embed over fsdp, heads over tensor
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (4, 16))
    want = np.asarray(ref(input_ids=ids, attention_mask=np.array([5, 8, 3, 16])).logits)
    got = sharded(input_ids=ids, attention_mask=np.array([5, 8, 3, 16])).logits
    assert_close(got, want, name="sharded logits", atol=1e-5, rtol=1e-5)
    lay = blank_layout([[200, 5, 6, 201, 7, 255]] * 2, next_mask=[3, 3], max_gen_length=6, sop_id=202, pad_id=255)
    kw = dict(position_ids=lay.position_ids, generation_attention_mask=lay.generation_attention_mask, max_new_tokens=6, eos_token_id=203)
    np.testing.assert_array_equal(sharded.generate(lay.input_ids, **kw), ref.generate(lay.input_ids, **kw))

    from lmzoo.glm import per_device_param_bytes

    big = GLMConfig.from_hf_config(GLM_SIZES["glm-10b"], param_dtype="float16")
    tp_mesh = make_mesh({"fsdp": 1, "tensor": 8})
    per_dev, total = per_device_param_bytes(big, tp_mesh)
    print(f"\nglm-10b fp16 params: {total / 2**30:.2f} GiB total, {per_dev / 2**30:.2f} GiB per device on tensor=8")
    assert total == 2 * big.num_params()
    assert per_dev < total / 8 * 1.02  # the replicated LayerNorms/biases/position tables are tiny

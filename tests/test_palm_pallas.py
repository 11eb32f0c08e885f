"""PALM 2.0 with attention_impl="pallas": the block-sparse kernel (interpret mode on CPU) runs the BERT
encoder, the decoder self-attention (causal or key == PAD), the context attention (source id == PAD) and
the incremental decoding step with PALM's PAD rule; the last layer's context attention stays on XLA
(its probabilities are the last_context_attn output)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmzoo.palm import BertEncoderConfig, PalmConfig, PalmModule, label_smoothed_kl_sum

from .parity import assert_close, cases, load_generate_records, load_npz

PALM_CASES = cases(("palm-",))
FORWARD_OUTPUTS = ("logits", "log_probs", "encoder_last_hidden_state", "last_context_attn")


@pytest.mark.parametrize("case", PALM_CASES)
def test_pallas_forward_matches_original(pallas_models, kernel_calls, case):
    model = pallas_models(case)
    assert model.config.attention_impl == "pallas"
    kernel_calls.clear()  # loading may trace the module (shapes only)
    out = model(**load_npz(case))
    c = model.config
    # encoder layers + decoder self-attention + all context attentions but the last layer's
    assert len(kernel_calls) == c.bert.num_hidden_layers + 2 * c.dec_layers - 1
    want = load_npz(case, "outputs.npz")
    for name in FORWARD_OUTPUTS:
        if name in want:
            assert_close(out[name], want[name], name=f"{case}/{name}")
    assert_close(out.loss, want["loss"], name=f"{case}/loss", atol=0.0, rtol=1e-5)


def test_pallas_generate_is_token_exact(pallas_models, kernel_calls):
    """A beam-search record whose beams feed PAD to the decoder (the incremental PAD rule) and whose
    batch compacts: the same tokens and scores with every step's attention on the kernel."""
    case = next(c for c in PALM_CASES if load_generate_records(c))
    model = pallas_models(case)
    rec = next(r for r in load_generate_records(case) if r["exercised"]["pad_fed_to_decoder"] and r["kwargs"]["num_beams"] > 1)
    res = model.generate(
        np.asarray(rec["input_ids"]), attention_mask=np.asarray(rec["attention_mask"]), return_dict_in_generate=True,
        **rec["kwargs"],
    )
    assert len(kernel_calls) >= model.config.bert.num_hidden_layers + 2 * model.config.dec_layers
    for b, want in enumerate(rec["output_ids"]):
        assert res.sequences[b, 1 : 1 + len(want)].tolist() == want, f"row {b}"
        assert (res.sequences[b, 1 + len(want) :] == rec["kwargs"]["pad_token_id"]).all()
    assert_close(res.sequences_scores, rec["scores"], name="scores")


# ----------------------------------------------------------------------------------------------------
def _tiny(impl: str) -> PalmConfig:
    bert = BertEncoderConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )
    return PalmConfig(
        encoder="zh_bert", encoder_pth="bert", bert=bert, dec_layers=2, dec_hidden_size=32, dec_heads=4, dec_ff_size=64, bos_token_id=101, eos_token_id=102,
        pad_token_id=0, attention_impl=impl,
    )


def _batch():
    rng = np.random.default_rng(0)
    B, S, T = 3, 10, 9
    src = rng.integers(104, 120, size=(B, S)).astype(np.int32)
    src[1, 6:] = 0
    src[2, 3] = 0  # a PAD inside the source: masked by its id in the context attention
    tgt = rng.integers(104, 120, size=(B, T)).astype(np.int32)
    tgt[:, 0] = 101
    tgt[1, 5:] = 0  # trailing target padding: masked keys, rows still see their earlier keys
    tgt[2, 0] = 0  # a decoder row whose only visible key is PAD: the original attends uniformly (all keys)
    tgt[2, 3] = 0
    return {k: jnp.asarray(x) for k, x in dict(src=src, am=(src != 0).astype(np.int32), tgt=tgt).items()}


def _loss(module, params, b):
    """The original's training loss (label-smoothed KL sum over the shifted targets) plus a term on the
    last layer's context-attention probabilities."""
    h, log_probs, memory, probs = module.apply({"params": params}, b["src"], b["am"], b["tgt"][:, :-1])
    loss = label_smoothed_kl_sum(log_probs, b["tgt"][:, 1:], smoothing=0.1, pad=0)
    return loss + jnp.sum(jnp.square(probs[:, :, :, 0])) + 1e-2 * jnp.sum(memory[:, 0])


def test_pallas_training_gradients_match_xla():
    b = _batch()
    xla, pallas = PalmModule(_tiny("xla")), PalmModule(_tiny("pallas"))
    params = nn.unbox(jax.jit(xla.init)(jax.random.PRNGKey(0), b["src"], b["am"], b["tgt"][:, :-1])["params"])
    # the 0.02 init gives near-uniform attention; wider query/key projections make it peaked
    key = jax.random.PRNGKey(1)
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        name = jax.tree_util.keystr(path)
        if ("query" in name or "key" in name) and name.endswith("['kernel']"):
            sub = params
            for p in path[:-1]:
                sub = sub[p.key]
            sub["kernel"] = 0.4 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)

    def grads(module):
        return jax.jit(jax.value_and_grad(lambda p: _loss(module, p, b)))(params)

    (lx, gx), (lp, gp) = grads(xla), grads(pallas)
    assert np.isfinite(float(lx)) and float(lx) > 1.0
    assert_close(lp, lx, name="loss", atol=0.0, rtol=1e-5)
    flat_p = jax.tree_util.tree_flatten_with_path(gp)[0]
    flat_x = jax.tree.leaves(gx)
    assert len(flat_p) == len(flat_x)
    # Normwise per parameter: the XLA path itself is up to 7.7e-6 of max|g| away from a float64
    # evaluation of this loss (pallas: 7.4e-6; the two differ by up to 3.3e-6), so the two paths may
    # differ by up to ~1.5e-5 from rounding alone: 2e-5 of max|g| tests the kernel, not rounding noise.
    # The key projections' biases get no gradient (softmax ignores a per-query constant): rounding
    # noise of ~1e-7 on both paths, held against the largest gradient of the model instead.
    gmax = max(float(np.abs(np.asarray(g)).max()) for g in flat_x)
    for (path, a), g in zip(flat_p, flat_x):
        name = jax.tree_util.keystr(path)
        a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
        assert np.isfinite(a).all(), name
        if ("['key']" in name or "['linear_keys']" in name) and name.endswith("['bias']"):
            assert np.abs(a).max() <= 1e-6 * gmax and np.abs(g).max() <= 1e-6 * gmax, (name, np.abs(a).max(), gmax)
            continue
        scale = np.abs(g).max()
        assert scale > 0, name
        assert np.abs(a - g).max() <= 2e-5 * scale, (name, np.abs(a - g).max(), scale)

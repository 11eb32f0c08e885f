"""COCO-LM with attention_impl="pallas": the block-sparse kernel (interpret mode on CPU) runs the encoder
and the auxiliary generator, with COCO-LM's scale, relative bias, key padding and all-padding rows."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmzoo
from lmzoo.cocolm import CocoLMConfig, CocoLMModule, relative_position_bucket_table, relative_position_bucket_vector

from .parity import assert_close, case_dir, cases, load_npz

CASES = cases(("cocolm",))


@pytest.mark.parametrize("name", CASES)
def test_pallas_forward_matches_original(name):
    model = lmzoo.from_pretrained(case_dir(name), attention_impl="pallas")
    assert model.config.attention_impl == "pallas"
    out = model(**load_npz(name))
    for key, want in load_npz(name, "outputs.npz").items():
        assert_close(out[key], want, name=f"{name}:{key}")


@pytest.mark.parametrize("max_pos,bins,max_rel", [(64, 32, 64), (64, 64, 128), (256, 128, 256)])
def test_bucket_vector_is_the_table_by_distance(max_pos, bins, max_rel):
    """The O(L) vector the kernel reads gives the rows of the full-table bucket (offset included)."""
    table = relative_position_bucket_table(max_pos, bins, max_rel)
    vec = relative_position_bucket_vector(max_pos, bins, max_rel)
    i, j = np.meshgrid(np.arange(max_pos), np.arange(max_pos), indexing="ij")
    np.testing.assert_array_equal(vec[j - i + max_pos - 1], table)


def _tiny(impl: str) -> CocoLMConfig:
    # T = 20 against 32 positions: rel_pos 32 bins / 24 distance saturates the far buckets; a larger init
    # range than the released 0.02 makes the attention (and the bias table's gradient) far from uniform.
    return CocoLMConfig(
        vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, rel_pos_bins=32, max_rel_pos=24, initializer_range=0.3, generator_layers=1,
        heads=("binary", "clm", "generator"), need_pooler=True, attention_impl=impl,
    )


def _batch():
    rng = np.random.default_rng(0)
    B, T = 3, 20
    ids = rng.integers(4, 47, size=(B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    am[1, 13:] = 0
    am[2] = 0  # an all-padding row: the original zeroes its NaN after out_proj
    ids[am == 0] = 1
    mlm = (rng.random((B, T)) < 0.3) & (am == 1)
    mlm[0, 3] = True
    masked = np.where(mlm, 47, ids)
    replaced = np.where(mlm & (rng.random((B, T)) < 0.5), rng.integers(4, 47, size=(B, T)), ids).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in dict(ids=ids, am=am, mlm=mlm, masked=masked, replaced=replaced).items()}


def _pretraining_loss(module, params, b):
    """The COCO-LM pretraining losses (generator MLM, copy, corrective LM) with a fixed replacement draw,
    so both implementations see the same corrupted input, plus a term on the SCL pooler's output."""
    v = {"params": params}
    mm = b["mlm"]
    gen = jax.nn.log_softmax(module.apply(v, b["masked"], b["am"], method="generator_logits").astype(jnp.float32), -1)
    gen_loss = -jnp.sum(jnp.where(mm, jnp.take_along_axis(gen, b["ids"][..., None], -1)[..., 0], 0.0))
    out = module.apply(v, b["replaced"], b["am"])
    nonpad = b["am"].astype(jnp.float32)
    target = (b["replaced"] == b["ids"]).astype(jnp.float32)
    x = out["binary_logits"]
    bce = jnp.maximum(x, 0) - x * target + jnp.log1p(jnp.exp(-jnp.abs(x)))
    binary = jnp.sum(bce * nonpad) / jnp.sum(nonpad)
    clm = jax.nn.log_softmax(out["clm_logits"].astype(jnp.float32), -1)
    w = jax.lax.stop_gradient(1.0 - jax.nn.sigmoid(x))
    clm_loss = -jnp.sum(jnp.where(mm, w * jnp.take_along_axis(clm, b["ids"][..., None], -1)[..., 0], 0.0))
    pooled = out["pooled_output"].astype(jnp.float32)
    return gen_loss + 50.0 * binary + clm_loss + jnp.sum(jnp.square(pooled[:, 0] - pooled[:, 1]))


def test_pallas_training_gradients_match_xla():
    b = _batch()
    xla, pallas = CocoLMModule(_tiny("xla")), CocoLMModule(_tiny("pallas"))
    params = nn.unbox(jax.jit(xla.init)(jax.random.PRNGKey(0), b["ids"], b["am"])["params"])

    def grads(module):
        return jax.jit(jax.value_and_grad(lambda p: _pretraining_loss(module, p, b)))(params)

    (lx, gx), (lp, gp) = grads(xla), grads(pallas)
    assert np.isfinite(float(lx)) and float(lx) > 1.0
    assert_close(lp, lx, name="loss", atol=1e-5, rtol=1e-5)
    flat_p = jax.tree_util.tree_flatten_with_path(gp)[0]
    flat_x = jax.tree.leaves(gx)
    assert len(flat_p) == len(flat_x)
    names = {jax.tree_util.keystr(path) for path, _ in flat_p}
    assert any("generator" in n and "relative_attention_bias" in n for n in names)
    # Normwise per parameter: the XLA path itself is up to 2.0e-6 of max|g| away from a float64 evaluation
    # of this loss (pallas: 2.4e-6; the two differ by up to 4.5e-6), so 1e-5 of max|g| tests the kernel,
    # not rounding noise.
    for (path, a), g in zip(flat_p, flat_x):
        a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
        assert np.isfinite(a).all(), jax.tree_util.keystr(path)
        scale = np.abs(g).max()
        assert scale > 0, jax.tree_util.keystr(path)
        assert np.abs(a - g).max() <= 1e-5 * scale + 1e-8, (jax.tree_util.keystr(path), np.abs(a - g).max(), scale)


def test_pallas_refuses_attention_dropout():
    """The kernel has no attention-probability dropout: training with dropout on says so instead of
    silently running without it; deterministic calls are fine."""
    b = _batch()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="no attention-probability dropout"):
        CocoLMModule(_tiny("pallas")).init({"params": key, "dropout": key}, b["ids"], b["am"], deterministic=False)

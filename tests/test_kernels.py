"""Tests of kernels/block_sparse_attention.py: the Pallas kernel (interpret mode on CPU) against its jnp
reference and against dense masked attention built here from first principles."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmzoo.kernels import block_sparse_attention as bsa

F32_MIN = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------------------------------
# Dense masked attention: the L x L definition every implementation must agree with
# ----------------------------------------------------------------------------------------------------


def t5_bucket(rel, bidirectional, num_buckets=8, max_distance=20):
    """T5's relative_position_bucket (rel = key - query), small settings for tiny tests."""
    rel = jnp.asarray(rel)
    out = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out = out + (rel > 0).astype(rel.dtype) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    large = max_exact + (jnp.log(jnp.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(rel.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return out + jnp.where(n < max_exact, n, large)


def to_bhld(x, layout):
    return x if layout == "bhld" else jnp.swapaxes(x, 1, 2)


def dense_attention(q, k, v, layout, *, scale=1.0, causal=False, q_offset=0, prefix_len=None,
                    kv_lengths=None, key_mask=None, q_segment_ids=None, kv_segment_ids=None,
                    bias_table=None, bias_buckets=None, extra_k=None, extra_v=None, extra_mask=None,
                    block_extra_k=None, block_extra_v=None, block_extra_mask=None, mask_value=None,
                    qkv_layout="bhld"):
    f32 = jnp.float32
    q, k, v = (to_bhld(x, qkv_layout).astype(f32) for x in (q, k, v))
    b, h, lq, d = q.shape
    lk = k.shape[2]
    bq, bk = layout.block_q, layout.block_k
    blocks = layout.block_mask()  # [Hl, nq, nk]
    allowed = np.repeat(np.repeat(blocks, bq, 1), bk, 2)[:, :lq, :lk][None]  # [1, Hl, Lq, Lk]
    qpos = jnp.broadcast_to(jnp.asarray(q_offset), (b,))[:, None, None, None] + \
        jnp.arange(lq)[None, None, :, None]
    kpos = jnp.arange(lk)[None, None, None, :]
    vis = jnp.ones((b, 1, lq, lk), bool)
    if key_mask is not None:
        vis = vis & (jnp.asarray(key_mask) != 0)[:, None, None, :]
    if kv_lengths is not None:
        vis = vis & (kpos < jnp.asarray(kv_lengths)[:, None, None, None])
    if causal:
        rule = kpos <= qpos
        if prefix_len is not None:
            rule = rule | (kpos < jnp.asarray(prefix_len)[:, None, None, None])
        vis = vis & rule
    if q_segment_ids is not None:
        vis = vis & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if bias_table is not None:
        nr = bias_buckets.shape[0]
        idx = jnp.clip(kpos - qpos + nr - lk, 0, nr - 1)[:, 0]  # [B, Lq, Lk]
        s = s + jnp.moveaxis(bias_table[bias_buckets[idx]], -1, 1)
    parts = [(s, vis, jnp.asarray(allowed), v[:, :, None])]  # values [B, H, 1|Lq, K, D]
    if extra_k is not None:
        ek, ev = to_bhld(extra_k, qkv_layout).astype(f32), to_bhld(extra_v, qkv_layout).astype(f32)
        em = jnp.ones(ek.shape[:1] + ek.shape[2:3], bool) if extra_mask is None else extra_mask != 0
        em = em[:, None, None, :] if em.ndim == 2 else em[:, :, None, :]
        parts.append((jnp.einsum("bhqd,bhkd->bhqk", q, ek) * scale, em, True, ev[:, :, None]))
    if block_extra_k is not None:
        perm = (0, 1, 2, 3, 4) if qkv_layout == "bhld" else (0, 3, 1, 2, 4)
        bek = jnp.transpose(block_extra_k, perm).astype(f32)  # [B, H, G, S, D]
        bev = jnp.transpose(block_extra_v, perm).astype(f32)
        g = bek.shape[2]
        nq = -(-lq // bq)
        grp = (np.arange(lq) // bq) // (nq // g)
        bek, bev = bek[:, :, grp], bev[:, :, grp]  # [B, H, Lq, S, D]
        bm = jnp.ones((b, 1, g, bek.shape[3]), bool) if block_extra_mask is None else \
            block_extra_mask != 0
        bm = bm[:, None] if bm.ndim == 3 else bm
        parts.append((jnp.einsum("bhqd,bhqkd->bhqk", q, bek) * scale, bm[:, :, grp], True, bev))
    logits, keeps, values = [], [], []
    for sc, vi, al, val in parts:
        if mask_value is None:
            keep = jnp.broadcast_to(vi & al, sc.shape)
            adj = sc
        else:
            keep = jnp.broadcast_to(jnp.asarray(al), sc.shape)
            adj = jnp.where(vi, sc, sc + mask_value)
        logits.append(jnp.where(keep, adj, -jnp.inf))
        keeps.append(keep)
        values.append(jnp.broadcast_to(val, (b, h, lq) + val.shape[3:]))
    s, keep, vals = (jnp.concatenate(x, axis=a) for x, a in ((logits, -1), (keeps, -1), (values, 3)))
    m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(keep, jnp.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhqk,bhqkd->bhqd", p, vals)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o if qkv_layout == "bhld" else jnp.swapaxes(o, 1, 2)


# ----------------------------------------------------------------------------------------------------
# Cases: each exercises several features at once to keep the number of compiles small
# ----------------------------------------------------------------------------------------------------


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def make_case(name, dtype=jnp.float32):
    """Returns (q, k, v, layout, kwargs, names of the differentiable kwargs)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(abs(hash(name)) % 2**31), 16))
    b, h, d = 2, 2, 16

    def qkv(lq, lk, layout):
        shp = (lambda n: (b, h, n, d)) if layout == "bhld" else (lambda n: (b, n, h, d))
        return (_normal(next(keys), shp(lq), dtype), _normal(next(keys), shp(lk), dtype),
                _normal(next(keys), shp(lk), dtype))

    if name == "t5_encoder":  # dense, bidirectional buckets, padding, Lq not a block multiple
        lq = lk = 40
        q, k, v = qkv(lq, lk, "bhld")
        kw = dict(scale=1.0, key_mask=jnp.arange(lk)[None, :] < jnp.array([[40], [27]]),
                  bias_table=_normal(next(keys), (8, h)),
                  bias_buckets=t5_bucket(jnp.asarray(bsa.relative_positions(lq, lk)), True))
        return q, k, v, bsa.dense_layout(lq, lk, 16, 16), kw, ("bias_table",)
    if name == "t5_decoder_cache":  # causal with per-example query offsets, Lq != Lk, [B, L, H, D]
        lq, lk = 8, 24
        q, k, v = qkv(lq, lk, "blhd")
        kw = dict(scale=1.0, causal=True, q_offset=jnp.array([5, 16]), kv_lengths=jnp.array([13, 24]),
                  bias_table=_normal(next(keys), (8, h)), qkv_layout="blhd",
                  bias_buckets=t5_bucket(jnp.asarray(bsa.relative_positions(lq, lk, 16)), False))
        return q, k, v, bsa.dense_layout(lq, lk, 8, 8), kw, ("bias_table",)
    if name == "glm_prefix":  # GLM: bidirectional up to sep, causal after; prefix layout
        lq = lk = 48
        q, k, v = qkv(lq, lk, "blhd")
        kw = dict(scale=d ** -0.5, causal=True, prefix_len=jnp.array([11, 20]),
                  kv_lengths=jnp.array([48, 41]), qkv_layout="blhd")
        return q, k, v, bsa.prefix_layout(lq, lk, 8, 8, max_prefix=20), kw, ()
    if name == "packed_random":  # segment ids, random per-head layout (an empty row too), Lq != Lk
        lq, lk = 24, 40
        q, k, v = qkv(lq, lk, "bhld")
        rng = np.random.default_rng(0)
        blocks = rng.random((h, 3, 3)) < 0.6
        blocks[0, 1] = False  # a query block that visits nothing
        blocks[1, :, 0] = True
        seg_q = jnp.asarray(np.sort(rng.integers(0, 3, (b, lq)), axis=1))
        seg_k = jnp.asarray(np.sort(rng.integers(0, 3, (b, lk)), axis=1))
        kw = dict(scale=0.25, q_segment_ids=seg_q, kv_segment_ids=seg_k,
                  bias_table=_normal(next(keys), (5, h)),
                  bias_buckets=jnp.asarray(np.random.default_rng(1).integers(0, 5, lq + lk - 1)))
        return q, k, v, bsa.BlockLayout.from_block_mask(blocks, 8, 16), kw, ("bias_table",)
    if name == "lsg":  # local band + global extra keys + per-block sparse keys, [B, L, H, D]
        t, blk, g, s = 64, 16, 3, 6
        q, k, v = qkv(t, t, "blhd")
        nb = t // blk
        kw = dict(scale=d ** -0.5, qkv_layout="blhd",
                  key_mask=jnp.arange(t)[None, :] < jnp.array([[64], [45]]),
                  extra_k=_normal(next(keys), (b, g, h, d), dtype),
                  extra_v=_normal(next(keys), (b, g, h, d), dtype),
                  extra_mask=jnp.array([[1, 1, 1], [1, 0, 1]]),
                  block_extra_k=_normal(next(keys), (b, nb, s, h, d), dtype),
                  block_extra_v=_normal(next(keys), (b, nb, s, h, d), dtype),
                  block_extra_mask=jax.random.bernoulli(next(keys), 0.7, (b, h, nb, s)))
        lay = bsa.lsg_layout(t, blk, block_q=8, block_k=16)
        return q, k, v, lay, kw, ("extra_k", "extra_v", "block_extra_k", "block_extra_v")
    if name == "finite_mask":  # original-style additive masks: a fully masked row averages its keys
        lq = lk = 24
        q, k, v = qkv(lq, lk, "bhld")
        kw = dict(scale=0.5, causal=True, kv_lengths=jnp.array([0, 17]), mask_value=F32_MIN)
        return q, k, v, bsa.dense_layout(lq, lk, 8, 8), kw, ()
    if name == "hard_mask_empty_rows":  # the default: fully masked rows give 0 and finite gradients
        lq = lk = 24
        q, k, v = qkv(lq, lk, "bhld")
        kw = dict(scale=0.5, causal=True, kv_lengths=jnp.array([0, 17]),
                  q_segment_ids=jnp.zeros((b, lq), jnp.int32).at[1, 20:].set(7),
                  kv_segment_ids=jnp.zeros((b, lk), jnp.int32))
        return q, k, v, bsa.causal_layout(lq, lk, 8, 8), kw, ()
    raise KeyError(name)


CASES = ["t5_encoder", "t5_decoder_cache", "glm_prefix", "packed_random", "lsg", "finite_mask",
         "hard_mask_empty_rows"]


def _grads(fn, q, k, v, layout, kw, diff_names, cot):
    """Output and the gradients of sum(out * cot) w.r.t. q, k, v and the named kwargs (one compile)."""

    @jax.jit
    def run(q, k, v, extra):
        out, vjp = jax.vjp(lambda q, k, v, e: fn(q, k, v, layout, **{**kw, **e}), q, k, v, extra)
        dq, dk, dv, de = vjp(cot.astype(out.dtype))
        return out, {"q": dq, "k": dk, "v": dv, **de}

    return run(q, k, v, {n: kw[n] for n in diff_names})


@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_reference_and_dense_f32(name):
    q, k, v, layout, kw, diff_names = make_case(name)
    cot = _normal(jax.random.PRNGKey(7), q.shape)
    with jax.default_matmul_precision("highest"):
        results = {fn.__name__: _grads(fn, q, k, v, layout, kw, diff_names, cot)
                   for fn in (bsa.block_sparse_attention, bsa.block_sparse_attention_reference,
                              dense_attention)}
    want_out, want_grads = results["dense_attention"]
    assert np.all(np.isfinite(want_out))
    for fn_name in ("block_sparse_attention", "block_sparse_attention_reference"):
        out, grads = results[fn_name]
        np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=1e-5, err_msg=f"{fn_name} output")
        for g in want_grads:
            assert np.all(np.isfinite(grads[g])), (fn_name, g)
            np.testing.assert_allclose(grads[g], want_grads[g], atol=5e-5, rtol=1e-5,
                                       err_msg=f"{fn_name} d{g}")
    if name == "hard_mask_empty_rows":  # batch 0 has no keys; rows 20.. of batch 1 no same segment
        out = results["block_sparse_attention"][0]
        assert np.all(out[0] == 0) and np.all(out[1, :, 20:] == 0) and np.any(out[1, :, :20] != 0)
    if name == "finite_mask":  # every key of batch 0 is masked: uniform average over all keys
        out = results["block_sparse_attention"][0]
        np.testing.assert_allclose(out[0], jnp.broadcast_to(v[0].mean(1, keepdims=True), out[0].shape),
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["lsg"])  # bf16 handling is shared by every case; lsg has all streams
def test_kernel_bf16_close_to_f32_dense(name):
    q, k, v, layout, kw, diff_names = make_case(name, dtype=jnp.bfloat16)
    cot = _normal(jax.random.PRNGKey(7), q.shape)
    out, grads = _grads(bsa.block_sparse_attention, q, k, v, layout, kw, diff_names, cot)
    assert out.dtype == jnp.bfloat16 and grads["k"].dtype == jnp.bfloat16
    with jax.default_matmul_precision("highest"):
        want_out, want_grads = _grads(dense_attention, q, k, v, layout, kw, diff_names, cot)
        ref_out = jax.jit(lambda *a: bsa.block_sparse_attention_reference(*a, layout, **kw))(q, k, v)
    np.testing.assert_allclose(np.float32(out), want_out, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=3e-2, rtol=3e-2)
    for g in want_grads:
        scale = float(jnp.max(jnp.abs(want_grads[g]))) + 1e-6
        err = float(jnp.max(jnp.abs(jnp.float32(grads[g]) - want_grads[g])))
        assert err <= 4e-2 * scale, (g, err, scale)


# ----------------------------------------------------------------------------------------------------
# Block sparsity: visited blocks and memory
# ----------------------------------------------------------------------------------------------------


def test_kernel_visits_exactly_the_layout_blocks():
    t, blk = 256, 32
    layout = bsa.lsg_layout(t, blk, block_q=16, block_k=16)
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    live = layout.block_mask()
    assert live.sum() < nq * nk / 2  # the band is sparse
    b, h, d = 1, 2, 8
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    q, k, v = (_normal(kk, (b, h, t, d)) for kk in ks)
    out, visits = jax.jit(lambda q, k, v: bsa.block_sparse_attention(q, k, v, layout, debug=True))(
        q, k, v)
    np.testing.assert_array_equal(visits, np.broadcast_to(layout.counts, (b, h, nq)))
    assert int(visits.sum()) == b * h * live.sum()
    # each query block: the LSG window of 3 LSG blocks, cut at the edges
    assert layout.counts[0, 0] == 4 and layout.counts[0, nq // 2] == 6
    with jax.default_matmul_precision("highest"):
        ref = bsa.block_sparse_attention_reference(q, k, v, layout)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def _largest_buffer(hlo_text):
    """Largest element count of any array type in StableHLO/HLO text."""
    best = 0
    for dims in re.findall(r"tensor<((?:\d+x)+)[a-z]", hlo_text):
        best = max(best, math.prod(int(x) for x in dims.rstrip("x").split("x")))
    for dims in re.findall(r"[a-z]\d*\[([\d,]+)\]", hlo_text):
        best = max(best, math.prod(int(x) for x in dims.split(",") if x))
    return best


def test_16k_lsg_forward_and_backward_have_no_quadratic_buffer():
    t, blk, g, h, d = 16384, 256, 64, 2, 64
    layout = bsa.lsg_layout(t, blk, block_q=128, block_k=128)
    spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)
    gspec = jax.ShapeDtypeStruct((1, g, h, d), jnp.bfloat16)
    mspec = jax.ShapeDtypeStruct((1, t), jnp.bool_)

    def fwd(q, k, v, gk, gv, mask):
        return bsa.block_sparse_attention(q, k, v, layout, scale=d ** -0.5, key_mask=mask, extra_k=gk,
                                          extra_v=gv, qkv_layout="blhd")

    def loss(q, k, v, gk, gv, mask):
        return jnp.sum(fwd(q, k, v, gk, gv, mask).astype(jnp.float32))

    bound = t * t // 16  # the live band is 4-6 blocks of 128 per row: O(L), far below this
    for f in (fwd, jax.grad(loss, argnums=(0, 1, 2, 3, 4))):
        lowered = jax.jit(f).lower(spec, spec, spec, gspec, gspec, mspec)
        assert _largest_buffer(lowered.as_text()) <= 4 * t * h * d
        compiled = lowered.compile()
        assert _largest_buffer(compiled.as_text()) < bound
        mem = compiled.memory_analysis()
        if mem is not None:
            assert mem.temp_size_in_bytes < t * t  # well under one L x L array of any dtype


# ----------------------------------------------------------------------------------------------------
# Compiled paths: lowering for TPU (Mosaic) and GPU (Triton) from a CPU machine
# ----------------------------------------------------------------------------------------------------


def lowering_case(name, platform):
    """(fn, abstract args, differentiable argnums) of a model-shaped call: bf16, D = 64, 128-blocks."""
    b, h, d, bf16 = 1, 2, 64, jnp.bfloat16

    def sds(*shape, dtype=bf16):
        return jax.ShapeDtypeStruct(shape, dtype)

    if name == "t5_dense":  # encoder: bias table, key mask, additive masking, [B, L, H, D]
        t = 256
        layout = bsa.dense_layout(t, t, 128, 128)
        buckets = t5_bucket(jnp.asarray(bsa.relative_positions(t, t)), True, 32, 128)

        def fn(q, k, v, table, mask):
            return bsa.block_sparse_attention(q, k, v, layout, key_mask=mask, bias_table=table,
                                              bias_buckets=buckets, mask_value=F32_MIN,
                                              qkv_layout="blhd")

        return fn, (sds(b, t, h, d), sds(b, t, h, d), sds(b, t, h, d), sds(32, h, dtype=jnp.float32),
                    sds(b, t, dtype=jnp.bool_)), (0, 1, 2, 3)
    if name == "t5_decode":  # one query over a KV cache: traced offset, causal, bias, cache length
        lk = 256
        # block_q = 1 on TPU exercises the padding to a whole sublane tile; Triton needs >= 16
        layout = bsa.dense_layout(1, lk, 1 if platform == "tpu" else 16, 128)
        buckets = t5_bucket(jnp.asarray(bsa.relative_positions(1, lk, lk)), False, 32, 128)

        def fn(q, k, v, table, pos):
            return bsa.block_sparse_attention(q, k, v, layout, causal=True, q_offset=pos,
                                              kv_lengths=pos + 1, bias_table=table, bias_buckets=buckets,
                                              qkv_layout="blhd")

        return fn, (sds(b, 1, h, d), sds(b, lk, h, d), sds(b, lk, h, d), sds(32, h, dtype=jnp.float32),
                    sds(b, dtype=jnp.int32)), (0, 1, 2, 3)
    if name == "glm_prefix":  # prefix layout and rule, packed segments, [B, H, L, D]
        t = 256
        layout = bsa.prefix_layout(t, t, 64, 64, max_prefix=100)

        def fn(q, k, v, prefix, seg):
            return bsa.block_sparse_attention(q, k, v, layout, scale=d ** -0.5, causal=True,
                                              prefix_len=prefix, q_segment_ids=seg, kv_segment_ids=seg)

        return fn, (sds(b, h, t, d), sds(b, h, t, d), sds(b, h, t, d), sds(b, dtype=jnp.int32),
                    sds(b, t, dtype=jnp.int32)), (0, 1, 2)
    if name == "lsg":  # LSG band + masked globals (extra keys) + per-head-masked sparse keys
        t, blk, g, s = 512, 128, 4, 24
        nb = t // blk

        def fn(q, k, v, gk, gv, sk, sv, mask, gmask, smask):
            return bsa.block_sparse_attention(
                q, k, v, bsa.lsg_layout(t, blk), scale=d ** -0.5, key_mask=mask, extra_k=gk,
                extra_v=gv, extra_mask=gmask, block_extra_k=sk, block_extra_v=sv,
                block_extra_mask=smask, qkv_layout="blhd")

        x, e, be = sds(b, t, h, d), sds(b, g, h, d), sds(b, nb, s, h, d)
        return fn, (x, x, x, e, e, be, be, sds(b, t, dtype=jnp.bool_), sds(b, g, dtype=jnp.bool_),
                    sds(b, h, nb, s, dtype=jnp.bool_)), tuple(range(7))
    raise KeyError(name)


LOWERING_CASES = ["t5_dense", "t5_decode", "glm_prefix", "lsg"]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", LOWERING_CASES)
def test_kernels_lower_for_tpu_and_gpu(monkeypatch, name, platform):
    """Forward, dq and every dk/dv kernel lower to Mosaic (TPU) / Triton (GPU) custom calls.

    Exported from CPU, so this checks everything up to the backend compiler: Mosaic's block-shape
    rules and the Pallas-to-Mosaic / Pallas-to-Triton lowering of every kernel body. Compiling and
    running need the hardware."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if platform == "cuda" else "tpu")
    fn, args, argnums = lowering_case(name, platform)

    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32))

    target = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    checks = [] if platform == "tpu" else [
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    # the gradient's module holds the forward kernel (custom_vjp's fwd) and every backward kernel
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums)), platforms=(platform,),
                                 disabled_checks=checks)(*args)
    streams = 3 if name == "lsg" else 1
    assert exported.mlir_module().count(target) == 2 + streams  # forward, dq, one dk/dv per stream
    if name == "t5_dense":  # the debug forward (visited-block counts) lowers too
        dbg = jax.export.export(
            jax.jit(lambda q, k, v: bsa.block_sparse_attention(q, k, v, bsa.dense_layout(256, 256),
                                                               debug=True)[1]),
            platforms=(platform,), disabled_checks=checks)(*[jax.ShapeDtypeStruct((1, 2, 256, 64),
                                                                                  jnp.bfloat16)] * 3)
        assert dbg.mlir_module().count(target) == 1


def test_tpu_plan_pads_single_blocks_and_falls_back_otherwise(monkeypatch):
    """Mosaic needs whole sublane tiles: a single query block is padded (decoding), several blocks of
    an untileable size run the reference instead."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    plan = bsa._mosaic_plan
    decode = bsa.dense_layout(1, 40, 1, 16)  # one query: a single query block of 1 row
    for dtype, rows in ((f32, 8), (bf16, 16)):
        layout, why = plan(decode, dtype, dtype)
        assert why is None and (layout.block_q, layout.block_k) == (rows, 16)
        # the same blocks, one taller query block: its extra rows are padding like a ragged last block
        np.testing.assert_array_equal(layout.block_mask(), decode.block_mask())
    assert plan(bsa.dense_layout(256, 256), bf16, bf16) == (bsa.dense_layout(256, 256), None)
    assert plan(bsa.dense_layout(16, 1, 16, 1), bf16, bf16)[0].block_k == 16  # one key: padded too
    layout, why = plan(bsa.dense_layout(24, 24, 4, 8), f32, f32)  # 6 query blocks of 4 rows
    assert layout is None and "multiples of the sublane tile" in why
    assert plan(bsa.dense_layout(32, 32, 16, 8), bf16, bf16)[0] is None  # 8-row bf16 key blocks

    # several 4-row query blocks: the TPU path warns and lowers the reference (no Mosaic call)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    layout = bsa.dense_layout(24, 24, 4, 8)
    x = jax.ShapeDtypeStruct((1, 2, 24, 16), f32)
    with pytest.warns(UserWarning, match="running block_sparse_attention_reference"):
        lowered = jax.jit(lambda q, k, v: bsa.block_sparse_attention(q, k, v, layout)).trace(
            x, x, x).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" not in lowered.as_text()


# ----------------------------------------------------------------------------------------------------
# LSG: the kernel's segments reproduce the original block algorithm (spec recipe, stride sparsity)
# ----------------------------------------------------------------------------------------------------


def _sparse_window_index(nb, blk, sbs, sf):
    """LSG's sparse windows: idx[i, p] into the sparse sequence (Python-slice rule of the original)."""
    step, size2 = blk // sf, 6 * sbs
    odd = step % 2
    s_pad = (size2 - step) // 2 + odd
    u = (size2 - 3 * blk // sf) // 2 + odd
    u_ = u + odd
    pos = list(range(size2))[u - sbs:u] + list(range(size2))[-u_:-u_ + sbs]
    return np.arange(nb)[:, None] * step - s_pad + np.asarray(pos)[None, :]


def _lsg_original(x_q, x_k, x_v, mask, g, blk, sbs, sf):
    """LSG self-attention as the original computes it ([n, H, G + t, D], additive finfo.min masks)."""
    n, h, tt, d = x_q.shape
    t = tt - g
    nb = t // blk
    neg = F32_MIN
    m_tok = jnp.where(mask, 0.0, neg)  # [n, t]
    m_full = jnp.concatenate([jnp.zeros((n, g)), m_tok], 1)
    sc = d ** -0.5
    # global queries: everything
    s = jnp.einsum("nhqd,nhkd->nhqk", x_q[:, :, :g], x_k) * sc + m_full[:, None, None]
    ctx_g = jnp.einsum("nhqk,nhkd->nhqd", jax.nn.softmax(s, -1), x_v)
    kg, vg = x_k[:, :, :g], x_v[:, :, :g]
    kt, vt = x_k[:, :, g:], x_v[:, :, g:]
    # stride sparsity: head h keeps tokens j*sf + (h mod sf)
    sel = np.arange(t // sf)[None, :] * sf + (np.arange(h) % sf)[:, None]  # [H, t/sf]
    ks = jnp.take_along_axis(kt, sel[None, :, :, None], 2)
    vs = jnp.take_along_axis(vt, sel[None, :, :, None], 2)
    ms = jnp.take_along_axis(jnp.broadcast_to(m_tok[:, None], (n, h, t)), sel[None], 2)
    isp = _sparse_window_index(nb, blk, sbs, sf)
    ok_sp = (isp >= 0) & (isp < t // sf)
    isp_c = np.clip(isp, 0, t // sf - 1)
    ksb, vsb = ks[:, :, isp_c], vs[:, :, isp_c]  # [n, H, nb, S, D]
    msb = jnp.where(ok_sp, ms[:, :, isp_c], neg)
    iloc = (np.arange(nb)[:, None] - 1) * blk + np.arange(3 * blk)[None, :]
    ok_loc = (iloc >= 0) & (iloc < t)
    iloc_c = np.clip(iloc, 0, t - 1)
    klb = jnp.where(ok_loc[..., None], kt[:, :, iloc_c], 0.0)
    vlb = jnp.where(ok_loc[..., None], vt[:, :, iloc_c], 0.0)
    mlb = jnp.where(ok_loc, m_tok[:, iloc_c], neg)[:, None]  # [n, 1, nb, 3B]
    keys = jnp.concatenate([jnp.broadcast_to(kg[:, :, None], (n, h, nb, g, d)), ksb, klb], 3)
    vals = jnp.concatenate([jnp.broadcast_to(vg[:, :, None], (n, h, nb, g, d)), vsb, vlb], 3)
    msk = jnp.concatenate([jnp.zeros((n, h, nb, g)), msb, jnp.broadcast_to(mlb, (n, h, nb, 3 * blk))],
                          3)
    qb = x_q[:, :, g:].reshape(n, h, nb, blk, d)
    s = jnp.einsum("nhbqd,nhbkd->nhbqk", qb, keys) * sc + msk[:, :, :, None, :]
    ctx_t = jnp.einsum("nhbqk,nhbkd->nhbqd", jax.nn.softmax(s, -1), vals).reshape(n, h, t, d)
    return jnp.concatenate([ctx_g, ctx_t], 2), (sel, isp_c, ok_sp)


def test_lsg_segments_reproduce_the_original_block_attention():
    n, h, d, g, t, blk, sbs, sf = 2, 2, 16, 2, 64, 16, 8, 2
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    x_q, x_k, x_v = (_normal(kk, (n, h, g + t, d)) for kk in ks)
    mask = jnp.arange(t)[None, :] < jnp.array([[t], [37]])
    with jax.default_matmul_precision("highest"):
        want, (sel, isp, ok_sp) = _lsg_original(x_q, x_k, x_v, mask, g, blk, sbs, sf)

        @jax.jit
        def composed(x_q, x_k, x_v, mask):
            kg, vg, kt, vt = x_k[:, :, :g], x_v[:, :, :g], x_k[:, :, g:], x_v[:, :, g:]
            common = dict(scale=d ** -0.5, key_mask=mask, extra_k=kg, extra_v=vg, mask_value=F32_MIN)
            # token queries: local band + globals + per-block sparse keys (gathered: O(t) memory)
            ks_ = jnp.take_along_axis(kt, sel[None, :, :, None], 2)[:, :, isp]
            vs_ = jnp.take_along_axis(vt, sel[None, :, :, None], 2)[:, :, isp]
            ms_ = jnp.take_along_axis(jnp.broadcast_to(mask[:, None], (n, h, t)), sel[None], 2)
            tok = bsa.block_sparse_attention(
                x_q[:, :, g:], kt, vt, bsa.lsg_layout(t, blk), block_extra_k=ks_, block_extra_v=vs_,
                block_extra_mask=ms_[:, :, isp] & ok_sp, **common)
            # global queries: dense over the tokens, plus the globals
            glob = bsa.block_sparse_attention(x_q[:, :, :g], kt, vt, bsa.dense_layout(g, t, 8, 16),
                                              **common)
            return jnp.concatenate([glob, tok], 2)

        got = composed(x_q, x_k, x_v, mask)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Layout builders and argument checks
# ----------------------------------------------------------------------------------------------------


def _token_level(rule, lq, lk, bq, bk):
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    m = np.broadcast_to(rule(i, j), (lq, lk))
    nq, nk = -(-lq // bq), -(-lk // bk)
    out = np.zeros((nq, nk), bool)
    for a in range(nq):
        for c in range(nk):
            out[a, c] = m[a * bq:(a + 1) * bq, c * bk:(c + 1) * bk].any()
    return out


def test_layout_builders_match_token_level_rules():
    lq, lk, bq, bk = 37, 45, 8, 4
    cases = [
        (bsa.dense_layout(lq, lk, bq, bk), lambda i, j: np.ones_like(i + j, bool)),
        (bsa.causal_layout(lq, lk, bq, bk, q_offset=3), lambda i, j: j <= i + 3),
        (bsa.local_layout(lq, lk, bq, bk, 5, 2), lambda i, j: (j >= i - 5) & (j <= i + 2)),
        (bsa.prefix_layout(lq, lk, bq, bk, max_prefix=13), lambda i, j: (j <= i) | (j < 13)),
        (bsa.lsg_layout(48, 16, 8, 8), lambda i, j: np.abs(j // 16 - i // 16) <= 1),
    ]
    for layout, rule in cases:
        n_q = 48 if layout.block_q == layout.block_k == 8 else lq
        n_k = 48 if layout.block_q == layout.block_k == 8 else lk
        want = _token_level(rule, n_q, n_k, layout.block_q, layout.block_k)
        np.testing.assert_array_equal(layout.block_mask()[0], want)
        assert np.all(layout.counts == want.sum(-1))
    t = bsa.causal_layout(lq, lk, bq, bk).transpose()
    np.testing.assert_array_equal(t.block_mask()[0], bsa.causal_layout(lq, lk, bq, bk).block_mask()[0].T)


def test_bad_arguments_raise():
    q = jnp.zeros((1, 2, 16, 8))
    with pytest.raises(ValueError, match="blocks"):
        bsa.block_sparse_attention(q, q, q, bsa.dense_layout(32, 16, 8, 8))
    with pytest.raises(ValueError, match="prefix_len"):
        bsa.block_sparse_attention(q, q, q, bsa.dense_layout(16, 16, 8, 8), prefix_len=jnp.array([3]))
    with pytest.raises(ValueError, match="bias_buckets"):
        bsa.block_sparse_attention(q, q, q, bsa.dense_layout(16, 16, 8, 8),
                                   bias_table=jnp.zeros((4, 2)), bias_buckets=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="qkv_layout"):
        bsa.block_sparse_attention(q, q, q, bsa.dense_layout(16, 16, 8, 8), qkv_layout="lbhd")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_attend_reads_head_major_kv_layouts(impl):
    """attend() gives the same result for k / v stored [B,L,H,D], [B,H,L,D] or [B,H,D,L] (decoding caches),
    one layout for both or each its own."""
    from lmzoo.attention import attend

    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(2, n, 4, 8)), jnp.float32) for n in (3, 7, 7))
    kw = dict(key_mask=jnp.asarray(r.random((2, 7)) > 0.3).at[:, 0].set(True), causal=True, q_offset=4,
              bias_table=jnp.asarray(r.normal(size=(5, 4)), jnp.float32), bucket_fn=lambda rel: jnp.clip(rel + 4, 0, 4))
    want = attend(q, k, v, impl="xla", **kw)
    orders = {"blhd": (0, 1, 2, 3), "bhld": (0, 2, 1, 3), "bhdl": (0, 2, 3, 1)}
    for kl, ko in orders.items():
        for vl, vo in orders.items():
            layout = kl if kl == vl else (kl, vl)
            got = attend(q, jnp.transpose(k, ko), jnp.transpose(v, vo), impl=impl, kv_layout=layout, **kw)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=str(layout))
    for bad in ("lbhd", ("bhdl",), ("bhdl", "lbhd")):
        with pytest.raises(ValueError, match="kv_layout"):
            attend(q, k, v, kv_layout=bad)


def test_xla_attention_adds_the_default_mask_and_replaces_any_other_fill():
    """With the default fill (the float32 minimum) the XLA path adds the mask instead of selecting it: the
    same scores bit for bit, the minimum absorbing any score below 2**103, so a fully masked row still
    attends uniformly. Any other fill (GLM's, PALM's) replaces the masked scores, as the originals do: a
    fully masked row is uniform although its scores differ, where adding the fill would not be."""
    from lmzoo.layers import dot_product_attention

    r = np.random.default_rng(3)
    q, k, v = (jnp.asarray(r.normal(size=(2, n, 3, 8)) * 40, jnp.float32) for n in (5, 7, 7))  # scores ~1e4
    mask = jnp.asarray(r.random((2, 1, 5, 7)) > 0.4).at[0, :, 3].set(False)

    def replaced(fill):  # select, then the same late division, op by op
        s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k), fill)
        e = jnp.exp(s - s.max(-1, keepdims=True))
        return jnp.swapaxes(jnp.einsum("bhqk,bkhd->bhqd", e, v) / e.sum(-1, keepdims=True), 1, 2)

    got = dot_product_attention(q, k, v, mask=mask)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(replaced(F32_MIN)))
    np.testing.assert_allclose(np.asarray(got[0, 3]), np.asarray(v[0].mean(0)), rtol=1e-5, atol=1e-4)
    for fill in (-10000.0, -1e18):
        other = dot_product_attention(q, k, v, mask=mask, mask_value=fill)[0]
        np.testing.assert_allclose(np.asarray(other), np.asarray(replaced(fill)), rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(np.asarray(other[0, 3]), np.asarray(v[0].mean(0)), rtol=1e-5, atol=1e-4)


def test_xla_attention_divides_late_and_differentiates_the_softmax_first_form():
    """The XLA path weights the values by exp(s - max) and divides by the row sums afterwards; its values
    match softmax-then-matmul (a fully masked row included), and under differentiation it is that form,
    so gradients (reverse and forward mode) are the softmax-first ones."""
    from lmzoo.layers import dot_product_attention

    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.normal(size=(2, n, 3, 8)) * 3, jnp.float32) for n in (5, 6, 6))
    mask = jnp.asarray(r.random((2, 1, 5, 6)) > 0.4).at[1, :, 2].set(False)  # row 2 of example 1 sees nothing
    bias = jnp.asarray(r.normal(size=(1, 3, 5, 6)), jnp.float32)

    def softmax_first(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q * 0.5, k) + bias
        p = jax.nn.softmax(jnp.where(mask, s, F32_MIN), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    def late(q, k, v):
        return dot_product_attention(q, k, v, bias=bias, mask=mask, scale=0.5)[0]

    want = softmax_first(q, k, v)
    got, probs = dot_product_attention(q, k, v, bias=bias, mask=mask, scale=0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got[1, 2]), np.asarray(v[1].mean(0)), rtol=1e-5, atol=1e-6)  # uniform
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-6)
    w = jnp.asarray(r.normal(size=want.shape), jnp.float32)
    g_want = jax.grad(lambda *a: jnp.sum(softmax_first(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(lambda *a: jnp.sum(late(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    t = tuple(jnp.asarray(r.normal(size=x.shape), jnp.float32) for x in (q, k, v))
    _, j_want = jax.jvp(softmax_first, (q, k, v), t)
    _, j_got = jax.jvp(late, (q, k, v), t)
    np.testing.assert_allclose(np.asarray(j_got), np.asarray(j_want), rtol=1e-5, atol=1e-6)

"""Times block_sparse_attention (Pallas) against its jnp reference and dense XLA attention.

    python benchmarks/bench_kernels.py --tokens 4096 --heads 12 --head-dim 64 --block 128

Runs on whatever jax.default_backend() is (interpret mode on CPU, where the Pallas timing only checks
that the kernel runs: interpret mode is not meant to be fast). Prints forward and forward+backward
times in milliseconds and the ratio to dense attention, for an LSG-shaped call (local band of 3 LSG
blocks + global keys) and a causal one.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from lmzoo.kernels import block_sparse_attention as bsa


def dense_attention(q, k, v, scale, causal, extra_k=None, extra_v=None):
    """Dense XLA attention over [B, L, H, D] (the L x L baseline)."""
    if extra_k is not None:
        k, v = jnp.concatenate([extra_k, k], 1), jnp.concatenate([extra_v, v], 1)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        lq, lk = s.shape[-2:]
        s = jnp.where(jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, -1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def timeit(fn, args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--lsg-block", type=int, default=256)
    ap.add_argument("--globals", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t, b, h, d = args.tokens, args.batch, args.heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(dtype) for kk in keys[:3])
    gk, gv = (jax.random.normal(kk, (b, args.globals, h, d), jnp.float32).astype(dtype)
              for kk in keys[3:])
    scale = d ** -0.5
    print(f"backend={jax.default_backend()} tokens={t} batch={b} heads={h} head_dim={d} "
          f"block={args.block} dtype={args.dtype}")

    cases = {
        "lsg": (bsa.lsg_layout(t, args.lsg_block, args.block, args.block), False, (gk, gv)),
        "causal": (bsa.causal_layout(t, t, args.block, args.block), True, (None, None)),
    }
    for name, (layout, causal, (ek, ev)) in cases.items():
        live = layout.block_mask().sum() / layout.block_mask().size
        impls = {
            "pallas": lambda q, k, v, f=bsa.block_sparse_attention: f(
                q, k, v, layout, scale=scale, causal=causal, extra_k=ek, extra_v=ev, qkv_layout="blhd"),
            "reference": lambda q, k, v, f=bsa.block_sparse_attention_reference: f(
                q, k, v, layout, scale=scale, causal=causal, extra_k=ek, extra_v=ev, qkv_layout="blhd"),
            "dense": lambda q, k, v: dense_attention(q, k, v, scale, causal, ek, ev),
        }
        times = {}
        for impl, fn in impls.items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                                    argnums=(0, 1, 2)))
            times[impl] = (timeit(fwd, (q, k, v), args.repeats), timeit(grad, (q, k, v), args.repeats))
        for impl, (tf, tb) in times.items():
            rf, rb = tf / times["dense"][0], tb / times["dense"][1]
            print(f"{name:7s} live={live:5.1%} {impl:10s} fwd {tf:9.2f} ms ({rf:5.2f}x dense)   "
                  f"fwd+bwd {tb:9.2f} ms ({rb:5.2f}x dense)")


if __name__ == "__main__":
    main()

"""LSG encoder forward at long lengths: lmzoo (LSG, XLA path) vs the same encoder with dense attention vs
the PyTorch original, in one run, on CPU.

    python benchmarks/bench_lsg.py --lengths 1024 4096 16384 --original /path/to/modeling_lsg_bart.py
    python benchmarks/bench_lsg.py --summarize            # the model-card beam search on a 16k input

Model: bart-base encoder shape (d_model 768, 12 heads, 6 layers, ffn 3072), 16384 positions, block 256,
64 global tokens, no sparse part (the lsg-bart-base-16384-arxiv setting), random weights, batch 1.
"Dense" is the same encoder and weights with block_size raised past the input length, which makes the
original's full-attention fallback run (attention over all G + t tokens). Dense is run up to 8k tokens;
beyond that only the compiled program's ``memory_analysis()`` is reported.

Every measurement runs in a fresh subprocess, so "peak" is that process's peak RSS (ru_maxrss) minus
its RSS after the weights and inputs were built: the working memory of the forward. XLA programs also
report ``memory_analysis()`` (temporaries + outputs). The original file (``modeling_lsg_bart.py`` of
the lsg-converter package) is not a dependency: pass its path with ``--original`` to time it.
Times are the median of ``--repeats`` runs after one warm-up; on a shared machine expect noise. With
``--original``, the speed-up is also timed in one more process that holds both encoders and alternates
them (lmzoo, original, lmzoo, ...; ``--pairs`` rounds), so that a slow phase of the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=16384,
            block_size=256, num_global_tokens=64, sparsity_type="none", sparse_block_size=0, sparsity_factor=4,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) so the next reading covers only what runs after."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ids(t: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 50000, size=(1, t))
    ids[0, 0] = 0
    return ids


def run_lmzoo(t: int, dense: bool, repeats: int, analyse_only: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from lmzoo.lsg_bart import BartModule, LSGBartConfig, LSGBartForConditionalGeneration

    cfg = LSGBartConfig(**BASE)
    if dense:
        cfg = cfg.replace(block_size=max(cfg.block_size, -(-t // 8) * 8))  # t <= 2 * block: the dense fallback
    ids = jnp.asarray(_ids(t), jnp.int32)
    mask = jnp.ones_like(ids)
    encode = jax.jit(lambda p, i, m: BartModule(cfg).apply({"params": p}, i, m, method=BartModule.encode)[0])
    if analyse_only:  # shapes only: nothing is allocated
        shell = LSGBartForConditionalGeneration.__new__(LSGBartForConditionalGeneration)
        shell.config, shell.module = cfg, BartModule(cfg)
        params = shell.abstract_params()
    else:
        params = LSGBartForConditionalGeneration(cfg, seed=0).params
    compiled = encode.lower(params, ids, mask).compile()
    ma = compiled.memory_analysis()
    out = {"impl": "lmzoo-dense" if dense else "lmzoo-lsg", "tokens": t,
           "xla_temp_mb": ma.temp_size_in_bytes / 2**20, "xla_output_mb": ma.output_size_in_bytes / 2**20}
    if analyse_only:
        return out
    jax.block_until_ready(compiled(params, ids, mask))  # warm-up
    base = _rss_mb()
    _reset_peak()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, ids, mask))
        times.append(time.perf_counter() - start)
    out.update(seconds=statistics.median(times), peak_mb=_peak_mb() - base)
    return out


def run_original(t: int, repeats: int, path: str) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    import modeling_lsg_bart as M  # the original, imported standalone as trust_remote_code does

    torch.manual_seed(0)
    cfg = M.LSGBartConfig(**BASE, attn_implementation="eager")
    encoder = M.LSGBartForConditionalGeneration(cfg).model.encoder.eval()
    ids = torch.as_tensor(_ids(t))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        encoder(input_ids=ids, attention_mask=mask.clone(), return_dict=True)  # warm-up
    base = _rss_mb()
    _reset_peak()
    times = []
    with torch.no_grad():
        for i in range(repeats):
            start = time.perf_counter()
            encoder(input_ids=ids, attention_mask=mask.clone(), return_dict=True)
            times.append(time.perf_counter() - start)
    return {"impl": "torch-original", "tokens": t, "seconds": statistics.median(times), "peak_mb": _peak_mb() - base,
            "threads": torch.get_num_threads()}


def run_pair(t: int, pairs: int, path: str) -> dict:
    """Both encoders in one process, timed alternately: the median of each and of the per-round ratio."""
    import jax
    import jax.numpy as jnp
    import torch

    from lmzoo.lsg_bart import BartModule, LSGBartConfig, LSGBartForConditionalGeneration

    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    import modeling_lsg_bart as M

    cfg = LSGBartConfig(**BASE)
    params = LSGBartForConditionalGeneration(cfg, seed=0).params
    encode = jax.jit(lambda p, i, m: BartModule(cfg).apply({"params": p}, i, m, method=BartModule.encode)[0])
    jids = jnp.asarray(_ids(t), jnp.int32)
    jmask = jnp.ones_like(jids)
    torch.manual_seed(0)
    encoder = M.LSGBartForConditionalGeneration(M.LSGBartConfig(**BASE, attn_implementation="eager")).model.encoder.eval()
    tids = torch.as_tensor(_ids(t))
    tmask = torch.ones_like(tids)

    def lmzoo_once():
        jax.block_until_ready(encode(params, jids, jmask))

    def torch_once():
        with torch.no_grad():
            encoder(input_ids=tids, attention_mask=tmask.clone(), return_dict=True)

    lmzoo_once(), torch_once()  # warm-up (compile)
    ours, theirs = [], []
    for _ in range(pairs):
        for fn, out in ((lmzoo_once, ours), (torch_once, theirs)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return {"impl": "pair", "tokens": t, "lmzoo_seconds": statistics.median(ours),
            "original_seconds": statistics.median(theirs),
            "ratio": statistics.median(b / a for a, b in zip(ours, theirs)), "threads": torch.get_num_threads()}


def summarize(input_tokens: int) -> dict:
    """The model card's generation settings on a long input (random base-size model: the output is noise;
    this shows the pipeline runs and what it costs)."""
    from lmzoo.lsg_bart import LSGBartConfig, LSGBartForConditionalGeneration

    model = LSGBartForConditionalGeneration(LSGBartConfig(**BASE), seed=0)
    ids = _ids(input_tokens)
    kw = dict(num_beams=5, length_penalty=2.0, no_repeat_ngram_size=3, early_stopping=True, min_length=32, max_length=320)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=(ids * 0 + 1), **kw)
    return {"impl": "lmzoo-generate", "tokens": input_tokens, "seconds": time.perf_counter() - start,
            "output_shape": list(out.shape), "process_peak_mb": _peak_mb(), **kw}


def _child(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if args.child == "lmzoo-lsg":
        res = run_lmzoo(args.tokens, False, args.repeats, False)
    elif args.child == "lmzoo-dense":
        res = run_lmzoo(args.tokens, True, args.repeats, args.tokens > args.dense_max)
    elif args.child == "torch-original":
        res = run_original(args.tokens, args.repeats, args.original)
    elif args.child == "pair":
        res = run_pair(args.tokens, args.pairs, args.original)
    else:
        res = summarize(args.tokens)
    print("RESULT " + json.dumps(res), flush=True)


def _spawn(kind: str, t: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--tokens", str(t), "--repeats", str(args.repeats),
           "--dense-max", str(args.dense_max), "--pairs", str(args.pairs)] + (["--original", args.original] if args.original else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"impl": kind, "tokens": t, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dense-max", type=int, default=8192, help="longest input the dense encoder is run on")
    ap.add_argument("--original", help="path of the original modeling_lsg_bart.py (lsg-converter==0.1.9)")
    ap.add_argument("--pairs", type=int, default=3, help="alternating lmzoo / original rounds of the speed-up timing")
    ap.add_argument("--summarize", action="store_true", help="run the model-card beam search on a 16k input")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=16384, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if args.summarize:
        print(json.dumps(_spawn("summarize", args.tokens, args)))
        return
    rows = []
    for t in args.lengths:
        kinds = ["lmzoo-lsg", "lmzoo-dense"] + (["torch-original", "pair"] if args.original else [])
        for kind in kinds:
            r = _spawn(kind, t, args)
            rows.append(r)
            print(json.dumps(r), flush=True)
    by = {(r["impl"], r["tokens"]): r for r in rows}
    print("\ntokens  impl             seconds   peak MB   xla temp MB")
    for r in rows:
        if r["impl"] == "pair":
            continue
        print(f"{r['tokens']:6d}  {r['impl']:15s}  {r.get('seconds', float('nan')):8.2f}  {r.get('peak_mb', float('nan')):8.0f}"
              f"  {r.get('xla_temp_mb', float('nan')):10.0f}")
    ts = sorted(args.lengths)
    lsg = lambda t: by.get(("lmzoo-lsg", t), {})  # noqa: E731
    if 4096 in ts and 16384 in ts and "seconds" in lsg(4096) and "seconds" in lsg(16384):
        print(f"\nt(16k)/t(4k) = {lsg(16384)['seconds'] / lsg(4096)['seconds']:.2f}  (target <= 4.5)")
    for t in ts:
        d, o = by.get(("lmzoo-dense", t), {}), by.get(("torch-original", t), {})
        if "xla_temp_mb" in d and "xla_temp_mb" in lsg(t):
            print(f"{t}: XLA temp memory LSG / dense = {lsg(t)['xla_temp_mb'] / d['xla_temp_mb']:.3f}  (target <= 0.25 at 16k)")
        if "seconds" in o and "seconds" in lsg(t):
            print(f"{t}: speed-up vs original = {o['seconds'] / lsg(t)['seconds']:.2f}x (separate processes), peak memory "
                  f"LSG / original = {lsg(t)['peak_mb'] / max(o['peak_mb'], 1e-9):.2f}  (targets >= 2x, <= 0.5)")
        p = by.get(("pair", t), {})
        if "ratio" in p:
            print(f"{t}: alternating in one process: lmzoo {p['lmzoo_seconds']:.2f} s, original {p['original_seconds']:.2f} s, "
                  f"median per-round speed-up {p['ratio']:.2f}x")


if __name__ == "__main__":
    main()

"""LongLM-base-shaped T5: forward and greedy-generation speed of lmzoo vs transformers (PyTorch, CPU).

Both run the same random weights (a transformers model is built, saved, and loaded by lmzoo). Timings
are interleaved (lmzoo, torch, lmzoo, torch, ...) and reported as medians, since a shared machine is
noisy. For decoding, the memory-bandwidth roofline is the decoder weight bytes read per token divided
by the measured copy bandwidth of this machine. A decoding step is timed apart from the encoder, on both
sides, as the difference between generating ``gen-tokens`` and ``gen-tokens + step-tokens`` tokens.

    python benchmarks/bench_t5.py [--threads 2] [--reps 5] [--src 256 --tgt 64] [--gen-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--src", type=int, default=256)
    p.add_argument("--tgt", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--gen-batches", default="1,8")
    p.add_argument("--step-tokens", type=int, default=32,
                   help="also generate this many more tokens, to time one decoding step without the encoder (0: off)")
    p.add_argument("--small", action="store_true", help="a LongLM-small shape (quick check)")
    p.add_argument("--json", default=None, help="write results here")
    return p.parse_args()


def membw_gbs() -> float:
    import numpy as np

    a = np.ones(256 << 20 >> 3)  # 256 MB
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        dt = time.perf_counter() - t
        best = max(best, 2 * a.nbytes / dt / 1e9)  # read + write
    return best


def main():
    args = parse()
    import numpy as np
    import torch
    import transformers

    import jax

    import lmzoo

    torch.set_num_threads(args.threads)
    jax.config.update("jax_default_matmul_precision", "highest")
    shape = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12, vocab_size=32128)
    if args.small:
        shape = dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6, vocab_size=32128)
    cfg = transformers.T5Config(**shape, feed_forward_proj="relu", decoder_start_token_id=1, eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    model = lmzoo.from_pretrained(tmp)
    rng = np.random.default_rng(0)
    results = {"shape": shape, "threads": args.threads, "device": jax.devices()[0].device_kind}

    # ---- forward ---------------------------------------------------------------------------------
    for B in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(2, 32000, size=(B, args.src))
        dec = rng.integers(2, 32000, size=(B, args.tgt))
        mask = np.ones_like(ids)
        t = time.perf_counter()
        jax.block_until_ready(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
        compile_s = time.perf_counter() - t
        tj, tt = [], []
        ti, tm, td = torch.tensor(ids), torch.tensor(mask), torch.tensor(dec)
        for _ in range(args.reps):
            t = time.perf_counter()
            jax.block_until_ready(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
            tj.append(time.perf_counter() - t)
            with torch.no_grad():
                t = time.perf_counter()
                hf(input_ids=ti, attention_mask=tm, decoder_input_ids=td)
                tt.append(time.perf_counter() - t)
        mj, mt = statistics.median(tj), statistics.median(tt)
        toks = B * (args.src + args.tgt)
        results[f"forward_b{B}"] = dict(lmzoo_s=mj, torch_s=mt, speedup=mt / mj, lmzoo_tok_s=toks / mj, torch_tok_s=toks / mt, first_call_s=compile_s)
        print(f"forward  B={B} {args.src}+{args.tgt}: lmzoo {mj*1e3:.0f} ms ({toks/mj:.0f} tok/s)  torch {mt*1e3:.0f} ms  "
              f"-> {mt/mj:.2f}x   (first call incl. compile {compile_s:.1f} s)", flush=True)

    # ---- greedy generation -------------------------------------------------------------------------
    dec_bytes = sum(
        p.numel() * 4 for n, p in hf.named_parameters() if n.startswith("decoder.") or n == "shared.weight"
    )
    bw = membw_gbs()
    results["membw_GBs"] = bw
    n_new = args.gen_tokens
    for B in [int(b) for b in args.gen_batches.split(",")]:
        ids = rng.integers(2, 32000, size=(B, args.src))
        mask = np.ones_like(ids)
        def settings(n):
            return dict(max_length=n + 1, min_length=n + 1, num_beams=1, do_sample=False, decoder_start_token_id=1,
                        eos_token_id=1, pad_token_id=0)

        kw, kw_long = settings(n_new), settings(n_new + args.step_tokens)
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, **kw)
        compile_s = time.perf_counter() - t
        if args.step_tokens:
            model.generate(ids, attention_mask=mask, **kw_long)
        tj, tt, tj_long, tt_long = [], [], [], []
        ti, tm = torch.tensor(ids), torch.tensor(mask)

        def both(settings, lmzoo_times, torch_times):  # one timed generate on each side, lmzoo first
            t = time.perf_counter()
            ours = model.generate(ids, attention_mask=mask, **settings)
            lmzoo_times.append(time.perf_counter() - t)
            with torch.no_grad():
                t = time.perf_counter()
                theirs = hf.generate(ti, attention_mask=tm, **settings)
                torch_times.append(time.perf_counter() - t)
            return ours, theirs

        for _ in range(args.reps):
            out, ref = both(kw, tj, tt)
            if args.step_tokens:
                out_long, ref_long = both(kw_long, tj_long, tt_long)
        assert out.shape == tuple(ref.shape), (out.shape, ref.shape)
        same = bool((out == ref.numpy()).all())
        if args.step_tokens:
            same = same and bool((out_long == ref_long.numpy()).all())
        mj, mt = statistics.median(tj), statistics.median(tt)
        # time per token, excluding the encoder (measured once by a forward with a 1-token decoder)
        per_tok_j = mj / n_new
        roof = dec_bytes / (bw * 1e9)
        results[f"greedy_b{B}"] = dict(
            lmzoo_s=mj, torch_s=mt, speedup=mt / mj, lmzoo_tok_s=B * n_new / mj, torch_tok_s=B * n_new / mt,
            ms_per_step=per_tok_j * 1e3, roofline_ms=roof * 1e3, roofline_fraction=roof / per_tok_j, same_ids=same,
            first_call_s=compile_s,
        )
        if args.step_tokens:
            sj = (statistics.median(tj_long) - mj) / args.step_tokens
            st = (statistics.median(tt_long) - mt) / args.step_tokens
            results[f"greedy_b{B}"].update(step_ms=sj * 1e3, torch_step_ms=st * 1e3, step_speedup=st / sj,
                                           step_roofline_fraction=roof / sj)
            print(f"decode step B={B} (tokens {n_new + 1}..{n_new + args.step_tokens}, no encoder): lmzoo {sj*1e3:.1f} ms  "
                  f"torch {st*1e3:.1f} ms -> {st/sj:.2f}x; {roof/sj:.0%} of the {roof*1e3:.1f} ms roofline", flush=True)
        print(f"greedy   B={B} {n_new} tokens: lmzoo {mj:.2f} s ({B*n_new/mj:.1f} tok/s, {per_tok_j*1e3:.1f} ms/step incl. encoder share)  "
              f"torch {mt:.2f} s -> {mt/mj:.2f}x; roofline {roof*1e3:.1f} ms/step at {bw:.0f} GB/s "
              f"({roof/per_tok_j:.0%} of it); ids identical: {same}; first call {compile_s:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""Streaming conversion of a multi-GB synthetic fp16 checkpoint: peak RSS and MB/s vs ``torch.load``.

The benchmark writes a T5-shaped fp16 ``pytorch_model.bin`` (default ~2 GB; LongLM-large-like widths),
then, each in a fresh subprocess, measures the peak RSS (VmHWM) and wall time of
  * ``lmzoo convert`` (safetensors out, fp16 kept),
  * ``torch.load`` of the same file (the usual way),
  * the interpreter baseline (python + jax + lmzoo imported),
and checks the target: convert peak <= baseline + 1.5 x largest tensor + 300 MB.

    python benchmarks/bench_convert.py [--gb 2] [--workdir /path/with/space]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
mode, src, dst = sys.argv[1:4]
t = time.perf_counter()
if mode == "convert":
    import jax, lmzoo
    t = time.perf_counter()
    from lmzoo.convert.cli import main
    assert main([src, dst, "-q"]) == 0
elif mode == "torch":
    import torch
    t = time.perf_counter()
    sd = torch.load(src + "/pytorch_model.bin", map_location="cpu", weights_only=True)
    n = sum(v.numel() for v in sd.values())
elif mode == "baseline":
    import jax, lmzoo, lmzoo.convert.cli
dt = time.perf_counter() - t
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"peak_rss": hwm, "seconds": dt}))
"""


def run(mode, src, dst):
    out = subprocess.run([sys.executable, "-c", CHILD, mode, src, dst], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_checkpoint(folder: str, gb: float) -> tuple[int, int]:
    import numpy as np

    from lmzoo.convert.writers import ExportTensor, write_torch_zip
    from lmzoo.t5 import T5Config, T5ForConditionalGeneration

    d_model, d_ff, vocab = 1536, 6144, 32128
    per_layer = (4 * d_model * 768 + 2 * d_model * d_ff) * 2
    layers = max(1, int((gb * 1e9 - vocab * d_model * 2) / per_layer / 2.2))
    hf = dict(model_type="t5", d_model=d_model, d_ff=d_ff, d_kv=64, num_heads=12, num_layers=layers,
              num_decoder_layers=layers, vocab_size=vocab, feed_forward_proj="relu", decoder_start_token_id=0,
              eos_token_id=1, pad_token_id=0, torch_dtype="float16")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    config = T5Config.from_hf_config(hf)
    model = T5ForConditionalGeneration.bare(config)
    shapes = model.param_shapes()
    keymap = T5ForConditionalGeneration.key_map(config)
    tensors = {}
    for i, (key, p) in enumerate(keymap.params.items()):
        shape = shapes[p.path][::-1] if p.to_torch is not None else shapes[p.path]
        tensors[key] = ExportTensor(
            shape, np.float16, lambda shape=shape, i=i: np.random.default_rng(i).standard_normal(shape, np.float32).astype(np.float16)
        )
    for alias, canon in keymap.aliases.items():
        tensors[alias] = ExportTensor(tensors[canon].shape, np.float16, tensors[canon].get, alias_of=canon)
    write_torch_zip(os.path.join(folder, "pytorch_model.bin"), tensors)
    uniq = [t for t in tensors.values() if t.alias_of is None]
    return max(t.nbytes for t in uniq), sum(t.nbytes for t in uniq)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = tempfile.mkdtemp(dir=args.workdir)
    try:
        src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
        t = time.perf_counter()
        largest, total = make_checkpoint(src, args.gb)
        print(f"synthetic fp16 checkpoint: {total/1e9:.2f} GB, largest tensor {largest/1e6:.0f} MB (written in {time.perf_counter()-t:.0f} s)")
        base = run("baseline", src, dst)
        conv = run("convert", src, dst)
        shutil.rmtree(dst)
        tl = run("torch", src, dst)
        budget = base["peak_rss"] + 1.5 * largest + 300e6
        print(f"baseline (python+jax+lmzoo):  peak RSS {base['peak_rss']/1e6:.0f} MB")
        print(f"lmzoo convert:               peak RSS {conv['peak_rss']/1e6:.0f} MB (+{(conv['peak_rss']-base['peak_rss'])/1e6:.0f} MB), "
              f"{conv['seconds']:.1f} s, {total/1e6/conv['seconds']:.0f} MB/s; budget {budget/1e6:.0f} MB -> "
              f"{'OK' if conv['peak_rss'] <= budget else 'OVER'}")
        print(f"torch.load:                  peak RSS {tl['peak_rss']/1e6:.0f} MB, {tl['seconds']:.1f} s, {total/1e6/tl['seconds']:.0f} MB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

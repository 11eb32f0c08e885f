"""Training throughput per family on the local devices, and the loop's overhead outside the jitted step.

For each family a small random model is trained by the real loop (``lmzoo.train.loop.run``) on a
synthetic token corpus. Two wall-time figures are taken over the same steps (the loop's steps
``W+1 .. W+N`` after ``W`` warm-up steps, whose first holds the compile):

* **step**: the compiled train step alone, called back to back on those steps' batches, already on the
  device, with one ``block_until_ready`` at the end;
* **loop**: the loop's own wall time per step over those steps (from its log intervals: building and
  transferring batches, dispatching, fetching and writing metrics, the progress bar — everything).

overhead = (loop - step) / loop. Both are timed in windows of W steps (the loop's log interval), repeated
``--repeats`` times, interleaved, and each figure is the median over its windows: on a machine shared
with other jobs (which may even pause this process) a disturbed window is an outlier, not a bias.

    python benchmarks/bench_train.py [--steps 40] [--repeats 3] [--families t5,bart,glm,palm,cocolm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from lmzoo.train import config as C
from lmzoo.train.data import Loader
from lmzoo.train.loop import build_model, run
from lmzoo.train.mesh import global_batch, mesh_from_config
from lmzoo.train.objectives import make_objective
from lmzoo.train.tokenizer import Tokenizer, Vocab
from lmzoo.train.trainer import Trainer

V = 1024
WARMUP = 5  # the loop's first log interval: the first step's run and the steps before the first log
FAMILIES = {
    "t5": ("longlm", {"vocab_size": V, "d_model": 256, "d_kv": 64, "d_ff": 1024, "num_layers": 2, "num_heads": 4,
                      "eos_token_id": 2, "pad_token_id": 3, "decoder_start_token_id": 1},
           Vocab(size=V, pad=3, eos=2, bos=1, sentinels=tuple(V - 1 - k for k in range(100)))),
    "bart": ("bart", {"vocab_size": V, "d_model": 256, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                      "decoder_attention_heads": 4, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024, "max_position_embeddings": 256},
             Vocab(size=V, pad=1, bos=0, eos=2, mask=3)),
    "glm": ("glm", {"vocab_size": V, "hidden_size": 256, "num_layers": 4, "num_attention_heads": 4, "max_sequence_length": 256},
            Vocab(size=V, pad=0, eos=1, cls=2, mask=3, sep=4, extra={"sop": 5, "eop": 6})),
    "palm": ("palm", {"encoder": "bert", "bert": {"vocab_size": V, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "intermediate_size": 1024, "max_position_embeddings": 256},
                      "dec_layers": 2, "dec_hidden_size": 256, "dec_heads": 4, "dec_ff_size": 1024, "max_pos": 256,
                      "bos_token_id": 5, "eos_token_id": 6, "pad_token_id": 0},
             Vocab(size=V, pad=0, cls=5, sep=6, mask=7, eos=6)),
    "cocolm": ("cocolm", {"vocab_size": V, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
                          "max_position_embeddings": 256, "heads": ["generator", "binary", "clm"], "need_pooler": True, "generator_layers": 1},
               Vocab(size=V, pad=1, cls=0, sep=2, mask=3)),
}


def config(family, out_dir, steps, batch, seq):
    objective, model_cfg, _ = FAMILIES[family]
    return C.TrainConfig.from_dict({
        "model": {"family": family, "config": model_cfg},
        "mesh": {"data": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 5},
        "data": {"batch_size": batch, "seq_len": seq, "target_len": seq // 2 if family == "t5" else seq, "prefetch": 2},
        "objective": {"name": objective},
        "loop": {"steps": steps, "log_every": WARMUP, "save_every": 0, "out_dir": out_dir, "progress": True, "tensorboard": True},
    })


def loop_windows(cfg, vocab, examples):
    """Seconds per step of the real loop in each log interval after the first (steps WARMUP+1 .. end), and
    tokens per step."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = cfg.replace(**{"loop.out_dir": tmp})
        tok = Tokenizer(lambda t: [], lambda ids: "", vocab, "")
        run(cfg, tokenizer=tok, train_examples=examples, devices=jax.devices()[:1])
        rows = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))]
    return [r["step_s"] for r in rows[1:]], statistics.median(r["tokens_per_s"] * r["step_s"] for r in rows[1:])


class BareStep:
    """The same compiled step on the same batches as the loop's steps WARMUP+1 .. end, all on the device."""

    def __init__(self, cfg, vocab, examples):
        mesh = mesh_from_config(cfg.mesh, jax.devices()[:1])
        self.model = build_model(cfg.model, mesh)
        obj = make_objective(cfg.objective.name, vocab, cfg.data, cfg.objective.options, model_config=self.model.config)
        self.trainer = Trainer(self.model, obj, cfg.optim, mesh, total_steps=cfg.loop.steps)
        B = cfg.data.batch_size
        loader = Loader(examples, obj.build, batch_size=B, seed=cfg.data.seed, prefetch=0)
        self.batches = [global_batch(mesh, loader.batch(s), B) for s in range(WARMUP, cfg.loop.steps)]
        jax.block_until_ready(self.batches)
        self.params = self.model.params
        self.fn = self.trainer.compile_train(self.batches[0])

    def windows(self) -> list[float]:
        """Seconds per step in each window of WARMUP steps, back to back, blocking at window ends only."""
        state = self.trainer.init_state(self.params)
        state, m = self.fn(state, self.batches[0])  # one untimed run
        jax.block_until_ready((state, m))
        out = []
        for w in range(0, len(self.batches), WARMUP):
            window = self.batches[w : w + WARMUP]
            t0 = time.perf_counter()
            for b in window:
                state, m = self.fn(state, b)
            jax.block_until_ready((state, m))
            out.append((time.perf_counter() - t0) / len(window))
        return out


def bench(family, steps, batch, seq, repeats):
    _, _, vocab = FAMILIES[family]
    cfg = config(family, "unused", WARMUP + steps, batch, seq)
    obj = make_objective(cfg.objective.name, vocab, cfg.data)
    rng = np.random.default_rng(0)
    examples = [rng.integers(10, V - 100, obj.example_len).astype(np.int32) for _ in range(256)]
    bare = BareStep(cfg, vocab, examples)
    step_s, loop_s, tokens = [], [], []
    for _ in range(repeats):
        step_s += bare.windows()
        s, t = loop_windows(cfg, vocab, examples)
        loop_s += s
        tokens.append(t)
    step, loop = statistics.median(step_s), statistics.median(loop_s)
    return {"family": family, "params_M": bare.model.num_params() / 1e6, "tokens_per_step": statistics.median(tokens),
            "step_ms": 1e3 * step, "loop_ms": 1e3 * loop, "tokens_per_s": statistics.median(tokens) / loop,
            "overhead_pct": 100 * (loop - step) / loop, "windows": len(step_s),
            "step_ms_mean": 1e3 * statistics.mean(step_s), "loop_ms_mean": 1e3 * statistics.mean(loop_s)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40, help="timed steps (after %d warm-up steps)" % WARMUP)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--families", default=",".join(FAMILIES))
    args = p.parse_args(argv)
    cache = os.path.join(tempfile.gettempdir(), "lmzoo-bench-train-jax-cache")  # the repeats reuse the compiles
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    print(f"device: {jax.devices()[0].device_kind} x1, batch {args.batch}, seq {args.seq}, {args.steps} timed steps, "
          f"median of {args.repeats}")
    print(f"{'family':<8} {'params':>8} {'tok/step':>9} {'step ms':>9} {'loop ms':>9} {'tok/s':>9} {'overhead':>9}   (means)")
    for fam in args.families.split(","):
        r = bench(fam, args.steps, args.batch, args.seq, args.repeats)
        print(f"{fam:<8} {r['params_M']:>7.2f}M {r['tokens_per_step']:>9.0f} {r['step_ms']:>9.1f} {r['loop_ms']:>9.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['overhead_pct']:>8.1f}%   ({r['step_ms_mean']:.1f} / {r['loop_ms_mean']:.1f} ms "
              f"over {r['windows']} windows)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

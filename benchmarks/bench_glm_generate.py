"""Greedy blank-infilling generation, tokens/s: lmzoo (jit, KV cache) vs the PyTorch HF GLM port, same weights.

The HF port (``modeling_glm.py`` + ``configuration_glm.py`` of the THUDM hub repos) is not pip-installable: pass
the folder holding them (or a ``glm_model/`` package with them) with ``--hf-src``. Without it only lmzoo is timed,
and the script says so loudly. Both run on CPU in this process, on one random small-GLM checkpoint; the
generated ids are checked to be identical before the timings are reported.

    python benchmarks/bench_glm_generate.py --hf-src /path/to/hf_glm_source [--layers 6 --hidden 512]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

import numpy as np


def load_hf_port(src: str | None):
    if not src:
        return None, "no --hf-src given"
    pkg_dir = None
    for cand in (os.path.join(src, "glm_model"), src):
        if os.path.exists(os.path.join(cand, "modeling_glm.py")):
            pkg_dir = cand
            break
    if pkg_dir is None:
        return None, f"{src}: no modeling_glm.py (nor glm_model/modeling_glm.py)"
    if not os.path.exists(os.path.join(pkg_dir, "configuration_glm.py")):
        return None, f"{pkg_dir}: configuration_glm.py is missing"
    parent, name = os.path.split(os.path.abspath(pkg_dir))
    if name != "glm_model":  # the modeling file imports `glm_model.configuration_glm`
        return None, f"{pkg_dir}: put the two files in a folder named glm_model (the modeling file imports glm_model.*)"
    sys.path.insert(0, parent)
    cfg_mod = importlib.import_module("glm_model.configuration_glm")
    mdl_mod = importlib.import_module("glm_model.modeling_glm")
    return (cfg_mod.GLMConfig, mdl_mod.GLMForConditionalGeneration), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-src", default=None, help="folder with the HF GLM port (modeling_glm.py, configuration_glm.py)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import lmzoo
    from lmzoo.glm import GLMConfig, GLMForConditionalGeneration
    from lmzoo.glm_infill import blank_layout

    hf_cls, why = load_hf_port(args.hf_src)
    if hf_cls is None:
        print("!" * 100)
        print(f"!!  HF GLM PORT NOT AVAILABLE ({why}): timing lmzoo ONLY, no comparison.")
        print("!!  Fetch modeling_glm.py + configuration_glm.py of THUDM/glm-10b into <dir>/glm_model/ and pass --hf-src <dir>.")
        print("!" * 100)

    hf = {
        "architectures": ["GLMModel"], "model_type": "glm", "num_layers": args.layers, "hidden_size": args.hidden,
        "num_attention_heads": args.heads, "max_sequence_length": 1024, "vocab_size": args.vocab, "attention_scale": 1.0,
        "block_position_encoding": True, "output_predict": True,
    }
    tmp = tempfile.mkdtemp(prefix="glm-bench-")
    model = GLMForConditionalGeneration(GLMConfig.from_hf_config(hf), seed=0)
    folder = model.save_pretrained(os.path.join(tmp, "m"), format="pytorch")
    model = lmzoo.from_pretrained(folder)

    # a batch of blank-infilling prompts: [CLS] text [MASK] text <eos> [sop], contexts of different lengths
    rng = np.random.default_rng(0)
    V = args.vocab
    sop, eop, cls_, mask_, eos = V - 47, V - 46, V - 45, V - 44, V - 48  # GPT-2 layout ids (50257.. for V=50304)
    ctxs = []
    for b in range(args.batch):
        n = args.context - 4 * b
        c = [cls_] + list(rng.integers(0, eos, n - 3)) + [mask_, eos]
        c[n // 2], c[-2] = c[-2], c[n // 2]  # the blank in the middle
        ctxs.append(c)
    lay = blank_layout(ctxs, next_mask=[c.index(mask_) for c in ctxs], max_gen_length=args.new, sop_id=sop, pad_id=eos)
    kw = dict(max_new_tokens=args.new, eos_token_id=eop, pad_token_id=eos, bad_words_ids=[[eop]])  # run full length

    def run_lmzoo():
        return model.generate(lay.input_ids, position_ids=lay.position_ids, generation_attention_mask=lay.generation_attention_mask, **kw)

    t = time.perf_counter()
    ours = run_lmzoo()
    print(f"lmzoo first call (compile + run): {time.perf_counter() - t:.1f} s")
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        ours = run_lmzoo()
        times.append(time.perf_counter() - t)
    n_tok = args.batch * args.new
    lm_tps = n_tok / min(times)
    print(f"lmzoo: {lm_tps:.1f} tokens/s (batch {args.batch}, {args.new} new tokens, {args.layers}x{args.hidden}, V={V})")

    if hf_cls is not None:
        import torch

        cfg_cls, mdl_cls = hf_cls
        torch.set_grad_enabled(False)
        cfg = cfg_cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
        ref = mdl_cls.from_pretrained(folder, config=cfg).eval()
        inputs = dict(
            input_ids=torch.from_numpy(lay.input_ids),
            position_ids=torch.from_numpy(lay.position_ids),
            generation_attention_mask=torch.from_numpy(lay.generation_attention_mask),
        )
        t = time.perf_counter()
        theirs = ref.generate(**inputs, do_sample=False, num_beams=1, **kw).numpy()
        hf_time = time.perf_counter() - t
        for _ in range(args.repeat - 1):
            t = time.perf_counter()
            ref.generate(**inputs, do_sample=False, num_beams=1, **kw)
            hf_time = min(hf_time, time.perf_counter() - t)
        hf_tps = n_tok / hf_time
        same = theirs.shape == ours.shape and (theirs == ours).all()
        print(f"HF port (torch {torch.__version__}, {torch.get_num_threads()} threads): {hf_tps:.1f} tokens/s; ids identical: {same}")
        print(f"speed-up lmzoo / HF: {lm_tps / hf_tps:.2f}x (target >= 2x)")
        if not same:
            print("WARNING: generated ids differ", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PALM 2.0 base-shaped beam search (beam 5): generated tokens/s of lmzoo vs the ModelScope original.

The original (``modelscope==1.40.2``, ``modelscope.models.nlp.palm_v2``) is not a dependency: install it
outside the project and pass its location, e.g.

    pip install --no-deps --target "$MS" modelscope==1.40.2 modelscope-hub
    pip install --target "$MS_DEPS" addict simplejson sortedcontainers python-dateutil einops rouge cryptography
    python benchmarks/bench_palm.py --original "$MS:$MS_DEPS" [--threads 2] [--batches 1,4] [--gen-tokens 32]

Both sides run the same random weights: the original builds a random PALM from a base-shaped folder
(bert-base-chinese encoder, 12-layer 768-wide decoder, V 21128), its state_dict is saved, and lmzoo loads
that folder. ``min_length = max_length`` bans EOS until the last step, so every call decodes exactly
``--gen-tokens`` steps on both sides and tokens/s = batch * gen_tokens / seconds. Timings are
interleaved (lmzoo, original, ...) and reported as medians. The outputs of the two are compared too
(token-exact on random weights is expected in float32 at full matmul precision). Without ``--original``
(or if it does not import) only lmzoo is timed, and the script says so loudly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

BASE = dict(
    bert=dict(
        vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, model_type="bert",
        architectures=["BertForMaskedLM"], pad_token_id=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
    ),
    palm=dict(
        model_type="palm", encoder="zh_bert", encoder_pth="bert", max_pos=512, share_emb=False, dec_layers=12,
        dec_hidden_size=768, dec_heads=8, dec_ff_size=3072, dec_dropout=0.2, use_bert_emb=True, label_smoothing=0.1,
        alpha=0.95, beam_size=5, min_length=40, max_length=130, sample_topk=False, block_trigram=False,
    ),
)  # fmt: skip


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", default=None, help="path(s) (os.pathsep-separated) where modelscope==1.40.2 is installed")
    p.add_argument("--threads", type=int, default=1, help="torch's threads unless --torch-threads (recorded; XLA:CPU uses every core)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads; on a busy machine 1 is often fastest")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--src", type=int, default=128, help="source length (the preprocessor pads to 128)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--beams", type=int, default=5)
    p.add_argument("--small", action="store_true", help="a 4+4-layer 256-wide shape (quick check)")
    p.add_argument("--json", default=None, help="write results here")
    return p.parse_args()


def write_folder(folder: str, shape: dict, beams: int) -> None:
    os.makedirs(os.path.join(folder, "bert"), exist_ok=True)
    V = shape["bert"]["vocab_size"]
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + [f"tok{i}" for i in range(V - len(specials))]
    for name in ("vocab.txt", "bert/vocab.txt"):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "bert/config.json"), "w") as f:
        json.dump(shape["bert"], f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(shape["palm"], beam_size=beams), f, indent=2)
    with open(os.path.join(folder, "configuration.json"), "w") as f:
        json.dump({"framework": "pytorch", "task": "text-generation", "model": {"type": "palm"}}, f, indent=2)


def load_original(paths: str | None):
    if not paths:
        return None, "no --original given"
    for p in reversed(paths.split(os.pathsep)):
        sys.path.insert(0, p)
    try:
        from modelscope.models.nlp.palm_v2.text_generation import PalmForTextGeneration
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        return None, f"cannot import the original from {paths}: {type(e).__name__}: {e}"
    return PalmForTextGeneration, ""


def main():
    args = parse()
    import numpy as np
    import torch

    import jax

    import lmzoo

    torch.set_num_threads(args.torch_threads or args.threads)
    jax.config.update("jax_default_matmul_precision", "highest")
    shape = json.loads(json.dumps(BASE))
    if args.small:
        shape["bert"].update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        shape["palm"].update(dec_layers=4, dec_hidden_size=256, dec_ff_size=1024)
    Original, why = load_original(args.original)
    if Original is None:
        bar = "!" * 78
        print(f"{bar}\n!! THE MODELSCOPE ORIGINAL IS ABSENT ({why}).\n!! Timing lmzoo alone: there is NO comparison in this run.\n{bar}", flush=True)

    folder = tempfile.mkdtemp(prefix="palm-bench-")
    write_folder(folder, shape, args.beams)
    torch.manual_seed(0)
    orig = None
    if Original is not None:
        orig = Original._from_pretrained(folder).eval()
        sd = {k: v for k, v in orig.state_dict().items() if not k.endswith(".mask")}  # 25 MB causal masks each
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
        del sd
    else:  # random lmzoo weights, written in the original's layout so the loading path is the same
        from lmzoo.palm import PalmForTextGeneration, load_palm_config

        PalmForTextGeneration(load_palm_config(folder, shape["palm"]), seed=0).save_pretrained(folder + "-w", format="pytorch")
        os.replace(os.path.join(folder + "-w", "pytorch_model.bin"), os.path.join(folder, "pytorch_model.bin"))
    model = lmzoo.from_pretrained(folder)
    results = {
        "shape": shape, "beams": args.beams, "threads": args.threads, "torch_threads": args.torch_threads or args.threads, "src": args.src, "gen_tokens": args.gen_tokens,
        "device": jax.devices()[0].device_kind, "original": bool(orig is not None), "runs": [],
    }  # fmt: skip
    print(
        f"lmzoo params: {model.num_params() / 1e6:.1f} M on {results['device']}; XLA: all {os.cpu_count()} cores, "
        f"torch threads {results['torch_threads']}",
        flush=True,
    )
    rng = np.random.default_rng(0)
    V, G = shape["bert"]["vocab_size"], args.gen_tokens
    for B in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(104, V, size=(B, args.src))
        lengths = rng.integers(args.src // 2, args.src + 1, size=B)
        lengths[0] = args.src
        ids[:, 0] = 101
        ids[np.arange(B), lengths - 1] = 102
        ids[np.arange(args.src)[None, :] >= lengths[:, None]] = 0
        mask = (ids != 0).astype(np.int64)
        kw = dict(num_beams=args.beams, length_penalty=0.95, min_length=G, max_length=G)

        def run_lmzoo():
            return model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)

        def run_orig():
            with torch.no_grad():
                return orig.generate({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}, min_length=G, max_length=G)

        t = time.perf_counter()
        first = run_lmzoo()
        compile_s = time.perf_counter() - t
        ours, theirs = [], []
        out_orig = None
        if orig is not None:
            out_orig = run_orig()  # warm-up
        for _ in range(args.reps):
            t = time.perf_counter()
            run_lmzoo()
            ours.append(time.perf_counter() - t)
            if orig is not None:
                t = time.perf_counter()
                run_orig()
                theirs.append(time.perf_counter() - t)
        row = {"batch": B, "lmzoo_s": statistics.median(ours), "lmzoo_first_call_s": compile_s}
        row["lmzoo_tok_s"] = B * G / row["lmzoo_s"]
        msg = f"B={B} beam {args.beams} src {args.src} gen {G}: lmzoo {row['lmzoo_tok_s']:.1f} tok/s ({row['lmzoo_s']:.3f} s; first call {compile_s:.1f} s)"
        if orig is not None:
            row["original_s"] = statistics.median(theirs)
            row["original_tok_s"] = B * G / row["original_s"]
            row["speedup"] = row["original_s"] / row["lmzoo_s"]
            same = all(
                first.sequences[b, 1 : 1 + len(s)].tolist() == s.tolist() for b, s in enumerate(out_orig.sequences)
            )
            row["same_tokens"] = bool(same)
            msg += f" | original {row['original_tok_s']:.1f} tok/s ({row['original_s']:.3f} s) | x{row['speedup']:.2f} | same tokens: {same}"
        print(msg, flush=True)
        results["runs"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

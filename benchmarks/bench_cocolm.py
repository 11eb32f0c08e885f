"""COCO-LM base-shaped encoder: sequences/s of lmzoo vs the original HF COCOLMModel, in one run (CPU).

    python benchmarks/bench_cocolm.py --original /path/to/COCO-LM [--lengths 128 512] [--batch 8]

``--original`` is a checkout of microsoft/COCO-LM (or its ``huggingface/`` folder): the original code is not
pip-installable. Both models get the same random weights (real cocolm-base shape: 12 layers, H 768, 12 heads,
64 relative buckets / 128, vocab 64000), the outputs are compared, then each is timed in turns and the
median of the turns is reported. Without --original only lmzoo is timed, and the script says so loudly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import numpy as np

BASE = dict(
    vocab_size=64000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0, rel_pos_bins=64, max_rel_pos=128,
    layer_norm_type="post", layer_norm_eps=1e-5, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    cls_dropout_prob=0.1, initializer_range=0.02,
)


def load_original(path: str):
    """Import COCOLMModel from a COCO-LM checkout (shimming the hub-download helper it imports)."""
    for cand in (os.path.join(path, "huggingface"), path):
        if os.path.exists(os.path.join(cand, "cocolm", "modeling_cocolm.py")):
            sys.path.insert(0, cand)
            break
    else:
        raise SystemExit(f"{path}: no cocolm/modeling_cocolm.py here or under huggingface/")
    # convert_state_dict imports helpers that recent transformers no longer has; only the download path uses it.
    stub = types.ModuleType("cocolm.convert_state_dict")
    stub.get_checkpoint_from_transformer_cache = None
    sys.modules["cocolm.convert_state_dict"] = stub
    from cocolm.configuration_cocolm import COCOLMConfig
    from cocolm.modeling_cocolm import COCOLMModel

    return COCOLMConfig, COCOLMModel


def timed(fn, turns: int) -> list[float]:
    out = []
    for _ in range(turns):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", default=os.environ.get("COCOLM_SRC"), help="microsoft/COCO-LM checkout")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch per length (default 8 at <=128, else 2)")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12, help="fewer layers for a quick look (12 = base)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from lmzoo.cocolm import CocoLMConfig, CocoLMModel

    hf = dict(BASE, num_hidden_layers=args.layers)
    rng = np.random.default_rng(0)
    torch_model = None
    if args.original and os.path.isdir(args.original):
        import torch

        COCOLMConfig, COCOLMModel = load_original(args.original)
        cfg = COCOLMConfig(**hf)
        cfg.output_attentions = cfg.output_hidden_states = False
        torch.manual_seed(0)
        torch_model = COCOLMModel(cfg).eval()
        state = {k: v.detach() for k, v in torch_model.state_dict().items()}
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        bar = "!" * 78
        print(f"{bar}\n  ORIGINAL COCO-LM CODE NOT FOUND (--original {args.original!r}): timing lmzoo ONLY, NO RATIO.\n"
              f"  Fetch github.com/microsoft/COCO-LM and pass its folder.\n{bar}")
        state = None

    config = CocoLMConfig.from_hf_config(hf)
    if state is not None:
        model = CocoLMModel.from_state_dict(config, state)
    else:
        model = CocoLMModel(config)
    print(f"devices: {jax.devices()}  cpu threads: {os.cpu_count()}  layers: {args.layers}")

    batches = args.batch or [8 if L <= 128 else 2 for L in args.lengths]
    if len(batches) == 1:
        batches = batches * len(args.lengths)
    for L, B in zip(args.lengths, batches):
        ids = rng.integers(4, hf["vocab_size"], size=(B, L))
        mask = np.ones((B, L), np.int64)
        mask[-1, L * 3 // 4:] = 0  # one padded row, as real batches have
        ids[mask == 0] = 1
        jids, jmask = jnp.asarray(ids), jnp.asarray(mask)

        def run_jax():
            return model(input_ids=jids, attention_mask=jmask).last_hidden_state.block_until_ready()

        got = np.asarray(run_jax())  # compile
        line = f"L={L:4d} B={B:2d}"
        if torch_model is not None:
            import torch

            tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)

            def run_torch():
                with torch.inference_mode():
                    return torch_model(tids, attention_mask=tmask)[0]

            want = run_torch().numpy()
            diff = float(np.abs(got - want).max())
            tj, tt = [], []
            for _ in range(args.turns):  # alternate, so load from others on the machine hits both
                tj += timed(run_jax, 1)
                tt += timed(run_torch, 1)
            sj, st = B / statistics.median(tj), B / statistics.median(tt)
            line += f"  lmzoo {sj:7.2f} seq/s   original {st:7.2f} seq/s   ratio {sj / st:5.2f}x   max|diff| {diff:.2e}"
        else:
            sj = B / statistics.median(timed(run_jax, args.turns))
            line += f"  lmzoo {sj:7.2f} seq/s   (no original)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

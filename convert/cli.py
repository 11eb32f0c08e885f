"""``lmzoo convert SRC DST``: stream an original checkpoint into an lmzoo folder (or back)."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]

DTYPES = ("float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmzoo convert",
        description="Convert a checkpoint folder (config.json + pytorch_model.bin | model.safetensors | "
        "*.index.json shards) into a folder lmzoo.from_pretrained loads. Keys are checked against the "
        "family's key map before anything is written; tensors stream one at a time.",
    )
    p.add_argument("src", help="original checkpoint folder")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "pytorch", "orbax"),
                   help="safetensors / pytorch keep the original key names (loadable by the original code); "
                   "orbax writes the lmzoo params tree (default: safetensors)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating tensors (default: keep the stored dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="list every mapped key and the keys dropped")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--config", default=None,
                   help="config.json to use when SRC has none: GLM Megatron model-parallel shards "
                   "(mp_rank_XX_model_states.pt) are merged one tensor at a time")
    lsg = p.add_argument_group(
        "--to-lsg: turn an encoder checkpoint (BART, COCO-LM, T5/LongLM) into an LSG one for long inputs")
    lsg.add_argument("--to-lsg", action="store_true",
                     help="write the LSG config keys and 512 global-token embeddings; learned absolute positions "
                     "(BART, COCO-LM) are extended by tiling, relative-position biases (COCO-LM, T5) need nothing")
    lsg.add_argument("--max-length", type=int, default=16384,
                     help="new max_position_embeddings (BART, COCO-LM; T5: the tokenizer's model_max_length) (default 16384)")
    lsg.add_argument("--block-size", type=int, default=256, help="LSG local block size (default 256)")
    lsg.add_argument("--sparse-block-size", type=int, default=128)
    lsg.add_argument("--sparsity-factor", type=int, default=2)
    lsg.add_argument("--sparsity-type", default="norm", choices=("none", "norm", "pooling", "stride", "block_stride", "bos_pooling", "lsh"))
    lsg.add_argument("--num-global-tokens", type=int, default=1)
    lsg.add_argument("--mask-first-token", action="store_true")
    lsg.add_argument("--mask-token-id", type=int, default=None,
                     help="token whose embedding seeds globals 1.. (default: <mask> from the tokenizer files for BART, "
                     "COCO-LM's last id [MASK], T5's eos)")
    lsg.add_argument("--random-global-init", action="store_true",
                     help="globals drawn from a Gaussian fitted to the token embeddings instead")
    lsg.add_argument("--seed", type=int, default=123, help="seed of the global-token initialisation")
    return p


def _megatron(args, dtype) -> int:
    """SRC holds Megatron shards (no config.json): merge them with the GLM converter and --config."""
    import os

    from lmzoo.configuration import read_json
    from lmzoo.convert.glm import convert_glm_checkpoint
    from lmzoo.modeling import detect_family

    hf = read_json(args.config)
    if detect_family(hf) != "glm":
        raise ValueError(f"{args.config}: only GLM Megatron checkpoints are merged; this config is not GLM")
    if args.format == "orbax":
        raise ValueError("Megatron shards are merged into the original layout: use --format safetensors or pytorch")
    if os.path.exists(args.dst) and not args.overwrite:
        raise FileExistsError(f"{args.dst} already exists (pass --overwrite to replace it)")
    out = convert_glm_checkpoint(args.src, args.dst, hf, format=args.format, dtype=args.dtype)
    print(f"wrote {out} (GLM, merged Megatron shards, {args.format})")
    return 0


def _to_lsg(args) -> int:
    from lmzoo.convert.lsg import to_lsg

    if args.format == "orbax":
        raise ValueError("--to-lsg writes the original layout: use --format pytorch or safetensors")
    if args.dtype:
        raise ValueError("--to-lsg keeps float32; convert the result with --dtype afterwards")
    out, family = to_lsg(
        args.src, args.dst, overwrite=args.overwrite, max_length=args.max_length, block_size=args.block_size,
        sparse_block_size=args.sparse_block_size, sparsity_factor=args.sparsity_factor,
        sparsity_type=None if args.sparsity_type == "none" else args.sparsity_type,
        num_global_tokens=args.num_global_tokens, mask_first_token=args.mask_first_token, seed=args.seed,
        mask_token_id=args.mask_token_id, random_global_init=args.random_global_init, format=args.format,
    )
    print(f"wrote {out} (LSG {family}, {args.max_length} positions, block {args.block_size}, {args.sparsity_type} sparsity)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lmzoo.convert.checkpoint import CheckpointError
    from lmzoo.convert.convert import convert_checkpoint, plan_conversion
    from lmzoo.configuration import ConfigError

    dtype = None
    if args.dtype:
        import ml_dtypes
        import numpy as np

        dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(args.dtype)
    bar = None
    try:
        if args.to_lsg:
            return _to_lsg(args)
        import os

        if args.config is not None or not os.path.exists(os.path.join(args.src, "config.json")):
            if args.config is None:
                raise ValueError(f"{args.src}: no config.json; pass --config (GLM Megatron shards need one)")
            return _megatron(args, dtype)
        _, _, _, tensors, plan = plan_conversion(args.src, dtype=dtype)
        total = sum(t.nbytes for t in tensors.values() if t.alias_of is None)
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr)

        def progress(key, nbytes):
            if args.verbose:
                print(f"  {key}  {tuple(tensors[key].shape)} {tensors[key].dtype}", file=sys.stderr)
            if bar is not None:
                bar.update(nbytes)

        t0 = time.perf_counter()
        report = convert_checkpoint(
            args.src, args.dst, format=args.format, dtype=dtype, progress=progress,
            log=lambda s: print(s, file=sys.stderr), overwrite=args.overwrite,
        )
        dt = time.perf_counter() - t0
    except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        if bar is not None:
            bar.close()
        print(f"lmzoo convert: error: {e}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    print(
        f"wrote {args.dst} ({report['family']}, {args.format}): {report['tensors']} tensors, "
        f"{report['bytes'] / 1e6:.1f} MB in {dt:.1f} s ({report['bytes'] / 1e6 / max(dt, 1e-9):.0f} MB/s)"
    )
    if args.verbose and report["dropped"]:
        print(f"dropped (the original ignores them too): {', '.join(report['dropped'])}")
    return 0

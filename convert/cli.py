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
    return p


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

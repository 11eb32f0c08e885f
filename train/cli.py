"""``lmzoo train CONFIG [section.key=value ...] [--resume]``.

CONFIG is a JSON file with the sections of :class:`lmzoo.train.config.TrainConfig` (model, mesh, optim,
data, objective, loop) or the name of a preset (``lmzoo train --list-presets``). Overrides use dotted
keys: ``optim.lr=3e-4 data.batch_size=32 model.config.d_model=256 objective.options.mask_rate=0.15``.
Exit codes: 0 done, 1 stopped on a NaN/inf loss, 2 bad config or input, 143 preempted (SIGTERM) after
writing a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import TrainConfigError, apply_overrides, load_config
from .presets import PRESETS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmzoo train", description="Train or fine-tune an lmzoo model.")
    p.add_argument("config", nargs="?", help="a JSON config file or a preset name")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in loop.out_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-presets", action="store_true", help="list the built-in presets and exit")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list_presets:
        for name, (doc, _) in PRESETS.items():
            print(f"{name:<22} {doc}")
        return 0
    if not args.config:
        print("lmzoo train: give a config file or a preset name (see --list-presets)", file=sys.stderr)
        return 2
    try:
        if args.config in PRESETS:
            from .config import TrainConfig

            cfg = apply_overrides(TrainConfig.from_dict(PRESETS[args.config][1]), args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        from .loop import run

        result = run(cfg, resume=args.resume)
    except TrainConfigError as e:
        print(f"lmzoo train: {e}", file=sys.stderr)
        return 2
    if result.status == "preempted":
        print(f"preempted at step {result.step}; checkpoint written, continue with --resume", file=sys.stderr)
    elif result.status == "nan":
        print(f"stopped at step {result.step}: non-finite loss; the last good checkpoint is kept", file=sys.stderr)
    else:
        print(f"done: step {result.step}, loss {result.metrics.get('loss', float('nan')):.4f}, output in {result.out_dir}")
    return result.exit_code

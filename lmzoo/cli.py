"""The ``lmzoo`` command: ``convert``, ``generate``, ``train``, ``bench``, ``demo``.

Each sub-command lives with the code it drives; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "convert": ("lmzoo.convert.cli", "convert original checkpoints (torch .bin, safetensors, shards) to lmzoo / back"),
    "generate": ("lmzoo.generate_cli", "generate text from a model folder"),
    "train": ("lmzoo.train.cli", "train or fine-tune from a config with key=value overrides"),
    "bench": ("lmzoo.bench", "run the benchmarks in benchmarks/"),
    "demo": ("lmzoo.demo", "the embedded-default main job: train a small LongLM, save, reload, generate"),
}


def usage() -> str:
    lines = ["usage: lmzoo <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in SUBCOMMANDS:
        print(f"lmzoo: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(SUBCOMMANDS[cmd][0])
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

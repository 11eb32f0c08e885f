"""``lmzoo generate MODEL --text ...``: load a model folder, tokenize, generate, print the text."""

from __future__ import annotations

import argparse
import importlib
import json

__all__ = ["main", "load_tokenizer"]


def load_tokenizer(folder: str, family: str):
    """The family's tokenizer for a model folder (each family module may define ``load_tokenizer``)."""
    from lmzoo.modeling import FAMILIES

    mod = importlib.import_module(FAMILIES[family])
    fn = getattr(mod, "load_tokenizer", None)
    if fn is None:
        raise ValueError(f"no tokenizer loader for family {family!r}; pass token ids with --ids")
    return fn(folder)


def build_parser():
    p = argparse.ArgumentParser(prog="lmzoo generate", description="Generate from a model folder (original or lmzoo-written).")
    p.add_argument("model", help="model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="input text (repeat for a batch)")
    src.add_argument("--ids", help="input token ids as JSON, e.g. '[[5, 6, 1]]'")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--min-length", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--length-penalty", type=float, default=None)
    p.add_argument("--no-repeat-ngram-size", type=int, default=None)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--decoder-start-token-id", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print ids and text as JSON lines")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np

    import lmzoo

    model = lmzoo.from_pretrained(args.model)
    kwargs = {
        k: v
        for k, v in dict(
            max_length=args.max_length, max_new_tokens=args.max_new_tokens, min_length=args.min_length,
            num_beams=args.num_beams, length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
            top_p=args.top_p, top_k=args.top_k, temperature=args.temperature,
            decoder_start_token_id=args.decoder_start_token_id,
        ).items()
        if v is not None
    }
    if args.do_sample:
        kwargs["do_sample"] = True
    kwargs["seed"] = args.seed
    tok = None
    if args.text:
        tok = load_tokenizer(args.model, model.family)
        batch = tok(args.text)
        ids, mask = batch["input_ids"], batch["attention_mask"]
    else:
        ids = np.asarray(json.loads(args.ids))
        mask = None
    out = model.generate(ids, attention_mask=mask, **kwargs)
    for row in out:
        text = tok.decode(row, skip_special_tokens=True) if tok is not None else None
        if args.json:
            print(json.dumps({"ids": [int(i) for i in row], "text": text}, ensure_ascii=False))
        else:
            print(text if text is not None else " ".join(map(str, row)))
    return 0

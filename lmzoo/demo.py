"""``lmzoo demo``: a short, real training run on CPU that a newcomer can watch.

It pretrains a small LongLM-shaped model (T5 v1.0, about 1.4M params) for 500 steps on the
English stories shipped in ``lmzoo/data`` with LongLM's objective (span infilling + continuation),
showing a progress bar with a falling loss; saves a checkpoint and exports the model; reloads it with
``lmzoo.from_pretrained``; and generates: it continues a story opening and fills a blank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]

PROMPTS = [
    ("continue", "The old fisherman walked to the harbour at dawn. On the way"),
    ("continue", "A young girl ran towards the dark forest"),
    ("infill", "The miller <extra_id_1> the old mill in the evening."),
]


def _encode_prompt(tok, kind: str, text: str) -> list[int]:
    v = tok.vocab
    if kind == "continue":
        return tok.encode(text) + [v.sentinel(1), v.eos]  # LongLM continuation: front part + <extra_id_1>
    before, after = text.split("<extra_id_1>")
    return tok.encode(before) + [v.sentinel(1)] + tok.encode(after) + [v.eos]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmzoo demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lmzoo-demo", help="output folder (checkpoints, metrics, exported model)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    import numpy as np

    import lmzoo
    from lmzoo.train.config import TrainConfig, apply_overrides
    from lmzoo.train.loop import run
    from lmzoo.train.presets import PRESETS
    from lmzoo.train.tokenizer import load_tokenizer

    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "checkpoints")):
        print(f"{out} holds an earlier demo run; remove it or pass --out", file=sys.stderr)
        return 2
    cfg = apply_overrides(
        TrainConfig.from_dict(PRESETS["demo"][1]),
        [f"loop.out_dir={out}", f"loop.steps={args.steps}", f"data.batch_size={args.batch_size}", "mesh.data=1"],
    )
    import jax

    print(f"training a {cfg.model.config['d_model']}-wide, {cfg.model.config['num_layers']}+{cfg.model.config['num_decoder_layers']}-layer "
          f"LongLM (T5) for {cfg.loop.steps} steps on {jax.devices()[0].platform.upper()} ...")
    t0 = time.time()
    result = run(cfg, devices=jax.devices()[:1])
    if result.status != "done":
        print(f"training stopped: {result.status} at step {result.step}", file=sys.stderr)
        return result.exit_code
    print(f"trained in {time.time() - t0:.0f}s; final loss {result.metrics['loss']:.3f}; checkpoints in {out}/checkpoints")

    model_dir = os.path.join(out, "model")
    model = lmzoo.from_pretrained(model_dir)
    tok = load_tokenizer(cfg.data.tokenizer)
    print(f"reloaded {model_dir} with lmzoo.from_pretrained ({model.num_params() / 1e6:.2f}M params)\n")
    rows = [_encode_prompt(tok, kind, text) for kind, text in PROMPTS]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tok.vocab.pad, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    # beam search as LongLM's LOT evaluation; one blank per prompt, so no other sentinel is wanted
    sentinel = tok.vocab.sentinel(1)
    others = [[s] for s in tok.vocab.sentinels if s != sentinel]
    gen = model.generate(ids, attention_mask=mask, max_length=40, num_beams=4, no_repeat_ngram_size=3, bad_words_ids=others,
                         decoder_start_token_id=model.config.decoder_start_token_id, eos_token_id=tok.vocab.eos)
    for (kind, text), row in zip(PROMPTS, gen):
        body = [int(t) for t in row[1:] if t != sentinel]  # targets open with <extra_id_1>
        print(f"[{kind}] {text}\n   -> {tok.decode(body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

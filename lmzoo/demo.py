"""``lmzoo demo``: a short, real training run on CPU that a newcomer can watch.

It pretrains a small LongLM-shaped model (T5 v1.0, about 1.0M params) on the English stories shipped in
``lmzoo/data`` with LongLM's objective (span infilling + continuation, several stories packed per row),
showing a progress bar with a falling loss; saves checkpoints and exports the model; reloads it with
``lmzoo.from_pretrained``; and decodes greedily: it continues several different story openings and
fills blanks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

__all__ = ["main"]

PROMPTS = [  # openings and blanks the corpus does not hold verbatim
    ("continue", "The old fisherman walked to the harbour at dawn."),
    ("continue", "A young girl ran towards the dark forest when the bells rang."),
    ("continue", "The blacksmith sat near the stone bridge under a full moon."),
    ("continue", "The little prince came back from the river on a windy day."),
    ("infill", "An old woman came back from the river before the rain. On the way <extra_id_1> found a sleeping dog. "
               "An old woman <extra_id_2> and the birds flew over the water."),
]
BLANK = re.compile(r"<extra_id_(\d+)>")


def _encode_prompt(tok, kind: str, text: str) -> list[int]:
    v = tok.vocab
    if kind == "continue":
        return tok.encode(text) + [v.sentinel(1), v.eos]  # LongLM continuation: front part + <extra_id_1>
    parts = BLANK.split(text)  # text, k, text, k, ...: blank k is <extra_id_k>, numbered from 1 as LongLM's
    ids = tok.encode(parts[0])
    for k, after in zip(parts[1::2], parts[2::2]):
        ids += [v.sentinel(int(k))] + (tok.encode(after) if after.strip() else [])
    return ids + [v.eos]


def _fill(tok, text: str, target) -> str:
    """The prompt with each blank replaced by its span of ``target`` (<extra_id_k> span <extra_id_k+1> ...)."""
    spans, cur = {}, None
    ids = {s: k for k, s in enumerate(tok.vocab.sentinels)}
    for t in target:
        if t in ids:
            cur = ids[t]
            spans[cur] = []
        elif cur is not None:
            spans[cur].append(int(t))
    return BLANK.sub(lambda m: "[" + tok.decode(spans.get(int(m.group(1)), [])).strip() + "]", text)


def _join(a: str, b: str) -> str:
    return a + b if b[:1] in ".,;:!?" else f"{a} {b}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmzoo demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lmzoo-demo", help="output folder (checkpoints, metrics, exported model)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the demo preset's)")
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
    overrides = [f"loop.out_dir={out}", "mesh.data=1"]
    if args.steps is not None:
        overrides.append(f"loop.steps={args.steps}")
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    cfg = apply_overrides(TrainConfig.from_dict(PRESETS["demo"][1]), overrides)
    import jax

    m = cfg.model.config
    print(f"training a {m['d_model']}-wide, {m['num_layers']}+{m['num_decoder_layers']}-layer LongLM (T5) for "
          f"{cfg.loop.steps} steps on {jax.devices()[0].platform.upper()} ...")
    t0 = time.time()
    result = run(cfg, devices=jax.devices()[:1])
    if result.status != "done":
        print(f"training stopped: {result.status} at step {result.step}", file=sys.stderr)
        return result.exit_code
    print(f"trained in {time.time() - t0:.0f}s; final loss {result.metrics['loss']:.3f}; checkpoints in {out}/checkpoints")

    model_dir = os.path.join(out, "model")
    model = lmzoo.from_pretrained(model_dir)
    tok = load_tokenizer(cfg.data.tokenizer)
    print(f"reloaded {model_dir} with lmzoo.from_pretrained ({model.num_params() / 1e6:.2f}M params); greedy decoding:\n")
    rows = [_encode_prompt(tok, kind, text) for kind, text in PROMPTS]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tok.vocab.pad, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    # greedy; a 4-gram is never repeated (tiny models loop); an infilling target ends at </s> or at the
    # sentinel after the prompt's last blank
    v, pad = tok.vocab, tok.vocab.pad
    gen = model.generate(ids, attention_mask=mask, max_length=64, num_beams=1, do_sample=False, no_repeat_ngram_size=4,
                         decoder_start_token_id=model.config.decoder_start_token_id, eos_token_id=[v.eos, v.sentinel(3)])
    for (kind, text), row in zip(PROMPTS, gen):
        target = [int(t) for t in row[1:] if t not in (pad, v.eos)]
        if kind == "continue":
            body = tok.decode([t for t in target if t != v.sentinel(1)]).strip()  # the target opens with <extra_id_1>
            print(f"[continue] {text} ...\n        -> {_join(text, body)}")
        else:
            print(f"[infill]   {text}\n        -> {_fill(tok, text, target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

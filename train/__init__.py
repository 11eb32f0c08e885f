"""Training and fine-tuning for every lmzoo family: ``lmzoo train CONFIG key=value ...``.

config.py      the typed config (dataclasses) and ``section.key=value`` overrides
mesh.py        the mesh (data, fsdp, tensor), batch shardings, per-host rows, multi-host init
trainer.py     the jit-compiled, sharded, donated train / eval step (grad accumulation inside)
optim.py       optax AdamW / Adafactor and the schedules (linear, cosine, inverse-sqrt, PALM's noam)
losses.py      float32 token cross-entropy (+ z-loss, label smoothing) as sums
data.py        corpora, tokenised examples, the deterministic resumable loader
tokenizer.py   the family tokenizer files and their special ids
objectives/    one file per family's pretraining objective, plus supervised fine-tuning
checkpoint.py  orbax checkpoints: async, atomic, keep-K, resharding restore
loop.py        the loop: eval, logging, SIGTERM, NaN stop, export
metrics.py     ROUGE, BLEU, GLUE, SQuAD 2.0
logger.py      JSONL, TensorBoard, progress bar with tokens/s and MFU
cli.py         the command line; presets.py the built-in configs
"""

"""Built-in configs: the demo, and fine-tuning with the optimiser settings the model cards report.

Each preset is a partial config (missing keys take the dataclass defaults); data paths are left for the
command line (``data.train=... data.eval=...``).
"""

from __future__ import annotations

import os

__all__ = ["PRESETS"]


def _demo_dir() -> str:
    import lmzoo.data

    return os.path.dirname(os.path.abspath(lmzoo.data.__file__))


DEMO_MODEL = {
    "vocab_size": 600,  # 500 sentencepiece (BPE) pieces + 100 <extra_id_k>
    "d_model": 128,
    "d_kv": 32,
    "d_ff": 512,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "dropout_rate": 0.0,
    "eos_token_id": 2,  # the demo sentencepiece model uses the sentencepiece default layout (as LongLM)
    "pad_token_id": 3,
    "decoder_start_token_id": 1,
}

PRESETS: dict[str, tuple[str, dict]] = {
    "demo": (
        "a tiny LongLM (T5) pretrained on the shipped corpus: span infilling + continuation, whole stories packed two per row",
        {
            "model": {"family": "t5", "config": DEMO_MODEL},
            "optim": {"name": "adamw", "lr": 3e-3, "schedule": "linear", "warmup_steps": 30, "weight_decay": 0.01, "clip_norm": 1.0},
            "data": {"train": os.path.join(_demo_dir(), "demo_corpus.txt"), "tokenizer": os.path.join(_demo_dir(), "demo_spiece.model"),
                     "batch_size": 8, "seq_len": 96, "target_len": 48, "pack": True},
            "objective": {"name": "longlm", "options": {"continuation_prob": 0.5}},
            "loop": {"steps": 2000, "log_every": 20, "save_every": 500, "keep": 2, "out_dir": "runs/demo"},
        },
    ),
    "longlm-finetune": (
        "LongLM seq2seq fine-tuning as the LOT scripts: AdamW lr 1e-4, warmup 100, grad accumulation 40",
        {
            "model": {"family": "t5"},
            "optim": {"name": "adamw", "lr": 1e-4, "schedule": "linear", "warmup_steps": 100, "accum_steps": 40},
            "data": {"batch_size": 40, "seq_len": 512, "target_len": 512},
            "objective": {"name": "seq2seq", "options": {"decoder_start_token_id": 1}},
            "loop": {"metrics": ["bleu"]},
        },
    ),
    "lsg-bart-arxiv": (
        "LSG-BART arXiv summarisation as its card: Adam lr 8e-5, batch 8 x accum 4, linear (set optim.warmup_steps to 10% of the steps)",
        {
            "model": {"family": "lsg_bart"},
            "optim": {"name": "adamw", "lr": 8e-5, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "schedule": "linear", "accum_steps": 4},
            "data": {"batch_size": 32, "seq_len": 4096, "target_len": 320},
            "objective": {"name": "seq2seq"},
            "loop": {"metrics": ["rouge"], "generate_max_len": 320},
        },
    ),
    "palm-finetune": (
        "PALM 2.0 fine-tuning as its ModelScope card: AdamW lr 1e-3 with the noam factor (100 warmup), batch 8, len 128",
        {
            "model": {"family": "palm"},
            "optim": {"name": "adamw", "lr": 1e-3, "schedule": "noam", "warmup_steps": 100},
            "data": {"batch_size": 8, "seq_len": 128, "target_len": 128},
            "objective": {"name": "seq2seq"},
            "loop": {"metrics": ["rouge", "bleu"]},
        },
    ),
    "cocolm-glue": (
        "COCO-LM GLUE fine-tuning (classification): AdamW, linear decay; set the task's lr, batch and optim.warmup_steps (6.25% or 10% of the steps)",
        {
            "model": {"family": "cocolm"},
            "optim": {"name": "adamw", "lr": 2e-5, "weight_decay": 0.01, "eps": 1e-6, "b2": 0.98, "schedule": "linear"},
            "data": {"batch_size": 32, "seq_len": 512},
            "objective": {"name": "classification"},
            "loop": {"metrics": ["accuracy"]},
        },
    ),
    "cocolm-squad2": (
        "COCO-LM SQuAD 2.0 fine-tuning (span extraction), EM / F1",
        {
            "model": {"family": "cocolm"},
            "optim": {"name": "adamw", "lr": 3e-5, "weight_decay": 0.01, "eps": 1e-6, "b2": 0.98, "schedule": "linear"},
            "data": {"batch_size": 32, "seq_len": 384},
            "objective": {"name": "span_extraction"},
            "loop": {"metrics": ["squad"]},
        },
    ),
}

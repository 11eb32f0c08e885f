"""Eval metrics (ROUGE via rouge-score, BLEU via sacrebleu, GLUE, SQuAD 2.0) and a seq2seq fine-tuning
run whose periodic eval decodes and scores them."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from lmzoo.train import config as C
from lmzoo.train import metrics as M
from .conftest import require


def test_rouge_and_bleu():
    require("rouge_score")
    require("sacrebleu")
    r = M.rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(100.0) and r["rougeL"] == pytest.approx(100.0)
    r = M.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(100 * 2 * (1.0 * 0.5) / 1.5)  # P 1, R 1/2
    zh = M.rouge(["今天天气很好"], ["今天天气不好"])  # per character: 5 of 6 unigrams shared
    assert zh["rouge1"] == pytest.approx(100 * 5 / 6)
    b = M.bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert b["bleu"] == pytest.approx(100.0)
    assert M.bleu(["a b c d"], ["w x y z"])["bleu"] == pytest.approx(0.0)


def test_glue_metrics():
    p, y = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert M.accuracy(p, y)["accuracy"] == pytest.approx(0.6)
    assert M.binary_f1(p, y)["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    tp, tn, fp, fn = 2, 1, 1, 1
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_corrcoef(p, y)["mcc"] == pytest.approx(mcc)
    assert M.matthews_corrcoef([1, 1], [1, 1])["mcc"] == 0.0
    c = M.pearson_spearman([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0])
    assert c["spearman"] == pytest.approx(1.0) and 0.98 < c["pearson"] < 1.0


def test_squad_v2():
    out = M.squad_v2(["The Eiffel tower", "", "Paris", ""], [["Eiffel Tower"], [], ["in Paris, France"], ["x"]])
    # exact: 1, 1 (no-answer), 0, 0; F1: 1, 1, 2*(1*1/3)/(1+1/3) = 0.5, 0
    assert out["exact"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (1 + 1 + 0.5 + 0) / 4)


def test_seq2seq_finetune_eval_scores_generations(tmp_path):
    require("rouge_score")
    require("sacrebleu")
    data = os.path.join(os.path.dirname(__import__("lmzoo").__file__), "data")
    lines = [l.strip() for l in open(os.path.join(data, "demo_corpus.txt")) if l.strip()][:48]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for l in lines:  # "summarise" a story by its first sentence
            f.write(json.dumps({"source": l, "target": l.split(".")[0] + "."}) + "\n")
    cfg = C.TrainConfig.from_dict({
        "model": {"family": "t5", "config": {"vocab_size": 600, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4,
                                             "eos_token_id": 2, "pad_token_id": 3, "decoder_start_token_id": 1}},
        "mesh": {"data": 1},
        "optim": {"lr": 1e-2, "schedule": "linear", "warmup_steps": 2},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "eval": str(tmp_path / "pairs.jsonl"), "tokenizer": os.path.join(data, "demo_spiece.model"),
                 "batch_size": 8, "seq_len": 64, "target_len": 24, "prefetch": 0},
        "objective": {"name": "seq2seq"},
        "loop": {"steps": 6, "eval_every": 6, "eval_batches": 1, "log_every": 3, "save_every": 0, "metrics": ["rouge", "bleu"],
                 "generate_max_len": 12, "out_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    })
    from lmzoo.train.loop import run

    res = run(cfg, devices=jax.devices()[:1])
    assert res.status == "done"
    ev = res.eval_metrics
    for k in ("loss", "ppl", "accuracy", "rouge1", "rouge2", "rougeL", "bleu"):
        assert k in ev and np.isfinite(ev[k]), ev
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(r["split"] == "eval" and "rougeL" in r for r in rows)

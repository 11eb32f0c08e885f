"""Eval metrics the model cards report, computed with the packages their authors used.

* ROUGE-1/2/L (summarisation: LSG-BART arXiv, PALM LCSTS/ADGEN): Google's ``rouge-score``. For Chinese,
  text is split into characters first (the usual LCSTS convention), since rouge-score's tokenizer keeps
  only ASCII letters and digits.
* BLEU (PALM ADGEN / question generation): ``sacrebleu`` corpus BLEU (``tokenize="zh"`` for Chinese).
* GLUE (COCO-LM): accuracy, binary F1, Matthews correlation, Pearson / Spearman (scipy.stats, as the GLUE
  scripts of transformers do).
* SQuAD 2.0 (COCO-LM): exact match and F1 with the official answer normalisation and no-answer rule.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["METRICS", "rouge", "bleu", "accuracy", "binary_f1", "matthews_corrcoef", "pearson_spearman", "squad_v2", "has_cjk"]


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def has_cjk(texts: Iterable[str]) -> bool:
    return any(_CJK.search(t) for t in texts)


def _char_split(text: str) -> str:
    return " ".join(ch for ch in text if not ch.isspace())


def rouge(predictions: Sequence[str], references: Sequence[str], *, chinese: bool | None = None) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (x100). Chinese text (auto-detected) is scored per character."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    if chinese is None:
        chinese = has_cjk(references)
    if chinese:
        # rouge-score's default tokenizer drops non-ASCII; score characters mapped to ASCII-safe tokens.
        vocab: dict[str, str] = {}

        def enc(t: str) -> str:
            return " ".join(vocab.setdefault(ch, f"c{len(vocab)}") for ch in _char_split(t).split())

        predictions = [enc(p) for p in predictions]
        references = [enc(r) for r in references]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=not chinese)
    totals = collections.defaultdict(float)
    for p, r in zip(predictions, references):
        for name, s in scorer.score(r, p).items():
            totals[name] += s.fmeasure
    n = max(len(predictions), 1)
    return {name: 100.0 * v / n for name, v in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str], *, chinese: bool | None = None) -> dict[str, float]:
    """sacrebleu corpus BLEU-4 (and BLEU-1 precision), one reference per prediction."""
    import sacrebleu

    _check_pairs(predictions, references)
    if chinese is None:
        chinese = has_cjk(references)
    res = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh" if chinese else "13a")
    return {"bleu": float(res.score), "bleu1_precision": float(res.precisions[0])}


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    p, y = np.asarray(preds), np.asarray(labels)
    _check_pairs(p, y)
    return {"accuracy": float(np.mean(p == y)) if len(y) else 0.0}


def binary_f1(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    p, y = np.asarray(preds), np.asarray(labels)
    _check_pairs(p, y)
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y != 1)))
    fn = float(np.sum((p != 1) & (y == 1)))
    denom = 2 * tp + fp + fn
    return {"f1": 2 * tp / denom if denom else 0.0}


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Matthews correlation (CoLA), multiclass form from the confusion matrix; 0 when undefined."""
    p, y = np.asarray(preds), np.asarray(labels)
    _check_pairs(p, y)
    classes = np.union1d(p, y)
    idx = {c: i for i, c in enumerate(classes)}
    C = np.zeros((len(classes), len(classes)), np.float64)
    for a, b in zip(y, p):
        C[idx[a], idx[b]] += 1
    t, pk = C.sum(1), C.sum(0)
    c, s = np.trace(C), C.sum()
    cov_yp = c * s - t @ pk
    cov_pp = s * s - pk @ pk
    cov_yy = s * s - t @ t
    denom = np.sqrt(cov_pp * cov_yy)
    return {"mcc": float(cov_yp / denom) if denom else 0.0}


def pearson_spearman(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """STS-B: Pearson and Spearman correlation (scipy.stats)."""
    from scipy import stats

    p, y = np.asarray(preds, np.float64), np.asarray(labels, np.float64)
    _check_pairs(p, y)
    return {"pearson": float(stats.pearsonr(p, y)[0]), "spearman": float(stats.spearmanr(p, y)[0])}


# ---- SQuAD 2.0 (official evaluation rules) ------------------------------------------------------
def _normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _exact(gold: str, pred: str) -> float:
    return float(_normalize_answer(gold) == _normalize_answer(pred))


def _f1(gold: str, pred: str) -> float:
    g, p = _normalize_answer(gold).split(), _normalize_answer(pred).split()
    if not g or not p:  # a no-answer on either side: F1 is 1 if both are empty, else 0
        return float(g == p)
    common = collections.Counter(g) & collections.Counter(p)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_v2(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """EM / F1 (x100): each prediction scored against its best gold answer; ``[]`` golds mean no answer
    (then the only correct prediction is the empty string)."""
    _check_pairs(predictions, references)
    em = f1 = 0.0
    for pred, golds in zip(predictions, references):
        golds = [g for g in golds if _normalize_answer(g)] or [""]
        em += max(_exact(g, pred) for g in golds)
        f1 += max(_f1(g, pred) for g in golds)
    n = max(len(predictions), 1)
    return {"exact": 100.0 * em / n, "f1": 100.0 * f1 / n}


def _check_pairs(a, b) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")


# name -> (kind, fn): "text" metrics compare decoded strings, "label" metrics compare class ids / scores.
METRICS: Mapping[str, tuple[str, Callable]] = {
    "rouge": ("text", rouge),
    "bleu": ("text", bleu),
    "accuracy": ("label", accuracy),
    "f1": ("label", binary_f1),
    "mcc": ("label", matthews_corrcoef),
    "pearson": ("label", pearson_spearman),
    "spearman": ("label", pearson_spearman),
    "squad": ("span", squad_v2),
}

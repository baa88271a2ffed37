"""Evaluation metrics for GLUE and SQuAD v1.1, numpy only."""
import collections
import re
import string

import numpy as np


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def f1_binary(preds, labels) -> float:
    preds, labels = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp = np.sum(preds & labels)
    denom = preds.sum() + labels.sum()  # = 2tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else 0.0


def matthews_corrcoef(preds, labels) -> float:
    # general multiclass formula (Gorodkin 2004) from the confusion matrix; binary is a special case
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes, idx = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    y, p = idx[: len(labels)], idx[len(labels):]
    k = len(classes)
    cm = np.bincount(y * k + p, minlength=k * k).reshape(k, k).astype(np.float64)
    t, q = cm.sum(1), cm.sum(0)  # true / predicted counts per class
    n, c = cm.sum(), np.trace(cm)
    denom = np.sqrt((n * n - q @ q) * (n * n - t @ t))
    return float((c * n - t @ q) / denom) if denom > 0 else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else 0.0


def _rank(a):
    # 1-based ranks, ties get the average of the ranks they span
    a = np.asarray(a, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def spearman(x, y) -> float:
    return pearson(_rank(x), _rank(y))


# ---- SQuAD v1.1, following the official evaluate-v1.1.py scoring ----

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _exact(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: dict, references: dict) -> dict:
    """predictions: id -> answer text, references: id -> list of gold texts. Scores on 0..100."""
    em = f1 = 0.0
    for qid, golds in references.items():
        pred = predictions.get(qid, "")  # a missing prediction scores 0, as in the official script
        em += max(_exact(pred, g) for g in golds)
        f1 += max(_f1(pred, g) for g in golds)
    n = max(len(references), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}

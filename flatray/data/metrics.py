"""Evaluation metrics for GLUE, SQuAD v1.1 and defined tasks (macro-F1), and compute_metrics: a task's metrics from
its model outputs.

GLUE's come from scipy and scikit-learn; SQuAD's EM/F1 follow the official evaluate-v1.1.py script."""
import collections
import re
import string

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from flatray.data.squad import postprocess_qa
from flatray.data.tasks import TaskSpec

_F1_TASKS = ("qqp", "mrpc")  # GLUE reports F1 next to accuracy for the two paraphrase tasks


def accuracy(preds, labels) -> float:
    return float(skm.accuracy_score(np.asarray(labels), np.asarray(preds)))


def f1_binary(preds, labels) -> float:
    """F1 of class 1; 0.0 when there are no positives at all (undefined)."""
    return float(skm.f1_score(np.asarray(labels), np.asarray(preds), pos_label=1, zero_division=0))


def macro_f1(preds, labels) -> float:
    """The unweighted mean of the per-class F1 over the classes in labels or preds (sklearn's average='macro');
    a class never predicted scores 0."""
    return float(skm.f1_score(np.asarray(labels), np.asarray(preds), average="macro", zero_division=0))


def matthews_corrcoef(preds, labels) -> float:
    """Multiclass MCC; 0.0 when undefined (e.g. a constant prediction)."""
    return float(skm.matthews_corrcoef(np.asarray(labels), np.asarray(preds)))


def _undefined(x, y) -> bool:
    # constant input: scipy returns nan (and warns); report 0.0 as for MCC, so a constant model scores 0, not nan
    return len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    return 0.0 if _undefined(x, y) else float(stats.pearsonr(x, y).statistic)


def _rank(a):
    # kept only for tests/test_metrics.py::test_rank_averages_ties; spearman leaves ranking to scipy
    return stats.rankdata(np.ravel(a))  # 1-based, ties get the average of the ranks they span


def spearman(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    return 0.0 if _undefined(x, y) else float(stats.spearmanr(x, y).statistic)


CLASSIFICATION_METRICS = {"accuracy": accuracy, "f1": f1_binary, "macro_f1": macro_f1, "matthews": matthews_corrcoef}


# ---- SQuAD v1.1, following the official evaluate-v1.1.py scoring (kept by hand: it *is* the definition) ----

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


# ---- per task ----

def compute_metrics(spec: TaskSpec, eval_set, outputs) -> dict[str, float]:
    """eval_set: a flatray.data.EvalSet. outputs: classification logits [n, C]; regression [n] or [n, 1];
    qa (start_logits, end_logits), each [n, L] or a list of per-batch [b, L_i]."""
    if spec.kind == "qa":
        start_logits, end_logits = outputs
        preds = postprocess_qa(eval_set.examples, eval_set.meta, start_logits, end_logits)
        gold = eval_set.examples.select_columns(["id", "answers"])[:]
        refs = {ex_id: ans["text"] for ex_id, ans in zip(gold["id"], gold["answers"])}
        return squad_em_f1(preds, refs)
    labels = eval_set.labels
    outputs = np.asarray(outputs)
    if spec.kind == "regression":
        outputs = outputs.reshape(len(labels))
        return {"pearson": pearson(outputs, labels), "spearman": spearman(outputs, labels)}
    preds = outputs.reshape(len(labels), -1).argmax(-1)
    if spec.metrics:  # the defined and registry tasks name theirs
        return {name: CLASSIFICATION_METRICS[name](preds, labels) for name in spec.metrics}
    if spec.main_metric == "matthews":
        return {"matthews": matthews_corrcoef(preds, labels)}
    out = {"accuracy": accuracy(preds, labels)}
    if spec.name in _F1_TASKS:
        out["f1"] = f1_binary(preds, labels)
    return out

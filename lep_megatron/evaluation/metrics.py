"""Darumeru metrics, written to give the numbers of the reference implementation (llmtf_open,
mid-2024): sklearn's macro-F1 and MCC, SQuAD F1/EM, rouge_score's ROUGE-N, difflib copy ratios.

Each function takes plain Python values so that the Megatron and HF backends share them.
"""
import difflib
import math
import re
import string
from collections import Counter, defaultdict
from functools import lru_cache
from typing import Callable, Dict, Hashable, Iterable, List, Sequence, Tuple

import numpy as np


def mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def accuracy(golds: Sequence, preds: Sequence) -> float:
    return mean(g == p for g, p in zip(golds, preds))


def f1_macro(golds: Sequence[Hashable], preds: Sequence[Hashable]) -> float:
    """sklearn `f1_score(average="macro")`: unweighted mean over the union of labels seen."""
    f1s = []
    for label in set(golds) | set(preds):
        tp = sum(g == label and p == label for g, p in zip(golds, preds))
        fp = sum(g != label and p == label for g, p in zip(golds, preds))
        fn = sum(g == label and p != label for g, p in zip(golds, preds))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return mean(f1s)


def matthews_corrcoef(golds: Sequence[Hashable], preds: Sequence[Hashable]) -> float:
    """sklearn's multiclass MCC (Gorodkin's R_K); 0 when a marginal is constant."""
    labels = sorted(set(golds) | set(preds), key=str)
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.float64)
    for g, p in zip(golds, preds):
        confusion[index[g], index[p]] += 1
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    n, correct = confusion.sum(), np.trace(confusion)
    denominator = math.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - t @ p) / denominator) if denominator else 0.0


# --- SQuAD F1 / EM (transformers.data.metrics.squad_metrics) ---------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(gold: str, pred: str) -> float:
    return float(squad_normalize(gold) == squad_normalize(pred))


def squad_f1(gold: str, pred: str) -> float:
    gold_tokens, pred_tokens = squad_normalize(gold).split(), squad_normalize(pred).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    common = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric: Callable[[str, str], float], pred: str, golds: Sequence[str]) -> float:
    return max(metric(gold, pred) for gold in golds)


# --- PARus: an item counts only when both orders of its options are answered right -----------

def both_orders_accuracy(ids: Sequence[Hashable], correct: Sequence[bool]) -> float:
    by_id: Dict[Hashable, List[bool]] = defaultdict(list)
    for item_id, ok in zip(ids, correct):
        by_id[item_id].append(bool(ok))
    return mean(all(oks) for oks in by_id.values())


# --- USE (the Russian Unified State Exam): points per variant / 34 ------------------------------

USE_MAX_POINTS = 34


def use_points(task_type: str, id_task: str, answer: str, prediction: str) -> int:
    """Points of one USE question for a stripped prediction, by the rule of its `meta.type`."""
    if task_type == "matching":
        pred = [p.strip() for p in prediction.split(",")]
        ans = answer.split(",")
        return sum(p == a for p, a in zip(pred, ans)) if len(pred) == len(ans) else 0
    if task_type == "text":
        # the reference's character class [\d+\W+] drops digits, '+' and every non-word char
        return int(re.sub(r"[\d+\W+]", "", prediction).lower() in answer.split(","))
    pred = [p.strip() for p in prediction.split(",")]
    ans = answer.split(",")
    if id_task == "16":
        pred += ["-1"] * (len(ans) - len(pred))
        return max(0, len(set(ans) & set(pred)) - len(pred) + len(ans))
    return int(len(set(ans) & set(pred)) == len(set(ans)) == len(set(pred)))


def use_grade_norm(points: Sequence[int], variants: Sequence[Hashable]) -> float:
    per_variant: Dict[Hashable, int] = defaultdict(int)
    for p, v in zip(points, variants):
        per_variant[v] += p
    return mean(total / USE_MAX_POINTS for total in per_variant.values())


# --- ROUGE-N (rouge_score with the reference's custom tokenizer) -------------------------------

_PUNCT_TO_SPACE = str.maketrans({ch: " " for ch in string.punctuation})


@lru_cache(maxsize=1)
def _morph():
    import pymorphy3  # lazy: only the abstractive task with lemmatization needs it

    return pymorphy3.MorphAnalyzer()


@lru_cache(maxsize=200_000)
def lemma(word: str) -> str:
    return _morph().parse(word)[0].normal_form


def rouge_tokens(text: str, lemmatize: bool = True) -> List[str]:
    """Lowercase, ASCII punctuation to spaces (Russian «» — stay), split, lemmatize."""
    words = text.lower().translate(_PUNCT_TO_SPACE).split()
    return [lemma(w) for w in words] if lemmatize else words


def rouge_n(target: Sequence[str], prediction: Sequence[str], n: int) -> Tuple[float, float, float]:
    """(precision, recall, F) of n-gram overlap, clipped counts, as rouge_score computes them."""
    def ngrams(tokens):
        return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

    target_ngrams, pred_ngrams = ngrams(target), ngrams(prediction)
    overlap = sum((target_ngrams & pred_ngrams).values())
    precision = overlap / max(sum(pred_ngrams.values()), 1)
    recall = overlap / max(sum(target_ngrams.values()), 1)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f


# --- extractive summarization ------------------------------------------------------------------

def r_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Share of the R gold sentences among the R best-scored ones (R = number of golds)."""
    r = int(sum(bool(x) for x in labels))
    if r == 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:r]
    return sum(bool(labels[i]) for i in top) / r


# --- copy tasks --------------------------------------------------------------------------------

def length_ratio(n_source: int, n_generated: int) -> float:
    """min(r, 1/r) of the token counts; 0 for an empty generation."""
    if n_source == 0 or n_generated == 0:
        return 0.0
    return min(n_generated / n_source, n_source / n_generated)


def matched_char_ratio(reference: str, generated: str, denominator: str = "generated") -> float:
    """difflib matched characters over len(generated) (mid-2024) or len(reference) (later)."""
    a, b = reference.strip(), generated.strip()
    matched = sum(block.size for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    length = len(b) if denominator == "generated" else len(a)
    return matched / length if length else 0.0


COPY_EXACT_THRESHOLD = 0.99


def copy_exact(reference: str, generated: str, denominator: str = "generated") -> float:
    return float(matched_char_ratio(reference, generated, denominator) >= COPY_EXACT_THRESHOLD)

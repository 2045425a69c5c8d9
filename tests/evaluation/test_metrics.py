"""Metrics against hand-computed values and independent textbook formulas."""
import itertools
import math
import random

import numpy as np
import pytest

from lep_megatron.evaluation import metrics


def f1_macro_textbook(golds, preds):
    """Per-label P and R (0 when undefined), F1 = 2PR/(P+R) (0 when P+R = 0), mean over labels."""
    scores = []
    for label in sorted(set(golds) | set(preds)):
        tp = sum(g == p == label for g, p in zip(golds, preds))
        n_pred, n_gold = preds.count(label), golds.count(label)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def mcc_as_correlation(golds, preds):
    """Multiclass MCC as the correlation of one-hot gold and prediction matrices."""
    labels = sorted(set(golds) | set(preds))
    x = np.array([[g == l for l in labels] for g in golds], dtype=float)
    y = np.array([[p == l for l in labels] for p in preds], dtype=float)
    x -= x.mean(0)
    y -= y.mean(0)
    denominator = math.sqrt((x * x).sum() * (y * y).sum())
    return (x * y).sum() / denominator if denominator else 0.0


def test_accuracy_f1_mcc_hand_values():
    golds, preds = list("1231"), list("1222")
    assert metrics.accuracy(golds, preds) == 0.5
    assert metrics.f1_macro(golds, preds) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # binary: TP 2, FP 1, TN 1, FN 0 -> (2*1 - 1*0) / sqrt(3 * 2 * 2 * 1)
    assert metrics.matthews_corrcoef(list("1010"), list("1110")) == pytest.approx(2 / math.sqrt(12))
    assert metrics.matthews_corrcoef(list("1111"), list("1111")) == 0.0  # constant: sklearn's 0
    assert metrics.matthews_corrcoef(list("0101"), list("1010")) == pytest.approx(-1.0)


def test_f1_and_mcc_match_independent_formulas_on_random_labels():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        golds = [rng.choice("ABCD") for _ in range(n)]
        preds = [rng.choice("ABC") for _ in range(n)]
        assert metrics.f1_macro(golds, preds) == pytest.approx(f1_macro_textbook(golds, preds))
        assert metrics.matthews_corrcoef(golds, preds) == pytest.approx(mcc_as_correlation(golds, preds))


def test_squad_normalization_f1_em():
    assert metrics.squad_normalize("The  Beatles, an  English band!") == "beatles english band"
    assert metrics.squad_normalize("«Москва»") == "«москва»"  # only ASCII punctuation goes
    assert metrics.squad_f1("Пётр Первый", "царь Пётр") == 0.5
    assert metrics.squad_f1("x y z", "x y") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert metrics.squad_f1("a b c", "a b") == pytest.approx(2 / 3)  # "a" is an article: "b c" vs "b"
    assert metrics.squad_f1("the", "") == 1.0  # both empty after normalization
    assert metrics.squad_f1("x", "") == 0.0
    assert metrics.best_over_golds(metrics.squad_exact, "Москва.", ["город", "москва"]) == 1.0


def test_both_orders_accuracy():
    assert metrics.both_orders_accuracy([0, 0, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("task_type,id_task,answer,pred,points", [
    ("text", "1", "холодный,холодная", "Холодный.", 1),
    ("text", "1", "холодный", "холодная", 0),
    ("text", "7", "пятьсот", "5 пятьсот+", 1),  # digits, '+' and punctuation are dropped
    ("matching", "26", "4,9,2,8", "4, 9, 3, 8", 3),
    ("matching", "26", "4,9,2,8", "4,9,2", 0),  # length differs
    ("multiple_choice_based_on_text", "8", "2,3", "3, 2", 1),
    ("multiple_choice_based_on_text", "8", "2,3", "2", 0),
    ("multiple_choice_independent_options", "16", "1,3,5", "1,3", 2),
    ("multiple_choice_independent_options", "16", "1,3", "1,3,5,6", 0),  # max(0, 2 - 4 + 2)
])
def test_use_points(task_type, id_task, answer, pred, points):
    assert metrics.use_points(task_type, id_task, answer, pred) == points


def test_use_grade_norm():
    assert metrics.use_grade_norm([1, 3, 1, 2, 0], [1, 1, 1, 2, 2]) == pytest.approx((5 / 34 + 2 / 34) / 2)


def test_rouge_n_hand_values():
    target, pred = "a b c a".split(), "a a d".split()
    # unigrams: overlap min(2,2) a = 2; P 2/3, R 2/4
    p, r, f = metrics.rouge_n(target, pred, 1)
    assert (p, r) == (pytest.approx(2 / 3), 0.5) and f == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # bigrams: target {ab, bc, ca}, pred {aa, ad}: no overlap
    assert metrics.rouge_n(target, pred, 2) == (0.0, 0.0, 0.0)
    assert metrics.rouge_n([], pred, 1) == (0.0, 0.0, 0.0)


def test_rouge_tokens_lemmatize_and_keep_russian_punctuation():
    assert metrics.rouge_tokens("Кошки спят на диване.") == ["кошка", "спать", "на", "диван"]
    assert metrics.rouge_tokens("«Кошки» — спят!", lemmatize=False) == ["«кошки»", "—", "спят"]


def test_r_precision():
    assert metrics.r_precision([-1, -0.5, -2], [True, False, True]) == 0.5
    assert metrics.r_precision([0.3, 0.2, 0.1], [True, True, False]) == 1.0
    assert math.isnan(metrics.r_precision([0.1], [False]))


def test_copy_metrics():
    assert metrics.length_ratio(4, 2) == 0.5 and metrics.length_ratio(2, 4) == 0.5 and metrics.length_ratio(3, 0) == 0
    # "Кот спит" inside "Кот спит на окне.": 8 matched chars of 8 generated / of 17 reference
    assert metrics.matched_char_ratio("Кот спит на окне.", " Кот спит ") == 1.0
    assert metrics.matched_char_ratio("Кот спит на окне.", "Кот спит", "reference") == pytest.approx(8 / 17)
    # 30 of 31 characters: below the 0.99 threshold
    assert metrics.copy_exact("Paris is the capital of France.", "Paris is the capital of Frence.") == 0.0
    long = "x" * 99 + "y"
    assert metrics.copy_exact(long, "x" * 99 + "z", "reference") == 1.0  # 99/100 reaches 0.99
    assert metrics.copy_exact(long, "x" * 98 + "zz", "reference") == 0.0
    assert metrics.copy_exact(long * 2, long * 2) == 1.0


def test_matched_chars_equal_difflib_blocks_on_random_strings():
    rng = random.Random(1)
    for _ in range(50):
        a = "".join(rng.choice("абв ") for _ in range(rng.randint(1, 30)))
        b = "".join(rng.choice("абв ") for _ in range(rng.randint(1, 30)))
        # an LCS bound: matched chars never exceed the longest common subsequence
        lcs = np.zeros((len(a.strip()) + 1, len(b.strip()) + 1), dtype=int)
        for i, j in itertools.product(range(len(a.strip())), range(len(b.strip()))):
            lcs[i + 1, j + 1] = lcs[i, j] + 1 if a.strip()[i] == b.strip()[j] else max(lcs[i, j + 1], lcs[i + 1, j])
        if b.strip():
            assert metrics.matched_char_ratio(a, b) * len(b.strip()) <= lcs[-1, -1] + 1e-9

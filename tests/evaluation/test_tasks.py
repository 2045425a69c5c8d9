"""Every task on its fixture (tests/evaluation/fixtures, the public layouts) with a scripted
backend; expected scores computed by hand in the comments."""
import math

import pytest

from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.prompts import BASE_FORMAT
from lep_megatron.evaluation.runner import run_task
from lep_megatron.evaluation.tasks import GROUPS, TASKS, build, resolve
from lep_megatron.evaluation.tasks.base import TaskSettings
from lep_megatron.evaluation.tasks.mmlu import SUBJECT_CATEGORY
from tests.evaluation.conftest import FIXTURES
from tests.evaluation.scripted import ScriptedBackend, by_key


def run(name, tokenizer, answer, leading_space=True, **settings):
    backend = ScriptedBackend(tokenizer, answer, leading_space)
    result, requests, records = run_task(build(name, TaskSettings(**settings)), backend, BASE_FORMAT,
                                         FIXTURES, max_len=4000, batch_size=3)
    return result, requests, records


def test_registry_has_the_17_tasks_in_5_groups():
    assert len(TASKS) == 17
    assert {g: len(t) for g, t in GROUPS.items()} == {
        "DaruMMLU": 3, "DaruMERA": 8, "DaruSum": 2, "DaruCopy-EN": 2, "DaruCopy-RU": 2}
    assert resolve(["DaruSum", "darumeru/RWSD"]) == ["darumeru/RWSD", "daru/treewayabstractive", "daru/treewayextractive"]
    with pytest.raises(UserInputError, match="unknown task or group 'nope'"):
        resolve(["nope"])


def test_missing_data_names_task_and_path(tmp_path, tokenizer):
    backend = ScriptedBackend(tokenizer, lambda p: "A")
    with pytest.raises(UserInputError, match=r"task darumeru/RCB: no 'test' split of RefalMachine/darumeru .*rcb"):
        run_task(build("darumeru/RCB", TaskSettings()), backend, BASE_FORMAT, tmp_path, 4000, 2)


def test_darumeru_rummlu(tokenizer):
    # golds A B C D, preds A B D D -> acc 3/4
    result, _, _ = run("darumeru/ruMMLU", tokenizer, by_key({"М0": "A", "М1": "B", "М2": "D", "М3": "D"}))
    assert result.metrics == {"acc": 0.75} and result.score == 0.75


def test_rcb_accuracy_and_macro_f1(tokenizer):
    # golds 1 2 3 1, preds 1 2 2 2: acc 1/2; F1 per label: 1 -> 2/3, 2 -> 2*1/(2+2) = 1/2, 3 -> 0
    result, _, _ = run("darumeru/RCB", tokenizer, by_key({"П0": "1", "П1": "2", "П2": "2", "П3": "2"}))
    assert result.metrics["acc"] == 0.5
    assert result.metrics["f1_macro"] == pytest.approx(7 / 18)
    assert result.score == pytest.approx((0.5 + 7 / 18) / 2)


def test_ruopenbookqa_and_ruworldtree(tokenizer):
    # golds A B C, preds A A C: acc 2/3, F1 A 2/3, B 0, C 1 -> 5/9
    result, _, _ = run("darumeru/ruOpenBookQA", tokenizer, by_key({"К0": "A", "К1": "A", "К2": "C"}))
    assert result.score == pytest.approx((2 / 3 + 5 / 9) / 2)
    # golds A B, preds B B: acc 1/2, F1 A 0, B 2/3 -> 1/3
    result, _, _ = run("darumeru/ruWorldTree", tokenizer, by_key({"Д0": "B", "Д1": "B"}))
    assert result.score == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_rwsd(tokenizer):
    # golds Да Нет Да, always Да -> 2/3
    result, _, _ = run("darumeru/RWSD", tokenizer, lambda p: "Да")
    assert result.score == pytest.approx(2 / 3)


def test_parus_counts_an_item_only_if_both_orders_are_right(tokenizer):
    def answer(prompt):
        test_part = prompt[prompt.rindex("Посылка:"):]
        if "С0" in test_part:  # knows the answer: picks "дождь" wherever it is listed
            return "1" if test_part.index("дождь") < test_part.index("солнце") else "2"
        if "С1" in test_part:  # always "1": right in one order only
            return "1"
        return "2" if test_part.index("гроза") < test_part.index("туман") else "1"  # always wrong

    result, requests, records = run("darumeru/PARus", tokenizer, answer)
    assert len(requests) == 6
    assert [r["gold"] for r in records] == ["1", "2", "2", "1", "1", "2"]
    assert "1. солнце\n2. дождь" in requests[1].prompt  # options swapped, gold flipped
    assert "1. жара\n2. холод" in requests[1].prompt  # the shot is not reversed
    assert result.score == pytest.approx(1 / 3)


def test_multiq_f1_em_best_over_golds(tokenizer):
    # "Москва." = gold 1 (EM 1, F1 1); "царь Пётр" vs "Пётр Первый": 1 common of 2/2 -> F1 1/2, EM 0;
    # "Beatles" vs "the Beatles": the article is dropped -> EM 1, F1 1
    result, _, _ = run("darumeru/MultiQ", tokenizer, by_key({"В0": "Москва.", "В1": "царь Пётр", "В2": "Beatles"}))
    assert result.metrics["f1"] == pytest.approx(2.5 / 3)
    assert result.metrics["em"] == pytest.approx(2 / 3)
    assert result.score == pytest.approx((2.5 / 3 + 2 / 3) / 2)


def test_use_points_per_variant_over_34(tokenizer):
    # variant 1: text "Холодный." -> "холодный" in golds: 1; matching 4,9,3,8 vs 4,9,2,8: 3;
    # multiple choice {3,2} == {2,3}: 1  -> 5.  variant 2: task 16 [1,3,-1] vs 1,3,5: 2 - 3 + 3 = 2;
    # multiple choice "2,4" vs "2": 0 -> 2.  grade_norm = (5/34 + 2/34) / 2
    answers = {"Э0": "Холодный.", "Э1": "4, 9, 3, 8", "Э2": " 3,2", "Э3": "1,3", "Э4": "2,4"}
    result, _, records = run("darumeru/USE", tokenizer, by_key(answers))
    assert [r["points"] for r in records] == [1, 3, 1, 2, 0]
    assert result.score == pytest.approx(7 / 68)


def test_rucola_accuracy_and_mcc_from_parquet(tokenizer):
    # labels 1 0 1 0, preds 1 1 1 0: acc 3/4; TP 2, FP 1, TN 1, FN 0 -> MCC 2/sqrt(3*2*2*1)
    result, requests, _ = run("russiannlp/rucola_custom", tokenizer,
                              by_key({"Р0.": "1", "Р1.": "1", "Р2.": "1", "Р3.": "0"}), few_shot=2)
    assert result.metrics["acc"] == 0.75
    assert result.metrics["mcc"] == pytest.approx(2 / math.sqrt(12))
    prompt = requests[0].prompt
    # shots train[29], train[30]; train[29] sits next to the test item
    assert prompt.index("номер 30.") < prompt.index("номер 29.") < prompt.index("Р0.")
    assert "номер 28." not in prompt and "Ответ: 1\n\n" in prompt and prompt.endswith("Ответ:")


def test_nlpcoreteam_mmlu_averages_subjects_then_categories(tokenizer):
    # every subject: Q1 gold A, Q2 gold B; the script answers A, but B for Q2 in STEM subjects:
    # STEM subjects 1.0, all others 0.5 -> categories 1, .5, .5, .5 -> 0.625 (plain mean: 37.5/57)
    stem = [s for s, c in SUBJECT_CATEGORY.items() if c == "STEM"]
    assert len(stem) == 18

    def answer(prompt):
        test_question = prompt[prompt.rindex("Q"):]
        return "B" if test_question.startswith("Q2") and test_question.split()[1] in stem else "A"

    for name in ("nlpcoreteam/ruMMLU", "nlpcoreteam/enMMLU"):
        result, requests, _ = run(name, tokenizer, answer, few_shot=2)
        assert len(requests) == 114 and result.score == pytest.approx(0.625)


def test_mmlu_prompt_order_headline_and_budget(tokenizer):
    task = build("nlpcoreteam/ruMMLU", TaskSettings(few_shot=2))
    backend = ScriptedBackend(tokenizer, lambda p: "A")
    _, requests, _ = run_task(task, backend, BASE_FORMAT, FIXTURES, 4000, 8)
    prompt = requests[0].prompt  # abstract_algebra, Q1
    assert prompt == (
        "<s>Ниже приведены вопросы с множественным выбором (с ответами) по абстрактной алгебре.\n\n"
        "Вопрос DEV0 abstract_algebra\nA. α\nB. β\nC. γ\nD. δ\nОтвет: C\n\n"
        "Вопрос DEV1 abstract_algebra\nA. α\nB. β\nC. γ\nD. δ\nОтвет: D\n\n"
        "Вопрос Q1 abstract_algebra\nA. α\nB. β\nC. γ\nD. δ\nОтвет:"
    )
    # a budget that fits one shot only; 0-shot has no headline unless the later variant is asked for
    one_shot = len(prompt.split()) - 10
    _, requests, _ = run_task(task, backend, BASE_FORMAT, FIXTURES, one_shot, 8)
    assert "DEV0" in requests[0].prompt and "DEV1" not in requests[0].prompt
    for headline in (False, True):
        task = build("nlpcoreteam/enMMLU", TaskSettings(few_shot=0, mmlu_zero_shot_headline=headline))
        _, requests, _ = run_task(task, backend, BASE_FORMAT, FIXTURES, 4000, 8)
        assert requests[0].prompt.startswith("<s>The following are multiple choice questions "
                                             "(with answers) about abstract algebra.\n\n") == headline


def test_abstractive_rouge_after_lemmatization(tokenizer):
    # doc 1: "Кошки спят на диване." -> [кошка спать на диван]; pred "Кошка спит" -> [кошка спать]
    #   R1: overlap 2 -> P 1, R 1/2, F 2/3;  R2: 1 of 3 target bigrams -> P 1, R 1/3, F 1/2
    # doc 2: empty prediction -> 0
    result, requests, _ = run("daru/treewayabstractive", tokenizer, by_key({"кошках": "Кошка спит", "Собака лает громко": ""}))
    assert result.metrics["rouge1"] == pytest.approx(1 / 3) and result.metrics["rouge2"] == pytest.approx(1 / 4)
    assert result.metrics["rouge1_recall"] == pytest.approx(1 / 4) and result.metrics["rouge2_recall"] == pytest.approx(1 / 6)
    assert result.score == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert requests[0].prompt.endswith("Третье предложение о диване.\nTL;DR:")
    assert "TL;DR: Пример аннотации.\n\n" in requests[0].prompt
    recall, _, _ = run("daru/treewayabstractive", tokenizer, by_key({"кошках": "Кошка спит", "Собака лает громко": ""}),
                       rouge_measure="recall")
    assert recall.score == pytest.approx((1 / 4 + 1 / 6) / 2)
    plain, _, _ = run("daru/treewayabstractive", tokenizer, by_key({"кошках": "Кошка спит", "Собака лает громко": ""}),
                      rouge_lemmatize=False)
    assert plain.score == 0.0  # "Кошка спит" shares no word form with "Кошки спят на диване"


def test_extractive_r_precision(tokenizer):
    # doc 1 (golds 0, 2): shortest span 3 tokens -> means -1, -0.5, -2 -> top-2 = {1, 0}: 1/2
    # doc 2 (gold 1): shortest 2 tokens -> -3, -2.5 -> top-1 = {1}: 1       -> mean 3/4
    logprobs = {
        "о кошках.": [-1, -1, -1, -5], "Второе предложение.": [-0.5] * 3, "о диване.": [-2] * 5,
        "лает громко.": [-3, -3], "Соседи недовольны.": [-1, -4, -9],
    }

    def answer(prompt):
        return next(v for k, v in logprobs.items() if prompt.endswith(k))

    result, requests, _ = run("daru/treewayextractive", tokenizer, answer)
    assert len(requests) == 5 and result.score == pytest.approx(0.75)
    r = requests[1]
    assert r.prompt[r.span_start:] == "Наиболее важные предложения статьи: Второе предложение."
    assert "Пример статьи" not in r.prompt  # always 0-shot


def test_copy_tasks(tokenizer):
    # cp_sent_ru: exact copy (3 of 3 tokens): len 1, lcs 1; "Кот спит" for "Кот спит на окне."
    # (4 tokens) in 2 tokens: len 1/2, and all 8 generated chars match: lcs 1 with the mid-2024
    # denominator, 8/17 < .99 -> 0 with the reference one; empty output: 0, 0
    answers = {"Мама мыла раму.": "Мама мыла раму.", "Кот спит на окне.": ("Кот спит", 2), "Идёт снег.": ""}
    script = lambda p: next(v for k, v in answers.items() if p.rindex("Текст:") < p.find(k, p.rindex("Текст:")))
    result, _, records = run("darumeru/cp_sent_ru", tokenizer, script)
    assert [r["len"] for r in records] == [1.0, 0.5, 0.0] and [r["lcs"] for r in records] == [1.0, 1.0, 0.0]
    assert result.score == pytest.approx(0.5)  # sentences: len
    later, _, _ = run("darumeru/cp_sent_ru", tokenizer, script, copy_ratio_denominator="reference")
    assert later.metrics["lcs"] == pytest.approx(1 / 3)
    # cp_para_en scores lcs: exact -> 1; "Frence": 30 of 31 chars match -> .968 < .99 -> 0
    answers = {"Paris is the capital of France.": "Paris is the capital of Frence.", "Rome is old.": "Rome is old."}
    result, _, records = run("darumeru/cp_para_en", tokenizer, script)
    assert [r["lcs"] for r in records] == [0.0, 1.0] and result.score == 0.5


def test_copy_reference_gets_a_space_without_sentencepiece_marking(tokenizer):
    _, requests, _ = run("darumeru/cp_sent_en", tokenizer, lambda p: "x", leading_space=False)
    assert requests[0].doc["reference"] == " The cat sat."
    assert requests[0].doc["n_reference"] == 3  # whitespace words in the scripted backend


def test_darumeru_few_shot_order_and_budget(tokenizer):
    task = build("darumeru/RWSD", TaskSettings(few_shot=5))
    _, requests, _ = run_task(task, ScriptedBackend(tokenizer, lambda p: "Да"), BASE_FORMAT, FIXTURES, 4000, 8)
    assert requests[0].prompt == (
        "<s>Текст: Пример фразы\nОтносится ли «он» к «кот»? Ответьте Да или Нет.\nОтвет: Нет\n\n"
        "Текст: Фраза Ф0\nОтносится ли «он» к «кот»? Ответьте Да или Нет.\nОтвет:"
    )
    # a budget below the 1-shot prompt's word count keeps the test item alone
    _, requests, _ = run_task(task, ScriptedBackend(tokenizer, lambda p: "Да"), BASE_FORMAT, FIXTURES, 20, 8)
    assert requests[0].prompt.startswith("<s>Текст: Фраза Ф0")

"""NLPCoreTeam/mmlu_ru: MMLU in Russian (ruMMLU) and English (enMMLU), 57 subjects, test split,
few-shot from dev; accuracy averaged per subject, then per category, then over the 4 categories."""
from pathlib import Path
from typing import Dict, List

from lep_megatron.evaluation import metrics
from lep_megatron.evaluation.data import MMLU_RU, load_split
from lep_megatron.evaluation.prompts import Message, PromptBuilder
from lep_megatron.evaluation.tasks import register
from lep_megatron.evaluation.tasks.base import CHOICE, Request, Task, argmax_choice

# Hendrycks et al.'s categories.py: subject -> subcategory -> category
SUBJECT_SUBCATEGORY = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics",
    "business_ethics": "business", "clinical_knowledge": "health", "college_biology": "biology",
    "college_chemistry": "chemistry", "college_computer_science": "computer science",
    "college_mathematics": "math", "college_medicine": "health", "college_physics": "physics",
    "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering",
    "elementary_mathematics": "math", "formal_logic": "philosophy", "global_facts": "other",
    "high_school_biology": "biology", "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science", "high_school_european_history": "history",
    "high_school_geography": "geography", "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics", "high_school_mathematics": "math",
    "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math",
    "high_school_us_history": "history", "high_school_world_history": "history",
    "human_aging": "health", "human_sexuality": "culture", "international_law": "law",
    "jurisprudence": "law", "logical_fallacies": "philosophy", "machine_learning": "computer science",
    "management": "business", "marketing": "business", "medical_genetics": "health",
    "miscellaneous": "other", "moral_disputes": "philosophy", "moral_scenarios": "philosophy",
    "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics",
    "security_studies": "politics", "sociology": "culture", "us_foreign_policy": "politics",
    "virology": "health", "world_religions": "philosophy",
}
CATEGORY_SUBCATEGORIES = {
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering"],
    "humanities": ["history", "philosophy", "law"],
    "social sciences": ["politics", "culture", "economics", "geography", "psychology"],
    "other (business, health, misc.)": ["other", "business", "health"],
}
SUBJECT_CATEGORY = {
    subject: next(c for c, subs in CATEGORY_SUBCATEGORIES.items() if sub in subs)
    for subject, sub in SUBJECT_SUBCATEGORY.items()
}
# the Russian headline's subject names (dative case), as NLPCoreTeam's prompt uses them
SUBJECT_RU = {
    "abstract_algebra": "абстрактной алгебре", "anatomy": "анатомии", "astronomy": "астрономии",
    "business_ethics": "деловой этике", "clinical_knowledge": "медицинским знаниям",
    "college_biology": "биологии в вузе", "college_chemistry": "химии в вузе",
    "college_computer_science": "компьютерным наукам в вузе",
    "college_mathematics": "математике в вузе", "college_medicine": "медицине в вузе",
    "college_physics": "физике в вузе", "computer_security": "компьютерной безопасности",
    "conceptual_physics": "теоретической физике", "econometrics": "эконометрике",
    "electrical_engineering": "электротехнике", "elementary_mathematics": "элементарной математике",
    "formal_logic": "формальной логике", "global_facts": "фактам о мире",
    "high_school_biology": "биологии в старшей школе", "high_school_chemistry": "химии в старшей школе",
    "high_school_computer_science": "информатике в старшей школе",
    "high_school_european_history": "истории Европы в старшей школе",
    "high_school_geography": "географии в старшей школе",
    "high_school_government_and_politics": "государству и политике в старшей школе",
    "high_school_macroeconomics": "макроэкономике в старшей школе",
    "high_school_mathematics": "математике в старшей школе",
    "high_school_microeconomics": "микроэкономике в старшей школе",
    "high_school_physics": "физике в старшей школе", "high_school_psychology": "психологии в старшей школе",
    "high_school_statistics": "статистике в старшей школе",
    "high_school_us_history": "истории США в старшей школе",
    "high_school_world_history": "всемирной истории в старшей школе",
    "human_aging": "старению человека", "human_sexuality": "человеческой сексуальности",
    "international_law": "международному праву", "jurisprudence": "юриспруденции",
    "logical_fallacies": "логическим ошибкам", "machine_learning": "машинному обучению",
    "management": "менеджменту", "marketing": "маркетингу", "medical_genetics": "медицинской генетике",
    "miscellaneous": "разным темам", "moral_disputes": "нравственным спорам",
    "moral_scenarios": "нравственным сценариям", "nutrition": "правильному питанию",
    "philosophy": "философии", "prehistory": "доисторической эпохе",
    "professional_accounting": "профессиональному бухгалтерскому учету",
    "professional_law": "профессиональному праву", "professional_medicine": "профессиональной медицине",
    "professional_psychology": "профессиональной психологии",
    "public_relations": "связям с общественностью",
    "security_studies": "исследованиям в области безопасности", "sociology": "социологии",
    "us_foreign_policy": "внешней политике США", "virology": "вирусологии",
    "world_religions": "мировым религиям",
}
LETTERS = ("A", "B", "C", "D")
HEADLINE = {
    "ru": "Ниже приведены вопросы с множественным выбором (с ответами) по {}.\n\n",
    "en": "The following are multiple choice questions (with answers) about {}.\n\n",
}
ANSWER_PREFIX = {"ru": "Ответ:", "en": "Answer:"}


def answer_letter(answer) -> str:
    """`answer` is a ClassLabel int in the dataset files, or already a letter."""
    return LETTERS[answer] if isinstance(answer, int) or str(answer).isdigit() else str(answer)


class MMLU(Task):
    method = CHOICE
    choices = LETTERS
    max_new_tokens = 1
    group = "DaruMMLU"
    lang: str

    def block(self, subject: str, record, headline: bool, with_answer: bool) -> List[Message]:
        subject_name = SUBJECT_RU[subject] if self.lang == "ru" else subject.replace("_", " ")
        options = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, record[f"choices_{self.lang}"]))
        user = (HEADLINE[self.lang].format(subject_name) if headline else "") + record[f"question_{self.lang}"] + options
        bot = ANSWER_PREFIX[self.lang] + (f" {answer_letter(record['answer'])}" if with_answer else "")
        return [{"role": "user", "content": user}, {"role": "bot", "content": bot}]

    def assemble(self, subject: str, record, dev: List, builder: PromptBuilder) -> List[Message]:
        """dev[0] (with the headline), dev[1], ..., test: shots join while the prompt fits."""
        test = self.block(subject, record, headline=False, with_answer=False)
        shots: List[Message] = []
        for i, shot in enumerate(dev[:self.settings.few_shot]):
            candidate = shots + self.block(subject, shot, headline=i == 0, with_answer=True)
            if not builder.fits(candidate + test):
                break
            shots = candidate
        if not shots and self.settings.mmlu_zero_shot_headline:
            return self.block(subject, record, headline=True, with_answer=False)
        return shots + test

    def requests(self, data_dir: Path, builder: PromptBuilder) -> List[Request]:
        # the reference caps each subject at max_samples // 57 + 1
        per_subject = None if self.settings.max_samples is None else self.settings.max_samples // len(SUBJECT_RU) + 1
        out = []
        for subject in SUBJECT_RU:
            test = load_split(MMLU_RU, data_dir, subject, "test", self.name)[:per_subject]
            dev = load_split(MMLU_RU, data_dir, subject, "dev", self.name)
            for record in test:
                prompt = builder.render(self.assemble(subject, record, dev, builder))
                out.append(Request(prompt=prompt, doc={"gold": answer_letter(record["answer"]), "subject": subject}))
        return out

    def score(self, doc, probs):
        return {**doc, "pred": argmax_choice(self.choices, probs), "probs": probs}

    def aggregate(self, records) -> Dict[str, float]:
        by_subject: Dict[str, List[bool]] = {}
        for r in records:
            by_subject.setdefault(r["subject"], []).append(r["gold"] == r["pred"])
        by_category: Dict[str, List[float]] = {}
        for subject, correct in by_subject.items():
            by_category.setdefault(SUBJECT_CATEGORY[subject], []).append(metrics.mean(correct))
        return {"acc": metrics.mean(metrics.mean(accs) for accs in by_category.values())}


@register
class RuMMLU(MMLU):
    name, lang = "nlpcoreteam/ruMMLU", "ru"


@register
class EnMMLU(MMLU):
    name, lang = "nlpcoreteam/enMMLU", "en"

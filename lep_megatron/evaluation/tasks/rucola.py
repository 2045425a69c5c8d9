"""RussianNLP/rucola: is a sentence acceptable Russian? Validation split; shots train[29:29+k]."""
from pathlib import Path
from typing import Dict, List

from lep_megatron.evaluation import metrics
from lep_megatron.evaluation.data import RUCOLA, load_split
from lep_megatron.evaluation.prompts import Message, PromptBuilder
from lep_megatron.evaluation.tasks import register
from lep_megatron.evaluation.tasks.base import CHOICE, Request, Task, argmax_choice

INSTRUCTION = (
    "Твоя задача определить приемлемость текста для русского языка с точки зрения синтаксиса, морфологии "
    "и семантики. Ответом должно служить одно число: 0 или 1, где 0 - предложение не приемлемо с точки "
    "зрения русского языка, 1 - приемлемо.\nТекст: {sentence}"
)
SHOTS_START = 29  # the reference's prompt_dataset_start_idx


@register
class RuCoLA(Task):
    name, group = "russiannlp/rucola_custom", "DaruMERA"
    method = CHOICE
    choices = ("0", "1")
    max_new_tokens = 1

    @staticmethod
    def messages(record, with_answer: bool) -> List[Message]:
        bot = "Ответ:" + (f" {record['label']}" if with_answer else "")
        return [{"role": "user", "content": INSTRUCTION.format(sentence=record["sentence"])},
                {"role": "bot", "content": bot}]

    def requests(self, data_dir: Path, builder: PromptBuilder) -> List[Request]:
        test = self.cap(load_split(RUCOLA, data_dir, None, "validation", self.name))
        train = load_split(RUCOLA, data_dir, None, "train", self.name)
        shots = [self.messages(r, True) for r in train[SHOTS_START:SHOTS_START + self.settings.few_shot]]
        return [
            Request(prompt=builder.render(builder.prepend_shots(self.messages(r, False), shots)),
                    doc={"gold": str(r["label"])})
            for r in test
        ]

    def score(self, doc, probs):
        return {"gold": doc["gold"], "pred": argmax_choice(self.choices, probs), "probs": probs}

    def aggregate(self, records) -> Dict[str, float]:
        golds, preds = [r["gold"] for r in records], [r["pred"] for r in records]
        return {"acc": metrics.accuracy(golds, preds), "mcc": metrics.matthews_corrcoef(golds, preds)}

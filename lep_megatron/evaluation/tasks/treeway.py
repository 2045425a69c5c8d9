"""dichspace/daru_treeway_eval (Gazeta news): abstractive summary (ROUGE-1/2) and extractive
ranking of sentences by mean token log-prob (R-precision). First 500 test documents each."""
from collections import defaultdict
from pathlib import Path
from typing import List

from lep_megatron.evaluation import metrics
from lep_megatron.evaluation.data import TREEWAY, load_split
from lep_megatron.evaluation.prompts import Message, PromptBuilder
from lep_megatron.evaluation.tasks import register
from lep_megatron.evaluation.tasks.base import GENERATE, LOGLIK, Request, Task

MAX_DOCUMENTS = 500
ABSTRACTIVE_INSTRUCTION = "Напиши краткую аннотацию на русском языке к следующему тексту.\nТекст: "
EXTRACTIVE_INSTRUCTION = "Твоя задача определить наиболее важные предложения.\nТекст: "
EXTRACTIVE_PREFIX = "Наиболее важные предложения статьи: "


@register
class Abstractive(Task):
    name, group = "daru/treewayabstractive", "DaruSum"
    method = GENERATE
    max_new_tokens = 512

    @staticmethod
    def messages(record, with_answer: bool) -> List[Message]:
        bot = "TL;DR:" + (" " + " ".join(record["summary_sents"]) if with_answer else "")
        return [{"role": "user", "content": ABSTRACTIVE_INSTRUCTION + " ".join(record["src_sents"])},
                {"role": "bot", "content": bot}]

    def requests(self, data_dir: Path, builder: PromptBuilder) -> List[Request]:
        test = self.cap(load_split(TREEWAY, data_dir, None, "test", self.name), MAX_DOCUMENTS)
        prompt_split = load_split(TREEWAY, data_dir, None, "prompt", self.name)
        shots = [self.messages(r, True) for r in prompt_split[:self.settings.few_shot]]
        return [
            Request(prompt=builder.render(builder.prepend_shots(self.messages(r, False), shots)),
                    doc={"summary": " ".join(r["summary_sents"])})
            for r in test
        ]

    def score(self, doc, generation):
        lemmatize = self.settings.rouge_lemmatize
        target = metrics.rouge_tokens(doc["summary"], lemmatize)
        pred = metrics.rouge_tokens(generation.text, lemmatize)
        record = {"pred": generation.text}
        for n in (1, 2):
            _, recall, f = metrics.rouge_n(target, pred, n)
            record[f"rouge{n}"], record[f"rouge{n}_recall"] = f, recall
        return record

    def aggregate(self, records):
        keys = ("rouge1", "rouge2", "rouge1_recall", "rouge2_recall")
        return {k: metrics.mean(r[k] for r in records) for k in keys}

    def leaderboard(self, task_metrics):
        suffix = "" if self.settings.rouge_measure == "f" else "_recall"
        return (task_metrics["rouge1" + suffix] + task_metrics["rouge2" + suffix]) / 2


@register
class Extractive(Task):
    name, group = "daru/treewayextractive", "DaruSum"
    method = LOGLIK

    def requests(self, data_dir: Path, builder: PromptBuilder) -> List[Request]:
        # always 0-shot; the prompt length is not limited
        test = self.cap(load_split(TREEWAY, data_dir, None, "test", self.name), MAX_DOCUMENTS)
        out = []
        for doc_index, record in enumerate(test):
            user = EXTRACTIVE_INSTRUCTION + " ".join(record["src_sents"])
            gold = set(record["extractive_summary"])
            for j, sentence in enumerate(record["src_sents"]):
                bot = EXTRACTIVE_PREFIX + sentence
                prompt = builder.render([{"role": "user", "content": user}, {"role": "bot", "content": bot}])
                out.append(Request(prompt=prompt, doc={"doc": doc_index, "label": j in gold},
                                   span_start=prompt.rindex(bot)))
        return out

    def score(self, doc, logprobs):
        return {**doc, "logprobs": logprobs}

    def aggregate(self, records):
        by_doc = defaultdict(list)
        for r in records:
            by_doc[r["doc"]].append(r)
        values = []
        for sentences in by_doc.values():
            # compare sentences on equally many tokens: the shortest bot message's count
            n = min(len(s["logprobs"]) for s in sentences)
            scores = [metrics.mean(s["logprobs"][:n]) for s in sentences]
            values.append(metrics.r_precision(scores, [s["label"] for s in sentences]))
        return {"r_prec": metrics.mean(values)}

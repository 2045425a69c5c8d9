"""RefalMachine/darumeru tasks: MERA-derived (ruMMLU, MultiQ, PARus, RCB, ruOpenBookQA,
ruWorldTree, RWSD, USE) and the four copy tasks. Records carry their own message templates;
test records end with the bot prefix, prompt-split records with the answer."""
import copy
from pathlib import Path
from typing import Any, Dict, List

from lep_megatron.evaluation import metrics
from lep_megatron.evaluation.data import DARUMERU, load_split
from lep_megatron.evaluation.prompts import PromptBuilder
from lep_megatron.evaluation.tasks import register
from lep_megatron.evaluation.tasks.base import CHOICE, GENERATE, Request, Task, argmax_choice, fill_messages


class DarumeruTask(Task):
    config: str
    """The dataset config (folder) of RefalMachine/darumeru."""
    max_new_tokens = 64

    def load(self, data_dir: Path):
        test = self.cap(load_split(DARUMERU, data_dir, self.config, "test", self.name))
        shots = load_split(DARUMERU, data_dir, self.config, "prompt", self.name)[:self.settings.few_shot]
        return test, shots

    def requests(self, data_dir: Path, builder: PromptBuilder) -> List[Request]:
        test, shots = self.load(data_dir)
        shot_messages = [fill_messages(s) for s in shots]
        return [self.request(record, shot_messages, builder) for record in test]

    def request(self, record, shot_messages, builder: PromptBuilder) -> Request:
        messages = builder.prepend_shots(fill_messages(record), shot_messages)
        return Request(prompt=builder.render(messages), doc=self.doc(record))

    def doc(self, record: Dict[str, Any]) -> Dict[str, Any]:
        return {"gold": record["outputs"]}


class ChoiceTask(DarumeruTask):
    method = CHOICE
    choices = ("A", "B", "C", "D")
    with_f1 = True
    """Score = mean(acc, macro-F1), else acc."""

    def score(self, doc, probs) -> Dict[str, Any]:
        return {"gold": doc["gold"], "pred": argmax_choice(self.choices, probs), "probs": probs}

    def aggregate(self, records) -> Dict[str, float]:
        golds, preds = [r["gold"] for r in records], [r["pred"] for r in records]
        out = {"acc": metrics.accuracy(golds, preds)}
        if self.with_f1:
            out["f1_macro"] = metrics.f1_macro(golds, preds)
        return out


@register
class DaruRuMMLU(ChoiceTask):
    name, group, config = "darumeru/ruMMLU", "DaruMMLU", "rummlu"
    with_f1 = False


@register
class RCB(ChoiceTask):
    name, group, config = "darumeru/RCB", "DaruMERA", "rcb"
    choices = ("1", "2", "3")


@register
class RuOpenBookQA(ChoiceTask):
    name, group, config = "darumeru/ruOpenBookQA", "DaruMERA", "ruopenbookqa"


@register
class RuWorldTree(ChoiceTask):
    name, group, config = "darumeru/ruWorldTree", "DaruMERA", "ruworldtree"


@register
class RWSD(ChoiceTask):
    name, group, config = "darumeru/RWSD", "DaruMERA", "rwsd"
    choices = ("Да", "Нет")
    with_f1 = False

    def aggregate(self, records) -> Dict[str, float]:
        return {"acc": metrics.mean(r["gold"].startswith(r["pred"]) for r in records)}


@register
class PARus(ChoiceTask):
    """Each item is asked as given and with its two options swapped; right only if both are."""

    name, group, config = "darumeru/PARus", "DaruMERA", "parus"
    choices = ("1", "2")

    def requests(self, data_dir: Path, builder: PromptBuilder) -> List[Request]:
        test, shots = self.load(data_dir)
        shot_messages = [fill_messages(s) for s in shots]  # shots are not reversed
        out = []
        for record in test:
            out.append(self.request(record, shot_messages, builder))
            out.append(self.request(swap_options(record), shot_messages, builder))
        return out

    def doc(self, record):
        return {"gold": record["outputs"], "id": record["meta"]["id"]}

    def score(self, doc, probs):
        return {**super().score(doc, probs), "id": doc["id"]}

    def aggregate(self, records) -> Dict[str, float]:
        correct = [r["gold"] == r["pred"] for r in records]
        return {"acc": metrics.both_orders_accuracy([r["id"] for r in records], correct)}


def swap_options(record: Dict[str, Any]) -> Dict[str, Any]:
    record = copy.deepcopy(record)
    inputs = record["inputs"]
    inputs["choice1"], inputs["choice2"] = inputs["choice2"], inputs["choice1"]
    record["outputs"] = "1" if record["outputs"] == "2" else "2"
    return record


@register
class MultiQ(DarumeruTask):
    name, group, config = "darumeru/MultiQ", "DaruMERA", "multiq"
    method = GENERATE

    def doc(self, record):
        return {"golds": [o["segment"] for o in record["outputs"]]}

    def score(self, doc, generation):
        pred = generation.text
        return {
            "pred": pred,
            "f1": metrics.best_over_golds(metrics.squad_f1, pred, doc["golds"]),
            "em": metrics.best_over_golds(metrics.squad_exact, pred, doc["golds"]),
        }

    def aggregate(self, records):
        return {"f1": metrics.mean(r["f1"] for r in records), "em": metrics.mean(r["em"] for r in records)}


@register
class USE(DarumeruTask):
    name, group, config = "darumeru/USE", "DaruMERA", "use"
    method = GENERATE

    def doc(self, record):
        meta = record["meta"]
        return {"gold": record["outputs"], "type": meta["type"], "id_task": str(meta["id_task"]),
                "variant": meta["variant"]}

    def score(self, doc, generation):
        pred = generation.text.strip()
        points = metrics.use_points(doc["type"], doc["id_task"], doc["gold"], pred)
        return {"pred": pred, "points": points, "variant": doc["variant"]}

    def aggregate(self, records):
        return {"grade_norm": metrics.use_grade_norm([r["points"] for r in records], [r["variant"] for r in records])}


class CopyTask(DarumeruTask):
    """Repeat the given text: `len` = min(r, 1/r) of token counts, `lcs` = the share of outputs
    whose difflib matched-character ratio is >= 0.99."""

    method = GENERATE
    main_metric: str

    def requests(self, data_dir: Path, builder: PromptBuilder) -> List[Request]:
        requests = super().requests(data_dir, builder)
        for r in requests:
            if not builder.leading_space:  # the generation starts with a space-marked token
                r.doc["reference"] = " " + r.doc["reference"]
            r.doc["n_reference"] = min(builder.count_tokens(r.doc["reference"]), self.max_new_tokens)
        return requests

    def doc(self, record):
        return {"reference": record["inputs"]["text"]}

    def score(self, doc, generation):
        pred, n_pred = generation.ids_text, len(generation.ids)
        if n_pred == 0 or not pred.strip():
            return {"pred": pred, "len": 0.0, "lcs": 0.0, "symbol_per_token": 0.0}
        return {
            "pred": pred,
            "len": metrics.length_ratio(doc["n_reference"], n_pred),
            "lcs": metrics.copy_exact(doc["reference"], pred, self.settings.copy_ratio_denominator),
            "symbol_per_token": len(pred) / (1 + n_pred),  # diagnostic only
        }

    def aggregate(self, records):
        return {k: metrics.mean(r[k] for r in records) for k in ("len", "lcs", "symbol_per_token")}

    def leaderboard(self, task_metrics):
        return task_metrics[self.main_metric]


def _copy_task(subtask: str, lang: str):
    cls = type(f"Copy_{subtask}_{lang}", (CopyTask,), {
        "name": f"darumeru/cp_{subtask}_{lang}", "group": f"DaruCopy-{lang.upper()}",
        "config": f"cp_{subtask}_{lang}", "main_metric": "len" if subtask == "sent" else "lcs",
        "max_new_tokens": 128 if subtask == "sent" else 1024,
    })
    return register(cls)


for _lang in ("en", "ru"):
    for _subtask in ("sent", "para"):
        _copy_task(_subtask, _lang)

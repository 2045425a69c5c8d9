"""The LEP pipeline as a list of steps, each one `lep-megatron <stage> key=value ...` call.

A step is data (stage + hydra overrides + the steps it reads from), so the same list runs
in-process on a laptop, under torchrun on one node, or as SLURM jobs chained by afterok.
Paths are relative to the run directory.
"""
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

from lep_megatron.common.io import UserInputError


def override(key: str, value: Any) -> str:
    """A hydra override whose value survives hydra's grammar (paths, commas, lists)."""
    return f"{key}={hydra_value(value)}"


def hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in ("null", "true", "false") and not _NUMBER.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# strings hydra's override grammar reads unquoted as themselves (paths, names)
_PLAIN = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./+-]*")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class Step:
    """One stage run of the pipeline."""

    name: str
    """Unique within the pipeline; its state file is state/<name>.json."""
    stage: str
    """The `lep-megatron` stage it runs (a key of lep_megatron.cli.STAGES)."""
    overrides: List[str]
    """Hydra overrides of the stage's config (paths relative to the run directory)."""
    output: str
    """What the step writes (relative path); removed before a forced rerun."""
    after: List[str] = field(default_factory=list)
    """Steps whose outputs it reads: a rerun of any of them reruns this one."""
    ranks: int = 1
    """Processes (torchrun on one node; SLURM: nodes x GPUs of the pretrain job)."""
    resumable: bool = False
    """A rerun of an unfinished step continues (pretrain resumes from its checkpoints)."""

    def argv(self) -> List[str]:
        """The stage's command-line arguments after `lep-megatron`."""
        return [self.stage] + self.overrides

    def command(self) -> str:
        return "lep-megatron " + " ".join(shlex.quote(a) for a in self.argv())


# which prompt format each evaluated model is scored with: base models few-shot, instruct chat
BASE_FORMAT, CHAT_FORMAT = "base", "chat_template"


def lep_steps(cfg: Dict[str, Any]) -> List[Step]:
    """tokenizer -> init (averaging; builds the token map T) -> convert -> data -> pretrain ->
    export -> propagate per mode -> eval per model. `cfg` is conf/pipeline.yaml resolved."""
    base, instruct = cfg["base"], cfg["instruct"]
    tok, tp = cfg["tokenizer"], cfg["parallel"]
    heldout = cfg.get("heldout")
    steps = [
        Step("tokenizer", "tokenizer", [
            f"action={tok['action']}", override("original", base), override("corpus", cfg["corpus"]),
            override("out_dir", "tokenizer"), override("new_vocab_size", tok["new_vocab_size"]),
            override("max_sentences", tok["max_sentences"]), "overwrite=true",
        ], output="tokenizer"),
        Step("init", "init", [
            override("base", base), override("tokenizer", "tokenizer"), override("out_dir", "init_hf"),
            override("method", cfg["init"]["method"]), "overwrite=true",
        ], output="init_hf", after=["tokenizer"]),
        Step("convert", "convert", [
            "action=hf-to-mcore", override("in_dir", "init_hf"), override("out_dir", "init_mcore"),
            override("parallel.tp", tp["tp"]), override("parallel.pp", tp["pp"]), "overwrite=true",
        ], output="init_mcore", after=["init"]),
        Step("data", "data", [
            override("tokenizer", "tokenizer"), override("corpus", cfg["corpus"]), override("out_dir", "data"),
            override("valid_fraction", cfg["data"]["valid_fraction"]), "overwrite=true",
        ], output="data", after=["tokenizer"]),
        Step("pretrain", "pretrain", [
            override("checkpoint", "init_mcore"), override("out_dir", "pretrain"), override("data.dir", "data"),
            override("parallel.tp", tp["tp"]), override("parallel.pp", tp["pp"]),
        ] + [override(f"train.{k}", v) for k, v in cfg["pretrain"]["train"].items()],
            output="pretrain", after=["convert", "data"], ranks=cfg["pretrain"]["ranks"], resumable=True),
        Step("export", "convert", [
            "action=mcore-to-hf", override("in_dir", "pretrain"), override("out_dir", "donor_hf"), "overwrite=true",
        ], output="donor_hf", after=["pretrain"]),
    ]
    if heldout:
        steps.insert(1, Step("tokenizer_report", "tokenizer", [
            "action=report", override("tokenizer", [base, "tokenizer"]), override("corpus", heldout),
            override("out", "tokenizer_report.json"),
        ], output="tokenizer_report.json", after=["tokenizer"]))
    models = {"base": (base, BASE_FORMAT, []), "instruct": (instruct, CHAT_FORMAT, []),
              "adapted_base": ("donor_hf", BASE_FORMAT, ["export"])}
    for mode in cfg["propagate"]["modes"]:
        steps.append(Step(f"propagate_{mode}", "propagate", [
            override("base", base), override("instruct", instruct), override("donor", "donor_hf"),
            override("mode", mode), override("solver", cfg["propagate"]["solver"]),
            override("token_map", "init_hf/token_map.safetensors"), override("out_dir", f"lep_{mode}"),
            "overwrite=true",
        ], output=f"lep_{mode}", after=["export", "init"]))
        models[f"lep_{mode}"] = (f"lep_{mode}", CHAT_FORMAT, [f"propagate_{mode}"])
    if cfg.get("calibration", {}).get("mode"):
        steps += calibration_steps(cfg, models)
    steps += eval_steps(cfg["eval"], models, heldout)
    return steps


def calibration_steps(cfg: Dict[str, Any], models: Dict[str, tuple]) -> List[Step]:
    """The paper's optional self-calibration of one LEP model: the original instruct model answers
    the prompts, plus copy examples from the corpus (calibrate-data) -> sft-data with the LEP
    model's tokenizer -> convert -> pretrain finetune=calibration (LoRA on the first and last
    layers, embeddings and head) -> export, evaluated as lep_<mode>_calibrated."""
    cal, tp = cfg["calibration"], cfg["parallel"]
    mode = cal["mode"]
    if mode not in cfg["propagate"]["modes"]:
        raise UserInputError(f"calibration.mode={mode}: not among propagate.modes={list(cfg['propagate']['modes'])}; "
                             "calibrate a mode the pipeline propagates")
    lep_model, out = f"lep_{mode}", f"lep_{mode}_calibrated"
    steps = [
        Step("calibrate_data", "calibrate-data", [
            override("model", cfg["instruct"]), override("out", "calibration/chats.jsonl"),
            override("prompts", list(cal["prompts"]) or None), override("max_new_tokens", cal["max_new_tokens"]),
            override("keep_unfinished", cal["keep_unfinished"]),
            override("copy.corpus", (cal["copy_corpus"] or cfg["corpus"].split(",")) if cal["copy_examples"] else None),
            override("copy.examples", cal["copy_examples"]), "overwrite=true",
        ], output="calibration/chats.jsonl"),
        Step("calibration_data", "sft-data", [
            override("tokenizer", lep_model), override("files", ["calibration/chats.jsonl"]),
            override("out_dir", "calibration/sft"), override("max_length", cal["max_length"]), "overwrite=true",
        ], output="calibration/sft", after=["calibrate_data", f"propagate_{mode}"]),
        Step("calibration_convert", "convert", [
            "action=hf-to-mcore", override("in_dir", lep_model), override("out_dir", "calibration/mcore"),
            override("parallel.tp", tp["tp"]), override("parallel.pp", tp["pp"]), "overwrite=true",
        ], output="calibration/mcore", after=[f"propagate_{mode}"]),
        Step("calibrate", "pretrain", [
            "finetune=calibration", override("checkpoint", "calibration/mcore"), override("out_dir", "calibration/run"),
            override("data.dir", "calibration/sft"), override("parallel.tp", tp["tp"]), override("parallel.pp", tp["pp"]),
        ] + [override(f"train.{k}", v) for k, v in cal["train"].items()],
            output="calibration/run", after=["calibration_data", "calibration_convert"], ranks=cfg["pretrain"]["ranks"],
            resumable=True),
        Step("calibration_export", "convert", [
            "action=mcore-to-hf", override("in_dir", "calibration/run"), override("out_dir", out), "overwrite=true",
        ], output=out, after=["calibrate"]),
    ]
    models[out] = (out, CHAT_FORMAT, ["calibration_export"])
    return steps


def eval_steps(ev: Dict[str, Any], models: Dict[str, tuple], heldout) -> List[Step]:
    """One `eval` per model: the Darumeru tasks (when eval.data_dir is set) and the per-character
    perplexity of the held-out text."""
    steps = []
    tasks = list(ev["tasks"]) if ev.get("data_dir") else []
    if not tasks and not heldout:
        return steps
    for name, (model, fmt, after) in models.items():
        steps.append(Step(f"eval_{name}", "eval", [
            override("model", model), override("out", f"eval/{name}"), override("prompt_format", fmt),
            override("data_dir", ev.get("data_dir") or "."), override("tasks", tasks),
            override("max_samples", ev["max_samples"]), override("batch_size", ev["batch_size"]),
            override("dtype", ev["dtype"]), override("perplexity_text", heldout),
            override("perplexity_lines", ev["perplexity_lines"]), "overwrite=true",
        ], output=f"eval/{name}", after=list(after)))
    return steps


def check_unique(steps: Sequence[Step]) -> None:
    names = [s.name for s in steps]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"pipeline steps must be unique, repeated: {dupes}")
    known = set()
    for s in steps:
        missing = [a for a in s.after if a not in known]
        if missing:
            raise ValueError(f"step {s.name} reads {missing}, which do not run before it")
        known.add(s.name)

"""`lep-megatron demo` (make demo): the whole LEP method on a laptop, on an embedded default.

No pretrained weights ship in any package, so the demo first makes its own pair of models with
the same stages a cluster run uses: a tiny Llama-style base with the real Mistral tokenizer,
pre-trained (all parameters) on English + Russian text from Debian packages, and an "instruct"
variant of it (ChatML tokens added) fine-tuned to repeat a text. Then the LEP pipeline adapts
the base to a Russian-extended vocabulary (embedding-only training on megatron-core), propagates
the learned embeddings into the instruct model by swap / overlap / conversion, and compares all
models on held-out Russian text (per-character perplexity) and a Russian copy task.

Every step is a `lep-megatron <stage>` call recorded in run_dir/state, so a rerun skips what
finished and resumes a killed training. The demo's own preparation steps are this stage's
actions (corpus, base_model, instruct_model, eval_data).
"""
import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf

from lep_megatron.common.app import stage_app
from lep_megatron.common.io import UserInputError, atomic_dir
from lep_megatron.pipeline.report import write_report
from lep_megatron.pipeline.runner import run_pipeline
from lep_megatron.pipeline.steps import Step, lep_steps, override

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# the Darumeru copy task's own instruction (RefalMachine/darumeru cp_sent_ru)
COPY_PROMPT = "Скопируйте текст без изменений.\nТекст: {text}"
COPY_ANSWER = "Копия:"
COPY_TASK = "darumeru/cp_sent_ru"
CALIBRATION_PROMPTS = "calibration_prompts.jsonl"


def train_overrides(train: Dict[str, Any]) -> List[str]:
    return [override(f"train.{k}", v) for k, v in train.items()]


def full_training(name: str, init_hf: str, init_step: str, data: str, train: Dict[str, Any]) -> List[Step]:
    """HF -> Megatron, all parameters trained on `data`, -> HF dir `name`."""
    return [
        Step(f"{name}_convert", "convert", ["action=hf-to-mcore", override("in_dir", init_hf),
                                            override("out_dir", f"{init_hf}_mcore"), "overwrite=true"],
             output=f"{init_hf}_mcore", after=[init_step]),
        Step(f"{name}_pretrain", "pretrain", [
            override("checkpoint", f"{init_hf}_mcore"), override("out_dir", f"{name}_pretrain"),
            override("data.dir", data), "train.trainable=full"] + train_overrides(train),
            output=f"{name}_pretrain", after=[f"{name}_convert", data], resumable=True),
        Step(f"{name}_export", "convert", ["action=mcore-to-hf", override("in_dir", f"{name}_pretrain"),
                                           override("out_dir", name), "overwrite=true"],
             output=name, after=[f"{name}_pretrain"]),
    ]


def demo_steps(cfg: Dict[str, Any]) -> List[Step]:
    """The preparation of the demo's base and instruct models, then the LEP pipeline."""
    model, corpus = cfg["model"], cfg["corpus"]
    steps = []
    for lang in ("ru", "en"):
        steps.append(Step(f"corpus_{lang}", "demo", [
            "action=corpus", override("language", lang), override("out", f"corpus_{lang}"),
            override("corpus.max_mb_per_source", corpus["max_mb_per_source"])], output=f"corpus_{lang}"))
    steps += [
        Step("base_model", "demo", ["action=base_model", override("out", "base_random")] +
             [override(f"model.{k}", v) for k, v in model.items()], output="base_random"),
        Step("base_data", "data", [
            override("tokenizer", "base_random"), override("out_dir", "base_data"), override("valid_fraction", 0.01),
            "corpora={ru:{files:[corpus_ru/train.txt],weight:0.5},en:{files:[corpus_en/train.txt],weight:0.5}}",
            "overwrite=true"], output="base_data", after=["corpus_ru", "corpus_en", "base_model"]),
    ]
    steps += full_training("base", "base_random", "base_model", "base_data", cfg["base_train"])
    steps += [
        Step("instruct_model", "demo", ["action=instruct_model", override("base", "base"),
                                        override("out", "instruct_init"), override("corpus_dirs", ["corpus_ru", "corpus_en"]),
                                        override("instruct_examples", cfg["instruct_examples"])],
             output="instruct_init", after=["base_export", "corpus_ru", "corpus_en"]),
        Step("instruct_data", "data", [
            override("tokenizer", "instruct_init"), override("corpus", "instruct_init/copy_chats.jsonl"),
            override("out_dir", "instruct_data"), override("valid_fraction", 0.0), "overwrite=true"],
            output="instruct_data", after=["instruct_model"]),
    ]
    steps += full_training("instruct", "instruct_init", "instruct_model", "instruct_data", cfg["instruct_train"])
    steps += [
        Step("eval_data", "demo", ["action=eval_data", override("corpus_dirs", ["corpus_ru"]),
                                   override("out", "eval_data"), override("eval_items", cfg["eval_items"])],
             output="eval_data", after=["corpus_ru"]),
    ]
    lep = dict(cfg["lep"], base="base", instruct="instruct", corpus="corpus_ru/train.txt",
               heldout="corpus_ru/heldout.txt", parallel={"tp": 1, "pp": 1})
    lep["eval"] = dict(lep["eval"], data_dir="eval_data", tasks=[COPY_TASK])
    if lep["calibration"]["mode"]:
        # self-calibration as the paper: the instruct model's own answers to copy requests
        steps.append(Step("calibration_prompts", "demo", [
            "action=calibration_prompts", override("corpus_dirs", ["corpus_ru"]), override("out", CALIBRATION_PROMPTS),
            override("calibration_prompts", cfg["calibration_prompts"])], output=CALIBRATION_PROMPTS,
            after=["corpus_ru"]))
        lep["calibration"] = dict(lep["calibration"], prompts=[CALIBRATION_PROMPTS])
    for step in lep_steps(lep):
        # the LEP part reads the models the preparation made
        extra = {"tokenizer": ["corpus_ru"], "init": ["base_export"], "data": ["corpus_ru"],
                 "propagate": ["instruct_export"], "eval": ["eval_data"],
                 "calibrate_data": ["calibration_prompts", "instruct_export"]}
        key = next((k for k in extra if step.name == k or step.name.startswith(k + "_")), None)
        if key:
            step.after = sorted(set(step.after) | set(extra[key]))
        steps.append(step)
    return steps


# --- the demo's own preparation actions ------------------------------------------------------

def make_corpus(language: str, out: Path, max_mb: float) -> None:
    from lep_megatron.data.debian_corpus import SOURCES_BY_LANGUAGE, build_corpus

    manifest = build_corpus(out, SOURCES_BY_LANGUAGE[language], max_bytes_per_source=int(max_mb * 1e6),
                            overwrite=True)
    print(f"corpus {language}: train {manifest['train_bytes'] / 1e6:.2f} MB, held-out {manifest['heldout_bytes'] / 1e6:.2f} MB")


def make_base_model(out: Path, model: Dict[str, int]) -> None:
    """A Llama-style model at transformers' own initialisation + the real Mistral tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lep_megatron.tokenizer.originals import materialize

    with atomic_dir(out, overwrite=True) as tmp:
        materialize("mistral-7b", tmp / "tokenizer", overwrite=True)
        config = LlamaConfig(
            vocab_size=32000, hidden_size=model["hidden"], intermediate_size=model["ffn"],
            num_hidden_layers=model["layers"], num_attention_heads=model["heads"],
            num_key_value_heads=model["kv_heads"], max_position_embeddings=model["max_positions"],
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp))
        for f in (tmp / "tokenizer").iterdir():
            f.rename(tmp / f.name)
        (tmp / "tokenizer").rmdir()
    print(f"base model: {model} with the Mistral tokenizer -> {out}")


def read_lines(corpus_dir: Path, split: str, max_chars: int) -> List[str]:
    text = (Path(corpus_dir) / f"{split}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if len(line) <= max_chars]


def make_instruct_model(base: Path, out: Path, corpus_dirs: List[str], examples: int) -> None:
    """The base + ChatML tokens (rows: the mean row) + a chat template, and a JSONL of copy
    dialogues rendered with that template (its fine-tuning data)."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    from lep_megatron.checkpoint.hf_io import copy_side_files
    from lep_megatron.tokenizer import vocab as V

    base = Path(base)
    with atomic_dir(out, overwrite=True) as tmp:
        tensors = {}
        for shard in sorted(base.glob("*.safetensors")):
            tensors.update(load_file(str(shard)))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = tensors[name]
            tensors[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(len(CHAT_TOKENS), -1)]).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((base / "config.json").read_text())
        old_vocab = config["vocab_size"]
        im_end = old_vocab + 1
        (tmp / "config.json").write_text(json.dumps(dict(config, vocab_size=old_vocab + len(CHAT_TOKENS),
                                                         eos_token_id=im_end), indent=2))
        copy_side_files(base, tmp, ["tokenizer.model"])
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, im_end]}))
        tok = Tokenizer.from_file(str(base / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
        spec = json.loads(tok.to_str())
        V.save_tokenizer_dir(tmp, spec, V.tokenizer_config(spec, "<s>", CHAT_TOKENS[1], "<unk>", chat_template=CHATML))
        chat = AutoTokenizer.from_pretrained(str(tmp))
        lines = [line for d in corpus_dirs for line in read_lines(Path(d), "train", 200)]
        random.Random(0).shuffle(lines)
        with open(tmp / "copy_chats.jsonl", "w", encoding="utf-8") as f:
            for line in lines[:examples]:
                messages = [{"role": "user", "content": COPY_PROMPT.format(text=line)},
                            {"role": "assistant", "content": f"{COPY_ANSWER} {line}"}]
                f.write(json.dumps({"text": chat.apply_chat_template(messages, tokenize=False)}, ensure_ascii=False) + "\n")
    print(f"instruct model: base + {list(CHAT_TOKENS)} + chat template, {min(examples, len(lines))} copy dialogues -> {out}")


def make_eval_data(corpus_dirs: List[str], out: Path, items: int) -> None:
    """cp_sent_ru in the public dataset's layout: held-out sentences as the test split, training
    sentences as the few-shot prompts."""
    def record(text, i, answer):
        return {"messages": [{"role": "user", "content": COPY_PROMPT}, {"role": "bot", "content": answer}],
                "inputs": {"text": text}, "outputs": text, "meta": {"id": i}}

    corpus = Path(corpus_dirs[0])
    test = read_lines(corpus, "heldout", 120)[:items]
    shots = read_lines(corpus, "train", 120)[:5]
    if not test:
        raise UserInputError(f"{corpus}/heldout.txt has no line of <= 120 characters for the copy task")
    with atomic_dir(out, overwrite=True) as tmp:
        folder = tmp / "RefalMachine" / "darumeru" / "data" / "cp_sent_ru"
        folder.mkdir(parents=True)
        for name, rows in (("test", [record(t, i, COPY_ANSWER) for i, t in enumerate(test)]),
                           ("prompt", [record(t, 1000 + i, f"{COPY_ANSWER} {t}") for i, t in enumerate(shots)])):
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                  encoding="utf-8")
    print(f"eval data: {len(test)} copy items -> {out}")


def make_calibration_prompts(corpus_dirs: List[str], out: Path, count: int) -> None:
    """Copy requests over training sentences (from the end of the corpus: other lines than the
    instruct model's dialogues, which the seed-0 shuffle draws from everywhere, mostly)."""
    lines = read_lines(Path(corpus_dirs[0]), "train", 120)[::-1][:count]
    if not lines:
        raise UserInputError(f"{corpus_dirs[0]}/train.txt has no line of <= 120 characters for copy requests")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": COPY_PROMPT.format(text=t)}, ensure_ascii=False) + "\n"
                           for t in lines), encoding="utf-8")
    os.replace(tmp, out)
    print(f"calibration prompts: {len(lines)} copy requests -> {out}")


def run(cfg: Dict[str, Any]) -> None:
    action = cfg["action"]
    if action == "corpus":
        make_corpus(cfg["language"], Path(cfg["out"]), cfg["corpus"]["max_mb_per_source"])
    elif action == "base_model":
        make_base_model(Path(cfg["out"]), cfg["model"])
    elif action == "instruct_model":
        make_instruct_model(Path(cfg["base"]), Path(cfg["out"]), cfg["corpus_dirs"], cfg["instruct_examples"])
    elif action == "eval_data":
        make_eval_data(cfg["corpus_dirs"], Path(cfg["out"]), cfg["eval_items"])
    elif action == "calibration_prompts":
        make_calibration_prompts(cfg["corpus_dirs"], Path(cfg["out"]), cfg["calibration_prompts"])
    elif action == "run":
        run_dir = Path(cfg["run_dir"]).absolute()
        run_pipeline(demo_steps(cfg), run_dir, cfg, {}, force=cfg["force"])
        table = write_report(run_dir)
        print(f"\n{table}\n\nreport: {run_dir / 'report.md'}")
    else:
        raise UserInputError(f"action={action!r}: choose run (or one of its steps: corpus, base_model, "
                             "instruct_model, eval_data, calibration_prompts)")


@stage_app("demo")
def main(cfg) -> None:
    run(OmegaConf.to_container(cfg, resolve=True))

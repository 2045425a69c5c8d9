"""Post-LEP self-calibration end to end at CI size, each stage run as its command runs (the
stage's hydra config composed from conf/, in this process): the original instruct model answers
prompts + copy examples from Russian text (`calibrate-data`) -> `sft-data` with the LEP model's
tokenizer -> `pretrain finetune=calibration` (the paper's group; train.epochs sets the steps) ->
`convert mcore-to-hf` (LoRA merged) -> `eval` (copy task + per-character perplexity) before and
after. The frozen body comes back bit-identical but for the two adapted layers, the loss falls and
the figures are finite. That the merged export gives megatron's logits with the adapters is
tests/training/test_lora.py's test_hf_export_merged_and_peft_equal_megatron."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from lep_megatron.common.io import UserInputError
from lep_megatron.models.tiny import make_hf_model
from lep_megatron.pipeline.runner import run_in_process
from lep_megatron.pipeline.steps import Step, override
from tests.training.test_sft_data import chat_tokenizer

pytestmark = pytest.mark.megatron
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
PROMPTS = ["Привет, как дела?", "Назови столицу России.", "Сколько будет два плюс два?", "Что такое LoRA?",
           "Расскажи о погоде.", "Как тебя зовут?", "Переведи: hello.", "Назови три цвета."]


def pretrain_config(*overrides):
    with initialize_config_module("lep_megatron.conf", version_base=None):
        return compose(config_name="pretrain", overrides=["out_dir=run", *overrides])


def test_finetune_groups_mirror_the_paper():
    calib = pretrain_config("finetune=calibration")
    assert (calib.data.kind, calib.train.trainable, calib.train.lr, calib.train.weight_decay,
            calib.train.global_batch_size, calib.train.epochs) == ("sft", "calibration", 2.5e-5, 0.1, 64, 1)
    sft = pretrain_config("finetune=sft", "model=llama3_8b")  # the group wins over model='s lr
    assert (sft.data.kind, sft.train.trainable, sft.train.lr, sft.train.weight_decay,
            sft.train.global_batch_size) == ("sft", "sft", 5e-5, 0.05, 128)
    assert pretrain_config("finetune=calibration", "train.lr=1e-3").train.lr == 1e-3  # the command line wins
    plain = pretrain_config()
    assert (plain.train.trainable, plain.train.epochs, plain.data.kind) == ("embeddings_only", None, "indexed")


def test_epochs_need_sft_data_and_room_for_warmup(tmp_path):
    from lep_megatron.training.app import epoch_steps

    (tmp_path / "sft.json").write_text(json.dumps({"format_version": "1", "conversations": 100}))
    cfg = pretrain_config("finetune=calibration", f"data.dir={tmp_path}")
    assert epoch_steps(cfg, 1, 64, 1) == 2 and epoch_steps(cfg, 2.5, 8, 10) == 32
    with pytest.raises(UserInputError, match="train.warmup_steps=10 must be below the 2 steps of train.epochs=1"):
        epoch_steps(cfg, 1, 64, 10)
    with pytest.raises(UserInputError, match="epochs count conversations of data.kind=sft"):
        epoch_steps(pretrain_config(), 1, 64, 10)


def stage(name: str, **keys):
    run_in_process(Step(name, name, [override(k.replace("__", "."), v) for k, v in keys.items()], output=""))


def make_models(d: Path):
    """The original instruct model (tiny Mistral, 3 layers, Mistral tokenizer + ChatML) and a LEP
    stand-in: its body with other embedding and head rows, as `propagate` writes them (LEP itself
    is tested in tests/propagation)."""
    tok = chat_tokenizer(d / "tok", d / "cache")
    make_hf_model(d / "instruct", "mistral", vocab_size=len(AutoTokenizer.from_pretrained(str(tok))), layers=3,
                  tokenizer_dir=tok)
    config = json.loads((d / "instruct" / "config.json").read_text())
    (d / "instruct" / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=512)))
    shutil.copytree(d / "instruct", d / "lep")
    (weights,) = (d / "lep").glob("*.safetensors")
    tensors = load_file(str(weights))
    g = torch.Generator().manual_seed(7)
    for name in (EMBED, HEAD):
        t = tensors[name]
        tensors[name] = t + 0.5 * t.std() * torch.randn(t.shape, generator=g)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return tensors


def scores(report: Path) -> dict:
    r = json.loads((report / "report.json").read_text())
    return {"copy": r["micro_average"], "char_perplexity": r["perplexity"]["char_perplexity"]}


@pytest.mark.primary_only
@pytest.mark.slow
def test_calibration_end_to_end(tmp_path, corpus_dir, capsys):
    from lep_megatron.demo import make_eval_data

    d = tmp_path
    lep = make_models(d)
    lines = (corpus_dir / "train.txt").read_text(encoding="utf-8").splitlines()
    (d / "text").mkdir()
    (d / "text" / "ru.txt").write_text("\n".join(lines[:400]) + "\n", encoding="utf-8")
    (d / "heldout.txt").write_text("\n".join((corpus_dir / "heldout.txt").read_text(encoding="utf-8")
                                             .splitlines()[:20]) + "\n", encoding="utf-8")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "score": i % 4}, ensure_ascii=False) + "\n"
                                             for i, p in enumerate(PROMPTS)), encoding="utf-8")
    make_eval_data([str(corpus_dir)], d / "eval_data", items=4)

    # 1. the original instruct model answers (6 of 8 prompts have score >= 1) + 26 copy examples
    stage("calibrate-data", model=d / "instruct", out=d / "calib.jsonl", prompts=[d / "prompts.jsonl"], min_score=1,
          max_new_tokens=12, keep_unfinished=True, dtype="float32", copy__corpus=[d / "text"], copy__examples=26,
          copy__min_chars=20, copy__max_chars=50)
    chats = [json.loads(line)["messages"] for line in (d / "calib.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(chats) == 32 and all(c[-1]["role"] == "assistant" for c in chats)
    # 2. rendered with the LEP model's tokenizer (its chat template), assistant-only masks
    stage("sft-data", tokenizer=d / "lep", files=[d / "calib.jsonl"], out_dir=d / "sft", max_length=129)
    conversations = json.loads((d / "sft" / "sft.json").read_text())["conversations"]
    assert conversations == 32
    # 3. calibration with the paper's group (LoRA on layers 0 and 2, embeddings + head), 2 epochs;
    # a tiny random model needs a larger lr than the paper's 2.5e-5 to move in a few steps
    stage("convert", action="hf-to-mcore", in_dir=d / "lep", out_dir=d / "mc")
    stage("pretrain", finetune="calibration", checkpoint=d / "mc", out_dir=d / "run", data__dir=d / "sft",
          train__epochs=2, train__seq_length=128, train__global_batch_size=8, train__micro_batch_size=8,
          train__lr=1e-2, train__warmup_steps=1, train__tensorboard=False)
    records = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == math.ceil(2 * conversations / 8)
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    trained = json.loads((d / "run" / "train_config.json").read_text())
    assert (trained["trainable"], trained["weight_decay"], trained["steps"]) == ("calibration", 0.1, len(records))
    # 4. export with the adapters merged: the frozen body is bit-identical but for layers 0 and 2
    stage("convert", action="mcore-to-hf", in_dir=d / "run", out_dir=d / "exported")
    exported = {}
    for f in (d / "exported").glob("*.safetensors"):
        exported.update(load_file(str(f)))
    assert exported.keys() == lep.keys()
    changed = sorted(n for n in lep if not torch.equal(exported[n], lep[n]))
    adapted = [f"model.layers.{i}.{m}.weight" for i in (0, 2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert changed == sorted(adapted + [EMBED, HEAD]), changed
    # 5. eval before (the LEP model) and after (the calibrated export): copy task + perplexity
    for name, model in (("before", d / "lep"), ("after", d / "exported")):
        stage("eval", model=model, data_dir=d / "eval_data", out=d / "eval" / name, tasks=["darumeru/cp_sent_ru"],
              prompt_format="chat_template", perplexity_text=d / "heldout.txt", perplexity_lines=20,
              batch_size=4, dtype="float32")
    before, after = scores(d / "eval" / "before"), scores(d / "eval" / "after")
    assert all(math.isfinite(v) for v in (*before.values(), *after.values())), (before, after)
    with capsys.disabled():
        print(f"\ncalibration e2e: {len(chats)} conversations ({conversations} <= 129 tokens), {len(records)} steps; "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; copy task (cp_sent_ru, 4 items) {before['copy']:.4f} -> "
              f"{after['copy']:.4f}; char perplexity (20 held-out lines) {before['char_perplexity']:.3f} -> "
              f"{after['char_perplexity']:.3f}")

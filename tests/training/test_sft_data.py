"""Chat JSONL -> token ids + assistant-only loss mask, with the real Mistral tokenizer given
ChatML tokens and template: the mask covers exactly the assistant turns (their end-of-turn tokens
included), the `lep-megatron sft-data` stage writes readable indexed datasets, the trainer's
batches pad and align the mask with the labels, bad input stops with a clear error, and the
trainer's loss counts only assistant tokens, normalised over the global batch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer
from transformers import AutoModelForCausalLM

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.megatron_io import resolve_checkpoint
from lep_megatron.common.io import UserInputError
from lep_megatron.common.launch import torchrun
from lep_megatron.data.sft import SFTDataConfig, build_sft_data, load_chat_tokenizer, render, sft_batches
from lep_megatron.models.tiny import make_hf_model
from lep_megatron.tokenizer import originals
from lep_megatron.tokenizer import vocab as V

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SFT_WORKER = Path(__file__).with_name("sft_worker.py")
CHAT = [{"role": "system", "content": "Ты помощник."}, {"role": "user", "content": "Привет, как дела?"},
        {"role": "assistant", "content": "Хорошо, спасибо!"}, {"role": "user", "content": "А у тебя?"},
        {"role": "assistant", "content": "Отлично."}]


def chat_tokenizer(out: Path, cache: Path, template: str = CHATML) -> Path:
    """The real Mistral-7B tokenizer with the two ChatML tokens added and a ChatML template."""
    original = originals.resolve("mistral-7b", cache)
    tok = Tokenizer.from_file(str(original / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    spec = json.loads(tok.to_str())
    out.mkdir(parents=True)
    extra = {"chat_template": template} if template else {}
    V.save_tokenizer_dir(out, spec, V.tokenizer_config(spec, "<s>", "<|im_end|>", "<unk>", **extra))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_tok")
    return chat_tokenizer(d / "tok", d / "cache")


@pytest.fixture(scope="module")
def chat_tok(tokenizer_dir):
    return load_chat_tokenizer(tokenizer_dir)


def test_assistant_only_mask(chat_tok):
    tok = chat_tok
    ids, mask = render(tok, CHAT, "example")
    assert ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)  # the template's own tokens
    # the masked runs cover exactly the two answers with their end-of-turn tokens in the rendered text
    text = tok.apply_chat_template(CHAT, tokenize=False)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    runs, start = [], None
    for (a, b), m, last in zip(offsets, mask, [False] * (len(mask) - 1) + [True]):
        if m and start is None:
            start = a
        if start is not None and (not m or last):
            runs.append(text[start:b if m else a])
            start = None
    assert runs == ["Хорошо, спасибо!<|im_end|>\n", "Отлично.<|im_end|>\n"], runs
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Привет, как дела?" in unmasked and "А у тебя?" in unmasked and "Отлично" not in unmasked
    assert unmasked.count("<|im_start|>") == 5  # every turn's header, the assistants' included


def write_jsonl(path: Path, conversations) -> Path:
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
    return path


def test_sft_data_stage_and_batches(tokenizer_dir, chat_tok, tmp_path):
    short = [{"role": "user", "content": "Скажи да."}, {"role": "assistant", "content": "Да."}]
    long = [{"role": "user", "content": "слово " * 300}, {"role": "assistant", "content": "Нет."}]
    files = write_jsonl(tmp_path / "chats.jsonl", [CHAT, short, long])
    out = tmp_path / "sft"
    proc = subprocess.run([sys.executable, "-m", "lep_megatron", "sft-data", f"tokenizer={tokenizer_dir}",
                           f"files={files}", f"out_dir={out}", "max_length=200"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "sft.json").read_text())
    assert (meta["conversations"], meta["dropped_too_long"]) == (2, 1)
    tok = chat_tok
    expected = [render(tok, c, "") for c in (CHAT, short)]
    assert meta["tokens"] == sum(len(i) for i, _ in expected) and meta["trained_tokens"] == sum(sum(m) for _, m in expected)
    seq, pad = 40, tok.eos_token_id
    # two data-parallel ranks, one conversation each per step; together they hold both conversations
    rows = []
    for rank in (0, 1):
        (batch,) = list(sft_batches(out, 2, 1, seq, pad, rank, 2)(1))
        assert batch["tokens"].shape == (1, seq + 1) and batch["loss_mask"].shape == (1, seq)
        rows.append((batch["tokens"][0], batch["loss_mask"][0]))
    for tokens, loss_mask in rows:
        ids, mask = next((i, m) for i, m in expected if tokens[: len(i)].tolist() == i[: seq + 1])
        n = min(len(ids), seq + 1)
        assert tokens[n:].eq(pad).all()  # padding
        # loss_mask[t] belongs to the label tokens[t + 1]; padding and truncated tails never count
        assert loss_mask.tolist() == (mask[1:n] + [0] * (seq + 1 - n))[:seq]
    assert rows[0][0].tolist() != rows[1][0].tolist()  # the step's global batch holds both conversations


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "вопрос"}], "no assistant message"),
    ([{"role": "user", "content": "вопрос"}, {"role": "bot", "content": "ответ"}], "role 'bot'"),
    ([{"role": "user"}], "message 0 must be"),
    ([], "non-empty list"),
])
def test_bad_conversations(chat_tok, messages, error):
    with pytest.raises(UserInputError, match=error):
        render(chat_tok, messages, "chats.jsonl:2")


def test_bad_line_names_file_and_line(tokenizer_dir, tmp_path):
    files = write_jsonl(tmp_path / "bad.jsonl", [CHAT, [{"role": "user", "content": "вопрос"}]])
    with pytest.raises(UserInputError, match="bad.jsonl:2: no assistant message"):
        build_sft_data(SFTDataConfig(tokenizer=str(tokenizer_dir), out_dir=str(tmp_path / "out"), files=[str(files)]))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_files_and_tokenizer(tokenizer_dir, tmp_path):
    no_template = chat_tokenizer(tmp_path / "plain", tmp_path / "cache", template=None)
    files = write_jsonl(tmp_path / "ok.jsonl", [CHAT])
    with pytest.raises(UserInputError, match="has no chat template"):
        build_sft_data(SFTDataConfig(tokenizer=str(no_template), out_dir=str(tmp_path / "o1"), files=[str(files)]))
    (tmp_path / "broken.jsonl").write_text('{"messages": [\n')
    with pytest.raises(UserInputError, match="broken.jsonl:1: not JSON"):
        build_sft_data(SFTDataConfig(tokenizer=str(tokenizer_dir), out_dir=str(tmp_path / "o2"),
                                     files=[str(tmp_path / "broken.jsonl")]))
    (tmp_path / "other.jsonl").write_text('{"conversation": []}\n')
    with pytest.raises(UserInputError, match="no `messages` field"):
        build_sft_data(SFTDataConfig(tokenizer=str(tokenizer_dir), out_dir=str(tmp_path / "o3"),
                                     files=[str(tmp_path / "other.jsonl")]))


@pytest.mark.megatron
@pytest.mark.slow
def test_trainer_counts_only_assistant_tokens(tokenizer_dir, chat_tok, tmp_path):
    """`sft` on loss-masked batches whose samples count different numbers of tokens: the step
    loss is the mean over the global batch's assistant tokens (transformers reference), and one
    process with 4 or 2 micro-batches and two data-parallel ranks (`lep-megatron pretrain
    data.kind=sft`) follow the same curve (a mean of per-micro-batch means would differ); the
    run's export has learned (transformers)."""

    make_hf_model(tmp_path / "hf", "mistral", vocab_size=len(chat_tok), layers=2, tokenizer_dir=tokenizer_dir)
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc"))
    chats = [CHAT, [{"role": "user", "content": "Да?"}, {"role": "assistant", "content": "Да."}],
             [{"role": "user", "content": "Назови три цвета."}, {"role": "assistant", "content": "Красный, синий и зелёный, а ещё белый."}],
             [{"role": "system", "content": "Отвечай кратко."}, {"role": "user", "content": "Столица России?"},
              {"role": "assistant", "content": "Москва."}]]
    build_sft_data(SFTDataConfig(tokenizer=str(tokenizer_dir), out_dir=str(tmp_path / "sft"),
                                 files=[str(write_jsonl(tmp_path / "c.jsonl", chats))]))
    pad = chat_tok.eos_token_id
    torchrun(1, [SFT_WORKER, tmp_path / "mc", tmp_path / "sft", pad, tmp_path / "one.json", "1,2"])
    # two data-parallel ranks through the stage itself: `pretrain data.kind=sft` (pads with eos)
    torchrun(2, ["-m", "lep_megatron", "pretrain", f"checkpoint={tmp_path / 'mc'}", f"out_dir={tmp_path / 'run'}",
                 "data.kind=sft", f"data.dir={tmp_path / 'sft'}", "train.steps=3", "train.seq_length=48",
                 "train.micro_batch_size=1", "train.global_batch_size=4", "train.lr=1e-2", "train.warmup_steps=1",
                 "train.trainable=sft", "train.lora_rank=4"])
    one = json.loads((tmp_path / "one.json").read_text())
    two = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # reference: step 1's global batch through transformers, cross-entropy averaged over counted tokens
    (batch,) = list(sft_batches(tmp_path / "sft", 4, 4, 48, pad, 0, 1)(1))
    counts = batch["loss_mask"].sum(dim=1)
    assert len(set(counts.tolist())) > 1, counts  # the samples weigh differently
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(batch["tokens"][:, :-1]).logits.double()
    # Megatron's padded vocabulary rows stay out of the softmax: the HF logits are the reference
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
    mask = batch["loss_mask"].double()
    reference = float((per_token * mask).sum() / mask.sum())
    per_sample_mean = float(((per_token * mask).sum(1) / mask.sum(1)).mean())
    assert abs(reference - per_sample_mean) > 1e-3  # the two normalisations differ on this batch
    assert one["1"][0] == pytest.approx(reference, abs=2e-5)
    assert one["1"][-1] < one["1"][0]
    for curve in (one["2"], two):
        assert curve == pytest.approx(one["1"], rel=2e-5)
    # the run's checkpoint exported with the adapters merged: transformers sees the trained model
    run(ConvertConfig("mcore-to-hf", resolve_checkpoint(tmp_path / "run"), tmp_path / "exported"))
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32).eval()
    with torch.no_grad():
        after = trained(batch["tokens"][:, :-1]).logits.double()
    per_token = torch.nn.functional.cross_entropy(after.transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
    assert float((per_token * mask).sum() / mask.sum()) < reference - 0.1

"""`lep-megatron calibrate-data` on a tiny random Mistral with the real Mistral tokenizer + ChatML:
the answers are what transformers' greedy `generate` gives for each prompt rendered by the chat
template (the builder batches with left padding), prompts below min_score are left out, the copy
examples' answers are the very text the user turn asks to repeat, `sft-data` accepts the output,
and each kind of bad input stops with an error naming the file or key, writing nothing."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lep_megatron.common.io import UserInputError
from lep_megatron.data.calibrate import CalibrateDataConfig, CopyConfig, build_calibration_data, passages
from lep_megatron.data.sft import SFTDataConfig, build_sft_data
from lep_megatron.models.tiny import make_hf_model
from tests.training.test_sft_data import chat_tokenizer

NEW_TOKENS = 8
PROMPTS = [  # (item, kept by min_score=3)
    ({"messages": [{"role": "system", "content": "Ты помощник."}, {"role": "user", "content": "Привет, как дела?"}],
      "score": 5}, True),
    ({"prompt": "Назови столицу России.", "score": 2.5}, False),
    ({"prompt": "Сколько будет два плюс два? Ответь одним словом, пожалуйста.", "score": 4}, True),
    ({"messages": [{"role": "user", "content": "Да?"}], "score": 3}, True),
]
TEXT = ["Первая строка текста о погоде.", "Вторая строка: завтра будет дождь.", "",
        "Очень длинная строка " + "слово " * 40, "Коротко.", "Ещё одна строка для копирования."]


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """A tiny random Mistral (2 layers) with the Mistral tokenizer + ChatML tokens and template."""
    d = tmp_path_factory.mktemp("calib")
    tok = chat_tokenizer(d / "tok", d / "cache")
    make_hf_model(d / "instruct", "mistral", vocab_size=len(AutoTokenizer.from_pretrained(str(tok))), layers=2,
                  tokenizer_dir=tok)
    return d / "instruct"


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    return path


def corpus(tmp_path: Path) -> Path:
    (tmp_path / "text" / "sub").mkdir(parents=True)
    (tmp_path / "text" / "a.txt").write_text("\n".join(TEXT[:3]) + "\n", encoding="utf-8")
    (tmp_path / "text" / "sub" / "b.txt").write_text("\n".join(TEXT[3:]) + "\n", encoding="utf-8")
    (tmp_path / "text" / "notes.md").write_text("не текст корпуса\n", encoding="utf-8")  # only *.txt of a directory
    return tmp_path / "text"


def reference_answer(model, tok, messages) -> str:
    """transformers' own greedy generate on the prompt alone (no batch, no padding)."""
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    eos = [tok.eos_token_id, model.generation_config.eos_token_id]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, len(ids):].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
    return tok.decode(new, skip_special_tokens=True).strip()


def test_answers_filter_and_copy_examples(instruct, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [item for item, _ in PROMPTS])
    instruction = "Повтори этот текст:\n{text}"
    cfg = CalibrateDataConfig(model=str(instruct), out=str(tmp_path / "calib.jsonl"), prompts=[str(prompts)],
                              min_score=3, max_new_tokens=NEW_TOKENS, keep_unfinished=True, batch_size=2,
                              dtype="float32", device="cpu",
                              copy=CopyConfig(corpus=[str(corpus(tmp_path))], examples=3, instructions=instruction,
                                              min_chars=20, max_chars=80))
    counts = build_calibration_data(cfg)
    records = [json.loads(line) for line in (tmp_path / "calib.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(list(r) == ["messages"] for r in records)
    kept = [item for item, keep in PROMPTS if keep]
    assert (counts.prompts, counts.below_min_score, counts.answered, counts.copy) == (4, 1, 3, 3)
    answered, copies = records[:3], records[3:]

    # the answers: transformers' greedy continuation of each prompt rendered by the chat template
    model = AutoModelForCausalLM.from_pretrained(str(instruct), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(instruct))
    for item, record in zip(kept, answered):
        prompt = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        assert record["messages"][:-1] == prompt
        assert record["messages"][-1]["role"] == "assistant"
        assert record["messages"][-1]["content"] == reference_answer(model, tok, prompt)
    assert any(r["messages"][-1]["content"] for r in answered)

    # copy examples: the answer is the passage the user turn asks to repeat
    every = list(passages(iter(TEXT), 20, 80))
    assert len(every) > 3  # a sample of them
    for record in copies:
        user, bot = record["messages"]
        assert (user["role"], bot["role"]) == ("user", "assistant")
        assert user["content"] == instruction.replace("{text}", bot["content"])
        assert bot["content"] in every and 20 <= len(bot["content"]) <= 80
    assert len({r["messages"][1]["content"] for r in copies}) == 3

    # sft-data takes the output as it is
    meta = build_sft_data(SFTDataConfig(tokenizer=str(instruct), out_dir=str(tmp_path / "sft"),
                                        files=[str(tmp_path / "calib.jsonl")]))
    assert json.loads((meta / "sft.json").read_text())["conversations"] == 6


def test_passages():
    lines = ["ab", "cd", "x" * 12 + " " + "y" * 12, "ef"]
    # short lines joined by newlines up to min_chars; a long line cut at a space within max_chars
    assert list(passages(iter(lines), 5, 20)) == ["ab\ncd", "x" * 12]


def test_bad_input(instruct, tmp_path):
    out = tmp_path / "out.jsonl"

    def build(prompts, **kw):
        path = write_jsonl(tmp_path / "p.jsonl", prompts)
        return build_calibration_data(CalibrateDataConfig(model=str(instruct), out=str(out), prompts=[str(path)],
                                                          max_new_tokens=2, keep_unfinished=True, **kw))

    with pytest.raises(UserInputError, match="prompts: .*missing.jsonl does not exist.*give the prompt JSONL"):
        build_calibration_data(CalibrateDataConfig(model=str(instruct), out=str(out),
                                                   prompts=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(UserInputError, match=r"p.jsonl:2: neither `messages` .* nor `prompt`"):
        build([{"prompt": "Да?"}, {"question": "Нет?"}])
    with pytest.raises(UserInputError, match=r"p.jsonl:1: message 1 has role 'bot'"):
        build([{"messages": [{"role": "user", "content": "Да?"}, {"role": "bot", "content": "Да."}]}])
    with pytest.raises(UserInputError, match=r"p.jsonl:1: the prompt ends with a 'assistant' message"):
        build([{"messages": [{"role": "user", "content": "Да?"}, {"role": "assistant", "content": "Да."}]}])
    with pytest.raises(UserInputError, match=r"p.jsonl:2: min_score=1 but the item has no numeric `score`"):
        build([{"prompt": "Да?", "score": 2}, {"prompt": "Нет?"}], min_score=1)
    with pytest.raises(UserInputError, match=r"no conversation to write: 2 prompts, 2 below min_score=9"):
        build([{"prompt": "Да?", "score": 2}, {"prompt": "Нет?", "score": 1}], min_score=9)
    plain = tmp_path / "plain"
    shutil.copytree(instruct, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    for f in plain.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(UserInputError, match="model=.*plain has no chat template"):
        build_calibration_data(CalibrateDataConfig(model=str(plain), out=str(out),
                                                   prompts=[str(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Да?"}]))]))
    with pytest.raises(UserInputError, match=r"copy.instructions: .* has no \{text\}"):
        CopyConfig(corpus=["x.txt"], instructions="Повтори.")
    with pytest.raises(UserInputError, match="copy.corpus: the directory .* holds no .txt files"):
        (tmp_path / "empty").mkdir()
        build_calibration_data(CalibrateDataConfig(model=str(instruct), out=str(out),
                                                   copy=CopyConfig(corpus=[str(tmp_path / "empty")])))
    with pytest.raises(UserInputError, match="nothing to make"):
        CalibrateDataConfig(model=str(instruct), out=str(out))
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.tmp-*"))  # nothing half-written
    out.write_text("")
    with pytest.raises(UserInputError, match="out=.* exists; .*overwrite=true"):
        build([{"prompt": "Да?"}])

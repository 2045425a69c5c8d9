"""The Megatron backend against the transformers one: the same tiny Llama (converted with
`convert hf-to-mcore`, vocabulary padded for TP2) scored at TP1 (two data-parallel replicas),
TP2 and PP2 on 2 gloo ranks gives, on every rank, the HF backend's log-probs and greedy ids."""
import json
from pathlib import Path

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.launch import torchrun
from lep_megatron.evaluation.backends.hf import HFBackend
from lep_megatron.models.tiny import make_hf_model
from tests.evaluation.test_hf_backend import PROMPTS

pytestmark = [pytest.mark.megatron, pytest.mark.slow]
WORKER = Path(__file__).with_name("megatron_backend_worker.py")
LAYOUTS = ["1x1", "2x1", "1x2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """(HF dir, Megatron dir) of a tiny Llama over the fixtures' BPE tokenizer (~1000 ids,
    padded to 1024 rows in the Megatron checkpoint)."""
    d = tmp_path_factory.mktemp("megatron_backend")
    tokenizer.save_pretrained(d / "tok")
    make_hf_model(d / "hf", "llama", vocab_size=len(tokenizer), layers=2, tokenizer_dir=d / "tok")
    run(ConvertConfig("hf-to-mcore", d / "hf", d / "mc", tp=2))
    return d / "hf", d / "mc"


def requests(tokenizer) -> dict:
    bot = "Наиболее важные предложения статьи: Кот спит."
    span_texts = [PROMPTS[0] + bot, "<s>" + bot]
    return {
        # lengths differ, down to a single token
        "batch": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] + [[tokenizer.bos_token_id]],
        "prompts": PROMPTS,
        "choices": ["A", "B", "Да", "Нет"],
        "span_texts": span_texts,
        "span_starts": [t.rindex(bot) for t in span_texts],
        "max_new_tokens": 10,
        "eos_ids": [tokenizer.eos_token_id],
        "stop_strings": ["\n"],
    }


def test_megatron_backend_equals_hf_at_tp1_tp2_pp2(models, tokenizer, tmp_path):
    from tests.evaluation.megatron_backend_worker import score

    hf_dir, mc_dir = models
    req = requests(tokenizer)
    (tmp_path / "req.json").write_text(json.dumps(req))
    torchrun(2, [WORKER, mc_dir, tmp_path / "req.json", tmp_path / "out", ",".join(LAYOUTS)])
    want = score(HFBackend.from_pretrained(str(hf_dir), dtype="float32", device="cpu"), req)
    assert any(len(ids) == req["max_new_tokens"] for ids in want["generate_ids"])  # generations are not trivial
    for layout in LAYOUTS:
        for rank in range(2):
            got = json.loads((tmp_path / f"out.{layout}.rank{rank}.json").read_text())
            where = f"{layout} rank {rank}"
            for key in ("next_token_logprobs", "token_logprobs", "span_logprobs"):
                for g, w in zip(got[key], want[key], strict=True):
                    assert g == pytest.approx(w, abs=1e-4), (where, key)
            for g, w in zip(got["choice_probs"], want["choice_probs"], strict=True):
                assert g == pytest.approx(w, rel=1e-4, abs=1e-7), where
            assert got["generate_ids"] == want["generate_ids"], where
            assert got["generate"] == want["generate"], where


def test_eval_app_scores_a_megatron_checkpoint_like_its_hf_source(models, tmp_path):
    """`lep-megatron eval model=<Megatron checkpoint>`, in this process and under torchrun at TP2
    (every rank scores, rank 0 writes), gives the report and predictions of the HF model it was
    converted from."""
    from lep_megatron.evaluation.app import run as run_eval
    from lep_megatron.evaluation.config import EvalConfig
    from tests.evaluation.conftest import FIXTURES

    hf_dir, mc_dir = models
    tasks = ["darumeru/cp_sent_ru", "darumeru/RWSD"]  # a generation and a choice task
    common = dict(data_dir=str(FIXTURES), tasks=tasks, max_samples=2, batch_size=2)
    want = run_eval(EvalConfig(model=str(hf_dir), out=str(tmp_path / "hf"), dtype="float32", device="cpu", **common))
    run_eval(EvalConfig(model=str(mc_dir), out=str(tmp_path / "mc"), **common))
    torchrun(2, ["-m", "lep_megatron", "eval", f"model={mc_dir}", f"out={tmp_path / 'tp2'}", "parallel.tp=2",
                 f"data_dir={FIXTURES}", f"tasks=[{','.join(tasks)}]", "max_samples=2", "batch_size=2"])
    for name in ("mc", "tp2"):
        got = json.loads((tmp_path / name / "report.json").read_text())
        assert got["settings"]["tp"] == (2 if name == "tp2" else 1)
        assert list(got["tasks"]) == list(want["tasks"])
        for task in got["tasks"]:
            assert got["tasks"][task]["metrics"] == pytest.approx(want["tasks"][task]["metrics"]), (name, task)
            file = task.replace("/", "__") + ".jsonl"
            rows = [json.loads(line) for line in (tmp_path / name / "predictions" / file).open()]
            ref = [json.loads(line) for line in (tmp_path / "hf" / "predictions" / file).open()]
            assert [r.get("pred") for r in rows] == [r.get("pred") for r in ref], (name, task)
            assert [r.get("probs", []) for r in rows] == [pytest.approx(r.get("probs", []), rel=1e-4) for r in ref], (name, task)

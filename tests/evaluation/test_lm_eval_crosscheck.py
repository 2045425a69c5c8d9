"""Our multiple-choice log-likelihood scoring against EleutherAI lm-evaluation-harness: lm_eval's
HFLM wraps the same tiny transformers model and scores the same prompts and continuations (the
nlpcoreteam ruMMLU fixture: 114 items of 57 subjects, 5-shot base prompts) through its own
loglikelihood machinery."""
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm_eval is a test dependency (requirements-test.txt)")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from lep_megatron.evaluation.backends.hf import HFBackend
from lep_megatron.evaluation.prompts import BASE_FORMAT
from lep_megatron.evaluation.runner import run_task
from lep_megatron.evaluation.tasks import build
from lep_megatron.evaluation.tasks.base import TaskSettings
from tests.evaluation.conftest import FIXTURES


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama with weights large enough that its answers vary from item to item (at
    the default init every prompt ending in "Ответ:" gets the same answer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=2048))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


def test_choices_and_loglikelihoods_agree_with_lm_eval(model, tokenizer):
    task_name = "nlpcoreteam/ruMMLU"
    task = build(task_name, TaskSettings(few_shot=5))
    _, requests, records = run_task(task, HFBackend(model, tokenizer), BASE_FORMAT, FIXTURES, max_len=4000,
                                    batch_size=8)
    # llmtf's continuation: the choice after a space, directly after a newline-ended prompt
    pairs = [(r.prompt, ("" if r.prompt.endswith("\n") else " ") + c) for r in requests for c in task.choices]
    for context, continuation in pairs:  # one token each: lm_eval's sum is our first-token log-prob
        assert len(tokenizer(context + continuation)["input_ids"]) == len(tokenizer(context)["input_ids"]) + 1
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8)
    answers = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                                for i, pair in enumerate(pairs)], disable_tqdm=True)
    n = len(task.choices)
    theirs = [[ll for ll, _ in answers[i:i + n]] for i in range(0, len(answers), n)]
    ours = [[math.log(p) for p in r["probs"]] for r in records]
    chosen = [task.choices[max(range(n), key=row.__getitem__)] for row in theirs]
    assert chosen == [r["pred"] for r in records]  # the same answer for every item
    assert len(set(chosen)) == 4  # answers vary
    margins = [sorted(row)[-1] - sorted(row)[-2] for row in ours]
    assert min(margins) > 1e-3  # no near-ties: the agreement does not hang on rounding
    worst = max(abs(a - b) for t, o in zip(theirs, ours) for a, b in zip(t, o))
    print(f"{task_name}: {len(records)} items, the same choice on all, max |log-likelihood difference| {worst:.2e}")
    assert worst < 1e-4

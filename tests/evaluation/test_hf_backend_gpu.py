"""The HF backend on a CUDA GPU: batched (padded) scoring equals unpadded direct computation on
the same device and dtype, and fp32 GPU scores equal the CPU ones."""
import copy

import pytest
import torch

from lep_megatron.evaluation.backends.hf import HFBackend
from tests.evaluation.test_hf_backend import PROMPTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOLERANCE = {torch.float32: dict(rel=1e-3, abs=1e-6), torch.bfloat16: dict(rel=5e-2, abs=1e-4)}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def gpu(request, tiny_llama, tokenizer):
    model = copy.deepcopy(tiny_llama).to("cuda", request.param)
    return HFBackend(model, tokenizer), model, request.param


def direct(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0].float().log_softmax(-1).cpu()


def test_choice_probs_and_span_logprobs_on_gpu(gpu, tokenizer, hf_backend):
    backend, model, dtype = gpu
    choices = ["A", "B", "Да", "Нет"]
    got = backend.choice_probs(PROMPTS, choices)
    for prompt, row in zip(PROMPTS, got):
        ids = backend.encode(prompt)
        probs = direct(model, ids)[-1].exp()
        want = [probs[backend.choice_token(prompt, c)[0]].item() for c in choices]
        assert row == pytest.approx(want, **TOLERANCE[dtype])
    texts = [p + " Кот спит." for p in PROMPTS]
    spans = backend.span_logprobs(texts, [len(p) for p in PROMPTS])
    for text, row in zip(texts, spans):
        ids = backend.encode(text)
        lp = direct(model, ids)
        want = [lp[i - 1, ids[i]].item() for i in range(len(ids) - len(row), len(ids))]
        assert row == pytest.approx(want, rel=TOLERANCE[dtype]["rel"], abs=1e-3 if dtype == torch.float32 else 5e-2)
    if dtype == torch.float32:
        cpu = hf_backend.choice_probs(PROMPTS, choices)
        assert sum(got, []) == pytest.approx(sum(cpu, []), rel=1e-3, abs=1e-6)


def test_greedy_generation_on_gpu_matches_cpu(gpu, tokenizer, hf_backend):
    backend, model, dtype = gpu
    if dtype != torch.float32:
        pytest.skip("bf16 argmax may legitimately differ from fp32")
    batch = [backend.encode(p) for p in PROMPTS]
    eos = [tokenizer.eos_token_id]
    assert backend.generate_ids(batch, 16, eos, []) == hf_backend.generate_ids(batch, 16, eos, [])

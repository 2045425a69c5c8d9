"""Per-character perplexity against a float64 recomputation from transformers' logits, including
documents longer than the model's context (cut into windows that each restart after bos)."""
import math

import pytest
import torch

from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.perplexity import char_perplexity, read_lines, windows

TEXTS = ["Москва — столица России.", "The quick brown fox jumps over the lazy dog.", "Ответ: Да"]


def reference_nll(model, bos, ids):
    """-sum log p(ids_i | bos, ids_<i) in float64, one forward per document."""
    with torch.no_grad():
        logits = model(torch.tensor([[bos] + ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    return -float(sum(logprobs[i, t] for i, t in enumerate(ids)))


def test_char_perplexity_matches_float64_reference(hf_backend, tiny_llama, tokenizer):
    result = char_perplexity(hf_backend, TEXTS, batch_size=2)
    bos = tokenizer.bos_token_id
    nll = sum(reference_nll(tiny_llama, bos, tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    chars = sum(len(t) for t in TEXTS)
    assert result["chars"] == chars and result["documents"] == 3
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["char_perplexity"] == pytest.approx(math.exp(nll / chars), rel=1e-5)
    assert result["bits_per_char"] == pytest.approx(nll / chars / math.log(2), rel=1e-5)


def test_long_documents_are_windowed_not_truncated(hf_backend, tiny_llama, tokenizer):
    text = " ".join(TEXTS * 4)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    hf_backend.max_positions, saved = 9, hf_backend.max_positions
    try:
        result = char_perplexity(hf_backend, [text])
    finally:
        hf_backend.max_positions = saved
    cuts = windows(ids, [tokenizer.bos_token_id], 9)
    assert sum(len(w) - 1 for w in cuts) == len(ids) and max(len(w) for w in cuts) == 9
    nll = sum(reference_nll(tiny_llama, w[0], w[1:]) for w in cuts)
    assert result["tokens"] == len(ids) and result["nll"] == pytest.approx(nll, rel=1e-5)


def test_bad_text_file(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        read_lines(tmp_path / "missing.txt", 10)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserInputError, match="no non-empty lines"):
        read_lines(tmp_path / "empty.txt", 10)
    (tmp_path / "t.txt").write_text("a\n\nb\nc\n")
    assert read_lines(tmp_path / "t.txt", 2) == ["a", "b"]

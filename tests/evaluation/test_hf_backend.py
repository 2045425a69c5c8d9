"""The HF backend's three scoring methods against direct transformers computations on a tiny
random Llama with a real (trained here) byte-level BPE tokenizer; batches mix prompt lengths."""
import pytest
import torch

from lep_megatron.evaluation.backends.base import LMBackend, cut_at_stop

PROMPTS = [
    "<s>Вопрос: сколько будет два плюс два?\nA 3\nB 4\nОтвет:",
    "<s>Ответ:",
    "<s>The quick brown fox jumps over the lazy dog. Кот спит.\nОтвет:",
]


def direct_logprobs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_choice_probs_equal_full_vocab_softmax_of_first_choice_token(hf_backend, tiny_llama, tokenizer):
    choices = ["A", "B", "Да", "Нет"]
    got = hf_backend.choice_probs(PROMPTS, choices)
    for prompt, row in zip(PROMPTS, got):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        probs = direct_logprobs(tiny_llama, ids)[-1].exp()
        # byte-level BPE: " A" is one token, the first one after the prompt
        want = [probs[tokenizer(prompt + " " + c, add_special_tokens=False)["input_ids"][len(ids)]].item()
                for c in choices]
        assert row == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert sum(row) < 1  # not renormalised over the choices


def test_choice_after_newline_continues_directly(hf_backend, tokenizer):
    token, space = hf_backend.choice_token("<s>Ответ:\n", "A")
    assert tokenizer.decode([token]) == "A" and not space
    with pytest.raises(ValueError, match="must not end with a space"):
        hf_backend.choice_probs(["<s>Ответ: "], ["A"])


def test_span_logprobs_equal_direct_gather(hf_backend, tiny_llama, tokenizer):
    bot = "Наиболее важные предложения статьи: Кот спит."
    texts = [PROMPTS[0] + bot, PROMPTS[2] + "\n" + bot, "<s>" + bot]
    starts = [t.rindex(bot) for t in texts]
    got = hf_backend.span_logprobs(texts, starts)
    for text, start, row in zip(texts, starts, got):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        first = min(i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > start)
        lp = direct_logprobs(tiny_llama, ids)
        want = [lp[i - 1, ids[i]].item() for i in range(first, len(ids))]
        assert row == pytest.approx(want, abs=1e-4)
    assert len(got[0]) == len(got[1]) == len(got[2])  # the same bot tokens whatever precedes them


def test_greedy_generation_equals_a_direct_argmax_loop(hf_backend, tiny_llama, tokenizer):
    batch = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    got = hf_backend.generate_ids(batch, max_new_tokens=12, eos_ids=[tokenizer.eos_token_id], stop_strings=[])
    for ids, new in zip(batch, got):
        want, seq = [], list(ids)
        for _ in range(12):
            token = int(direct_logprobs(tiny_llama, seq)[-1].argmax())
            want.append(token)
            seq.append(token)
            if token == tokenizer.eos_token_id:
                break
        assert new == want


class FixedGeneration(LMBackend):
    """Returns fixed continuations, to test the shared stop-string / eos handling."""

    def __init__(self, tokenizer, continuations):
        super().__init__(tokenizer, max_positions=4096)
        self.continuations = continuations

    def generate_ids(self, batch, max_new_tokens, eos_ids, stop_strings):
        return [self.encode(c) for c in self.continuations]

    def next_token_logprobs(self, batch):
        raise AssertionError("not used")

    token_logprobs = next_token_logprobs


def test_generation_cut_at_stop_strings_and_eos(tokenizer):
    backend = FixedGeneration(tokenizer, [" Москва\nВопрос", " Кот спит</s> ещё", "A\n\nB"])
    eos, newline = tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert backend.stop_ids(["\n", "\n\n"])[:2] == [eos, newline[0]]
    out = backend.generate(["p", "p", "p"], 16, ["\n", "\n\n"])
    assert [g.text for g in out] == [" Москва", " Кот спит ещё", "A"]  # special tokens skipped, cut at "\n"
    assert [g.ids_text for g in out] == [" Москва", " Кот спит", "A"]  # ids cut at eos / before "\n"
    assert out[0].ids == tokenizer(" Москва", add_special_tokens=False)["input_ids"]
    assert cut_at_stop("a<|im_end|>b\nc", ["\n", "<|im_end|>"]) == "a"


def test_stop_strings_end_generation_early(hf_backend, tokenizer):
    batch = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    free = hf_backend.generate_ids(batch, 24, [tokenizer.eos_token_id], [])
    # stop at whatever text the first row generates as its 3rd token: generation ends there
    stop = tokenizer.decode(free[0][2:3])
    stopped = hf_backend.generate_ids(batch, 24, [tokenizer.eos_token_id], [stop])
    assert stopped[0][:3] == free[0][:3] and len(stopped[0]) <= 3 + 1
    gen = hf_backend.generate([PROMPTS[0]], 24, [stop])[0]
    assert stop not in gen.text and gen.text == cut_at_stop(tokenizer.decode(free[0]), [stop])


def test_left_truncation_at_the_model_context(tiny_llama, tokenizer):
    from lep_megatron.evaluation.backends.hf import HFBackend

    backend = HFBackend(tiny_llama, tokenizer)
    backend.max_positions = 8
    long = "<s>" + "Кот спит на окне. " * 10 + "Ответ:"
    ids = tokenizer(long, add_special_tokens=False)["input_ids"][-8:]
    want = direct_logprobs(tiny_llama, ids)[-1].exp()
    token, _ = backend.choice_token(long, "A")
    assert backend.choice_probs([long], ["A"])[0][0] == pytest.approx(want[token].item(), rel=1e-4)


@pytest.fixture(scope="module")
def sentencepiece_style():
    """Character-level BPE with SentencePiece's "▁" space marking: " A" is two tokens, "▁" + "A"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lep_megatron.evaluation.backends.hf import HFBackend

    chars = ["<s>", "</s>", "▁"] + sorted(set("Ответ:AB1\n"))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(chars), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    return HFBackend(model.eval(), hf), model


def test_sentencepiece_space_token_moves_into_the_prompt(sentencepiece_style):
    backend, model = sentencepiece_style
    assert backend.adds_leading_space
    token, space = backend.choice_token("Ответ:", "A")
    assert space and backend.tokenizer.convert_ids_to_tokens(token) == "A"
    # the probability is read after "Ответ: " (prompt + the bare space token)
    ids = backend.encode("Ответ: ")
    assert backend.tokenizer.convert_ids_to_tokens(ids[-1]) == "▁"
    probs = direct_logprobs(model, ids)[-1].exp()
    a, b = (backend.tokenizer.convert_tokens_to_ids(c) for c in "AB")
    assert backend.choice_probs(["Ответ:"], ["A", "B"])[0] == pytest.approx([probs[a].item(), probs[b].item()], rel=1e-4)

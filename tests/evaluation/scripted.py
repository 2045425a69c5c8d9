"""A backend that answers from a script instead of a model: task tests check the task logic
(loading, prompts, scoring, aggregation) against hand-computed scores."""
from typing import Callable

from lep_megatron.evaluation.backends.base import Generation, LMBackend


class ScriptedBackend(LMBackend):
    """`answer(prompt)` gives: the chosen option (choice tasks), the generated text or a
    (text, n_tokens) pair (generation tasks), or the span log-probs (log-likelihood tasks).
    Token counts are whitespace words, so prompt budgets are easy to reason about."""

    def __init__(self, tokenizer, answer: Callable, leading_space: bool = True):
        super().__init__(tokenizer, max_positions=100_000)
        self.answer, self.leading_space = answer, leading_space
        self.prompts = []

    @property
    def adds_leading_space(self):
        return self.leading_space

    def count_tokens(self, text):
        return len(text.split())

    def choice_probs(self, prompts, choices):
        self.prompts += prompts
        return [[1.0 if c == self.answer(p) else 0.0 for c in choices] for p in prompts]

    def span_logprobs(self, texts, span_starts):
        self.prompts += texts
        return [list(self.answer(t)) for t in texts]

    def generate(self, prompts, max_new_tokens, stop_strings):
        self.prompts += prompts
        out = []
        for p in prompts:
            answer = self.answer(p)
            text, n = answer if isinstance(answer, tuple) else (answer, len(answer.split()))
            out.append(Generation(text=text, ids=list(range(n)), ids_text=text))
        return out

    def next_token_logprobs(self, batch):
        raise AssertionError("scripted backend answers at the text level")

    token_logprobs = generate_ids = next_token_logprobs


def by_key(table: dict, default=None):
    """Answer by the one key of `table` that occurs in the prompt."""
    def answer(prompt):
        hits = [k for k in table if k in prompt]
        if len(hits) != 1:
            if default is not None:
                return default
            raise AssertionError(f"expected one key in the prompt, found {hits}: ...{prompt[-200:]!r}")
        return table[hits[0]]
    return answer

"""The language-model interface every Darumeru task scores through.

A backend implements three token-level calls on batches of token-id lists:

- `next_token_logprobs`: full-vocabulary log-softmax at the last position;
- `token_logprobs`: log p(token_i | tokens_<i) of every token (0 for the first);
- `generate_ids`: greedy (or sampled) continuation, stopping at eos ids / stop strings.

Everything textual (tokenization, choosing the token of each answer option, cutting generations
at stop strings) lives here, shared, so an HF model and a Megatron model inside the trainer
score the same prompts identically; a Megatron backend only supplies the three calls above.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


@dataclass
class Generation:
    text: str
    """The decoded continuation, cut before the first stop string."""
    ids: List[int]
    """The continuation's ids, cut at the first eos id and before the first token containing a
    stop string (llmtf's `return_tokens`): what the copy tasks count."""
    ids_text: str
    """The decode of `ids`: the copy tasks' prediction."""


class LMBackend(ABC):
    """A causal LM plus its (HF) tokenizer."""

    def __init__(self, tokenizer, max_positions: int):
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        """Model context length: prompts longer than this lose their oldest tokens."""

    # --- the three calls a model backend implements -------------------------------------------

    @abstractmethod
    def next_token_logprobs(self, batch: Sequence[List[int]]) -> torch.Tensor:
        """[batch, vocab] float32 log-softmax of the next token after each sequence."""

    @abstractmethod
    def token_logprobs(self, batch: Sequence[List[int]]) -> List[torch.Tensor]:
        """Per sequence, float32 [len]: log p(id_i | ids_<i), with 0 for position 0."""

    @abstractmethod
    def generate_ids(self, batch: Sequence[List[int]], max_new_tokens: int, eos_ids: Sequence[int],
                     stop_strings: Sequence[str]) -> List[List[int]]:
        """New ids per sequence, ending with the first eos id if one was produced; a sequence may
        stop early once its decoded continuation contains a stop string."""

    # --- text-level helpers shared by all backends ---------------------------------------------

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @property
    def bos_text(self) -> str:
        bos = self.tokenizer.bos_token_id
        return "" if bos is None else self.tokenizer.decode([bos])

    @property
    def adds_leading_space(self) -> bool:
        """Whether tokenizing "1" yields a space-marked token (SentencePiece style)."""
        ids = self.encode("1")
        return len(ids) > 1 or len(self.tokenizer.convert_ids_to_tokens(ids[0])) != 1

    def _truncate(self, ids: List[int]) -> List[int]:
        return ids[-self.max_positions:]

    def choice_token(self, prompt: str, choice: str) -> Tuple[int, bool]:
        """(id of the first token of `choice` after `prompt`, whether a bare space token precedes
        it). llmtf: continue with "\\n"-ended prompts directly, others after a space; take the
        first new token whose stripped text is a non-empty prefix of the choice."""
        base = self.encode(prompt)
        sep = "" if prompt.endswith("\n") else " "
        skipped_space = False
        for token in self.encode(prompt + sep + choice)[len(base):]:
            text = self.tokenizer.decode([token]).strip()
            if not text:
                skipped_space = True
            elif choice.startswith(text):
                return token, skipped_space
        raise ValueError(f"no token of choice {choice!r} found after the prompt ...{prompt[-40:]!r}")

    def choice_probs(self, prompts: Sequence[str], choices: Sequence[str]) -> List[List[float]]:
        """Full-vocabulary next-token probability of each choice's first token, per prompt."""
        batch, token_ids = [], []
        for prompt in prompts:
            if prompt.endswith(" "):
                raise ValueError(f"a choice prompt must not end with a space: ...{prompt[-40:]!r}")
            resolved = [self.choice_token(prompt, c) for c in choices]
            spaces = {space for _, space in resolved}
            if len(spaces) > 1:
                raise ValueError(f"choices {list(choices)} disagree on a leading space token")
            # SentencePiece: the choice token follows a bare "▁", so the prompt gets the space
            batch.append(self._truncate(self.encode(prompt + " " if spaces.pop() else prompt)))
            token_ids.append([token for token, _ in resolved])
        logprobs = self.next_token_logprobs(batch)
        index = torch.tensor(token_ids, dtype=torch.long)
        return logprobs.gather(1, index).exp().tolist()

    def span_logprobs(self, texts: Sequence[str], span_starts: Sequence[int]) -> List[List[float]]:
        """Log-probs of the tokens of `text[span_start:]`, from the token holding that character."""
        batch, firsts = [], []
        for text, start in zip(texts, span_starts):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            first = next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > start)
            ids = enc["input_ids"]
            cut = max(0, len(ids) - self.max_positions)
            batch.append(ids[cut:])
            firsts.append(max(first - cut, 0))
        return [lp[first:].tolist() for lp, first in zip(self.token_logprobs(batch), firsts)]

    def stop_ids(self, stop_strings: Sequence[str]) -> List[int]:
        """The tokenizer's eos ids plus every stop string that is a single token."""
        eos = self.tokenizer.eos_token_id
        ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        for s in stop_strings:
            encoded = self.encode(s)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids

    def generate(self, prompts: Sequence[str], max_new_tokens: int,
                 stop_strings: Sequence[str]) -> List[Generation]:
        eos_ids = self.stop_ids(stop_strings)
        batch = [self._truncate(self.encode(p)) for p in prompts]
        outputs = []
        for new_ids in self.generate_ids(batch, max_new_tokens, eos_ids, stop_strings):
            text = cut_at_stop(self.tokenizer.decode(new_ids, skip_special_tokens=True), stop_strings)
            ids = self._cut_ids(new_ids, eos_ids, stop_strings)
            ids_text = self.tokenizer.decode(ids, skip_special_tokens=True)
            outputs.append(Generation(text=text, ids=ids, ids_text=ids_text))
        return outputs

    def _cut_ids(self, ids: List[int], eos_ids: Sequence[int], stop_strings: Sequence[str]) -> List[int]:
        for i, token in enumerate(ids):
            if token in eos_ids:
                ids = ids[:i]
                break
        for i, token in enumerate(ids):
            text = self.tokenizer.decode([token])
            if any(s in text for s in stop_strings):
                return ids[:i]
        return ids


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    positions = [text.find(s) for s in stop_strings if s and s in text]
    return text[:min(positions)] if positions else text

"""A transformers causal LM as a Darumeru backend (CPU or GPU)."""
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.backends.base import LMBackend

# llmtf's generation settings (mid-2024); used when sampling is switched on
REFERENCE_SAMPLING = dict(do_sample=True, temperature=0.1, top_p=0.9, top_k=40, repetition_penalty=1.0)


class StopOnStrings(StoppingCriteria):
    """Marks a row done once the text of its last few new tokens contains a stop string."""

    def __init__(self, tokenizer, prompt_len: int, stop_strings: Sequence[str], tail_tokens: int = 8):
        self.tokenizer, self.prompt_len, self.tail_tokens = tokenizer, prompt_len, tail_tokens
        self.stop_strings = [s for s in stop_strings if s]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.tail_tokens):])
        return torch.tensor([any(s in t for s in self.stop_strings) for t in tails], device=input_ids.device)


class HFBackend(LMBackend):
    def __init__(self, model, tokenizer, sample: bool = False, seed: int = 0):
        super().__init__(tokenizer, max_positions=model.config.max_position_embeddings)
        self.model = model.eval()
        self.sample, self.seed = sample, seed  # sampling: the reference's T=0.1/top-p/top-k, else greedy

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "auto", device: Optional[str] = None,
                        sample: bool = False, seed: int = 0) -> "HFBackend":
        if not Path(path).is_dir():
            raise UserInputError(f"model={path}: not a directory with an HF model (config.json, weights, tokenizer)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
        return cls(model, tokenizer, sample=sample, seed=seed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def _padded(self, batch: Sequence[List[int]], pad: int, left: bool):
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            mask[i, span] = 1
        return input_ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def next_token_logprobs(self, batch: Sequence[List[int]]) -> torch.Tensor:
        # left padding puts every last token at the end, so only one position needs logits
        input_ids, mask = self._padded(batch, self._pad_id(), left=True)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        return logits[:, -1].float().log_softmax(-1).cpu()

    @torch.inference_mode()
    def token_logprobs(self, batch: Sequence[List[int]]) -> List[torch.Tensor]:
        # right padding keeps every real token at its own position
        input_ids, mask = self._padded(batch, self._pad_id(), left=False)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        out = []
        for i, ids in enumerate(batch):
            row = logits[i, :len(ids) - 1].float().log_softmax(-1)  # one row at a time bounds float32 memory
            picked = row.gather(1, input_ids[i, 1:len(ids), None])[:, 0].cpu()
            out.append(torch.cat([torch.zeros(1), picked]))
        return out

    @torch.inference_mode()
    def generate_ids(self, batch: Sequence[List[int]], max_new_tokens: int, eos_ids: Sequence[int],
                     stop_strings: Sequence[str]) -> List[List[int]]:
        # finished rows are filled with an eos id, which the caller cuts at
        pad = eos_ids[0] if eos_ids else self._pad_id()
        input_ids, mask = self._padded(batch, pad, left=True)  # HF derives positions from the mask
        width = input_ids.shape[1]
        settings = REFERENCE_SAMPLING if self.sample else dict(do_sample=False)
        if self.sample:
            torch.manual_seed(self.seed)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=mask,
            max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids) or None, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(self.tokenizer, width, stop_strings)]),
            **settings,
        )
        results = []
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            results.append(row[:end])
        return results

"""A megatron-core GPTModel as a Darumeru backend, at any TP/PP, on gloo/CPU or NCCL/GPU.

Every rank calls the backend with the same prompts and gets the same results: the forward runs
through megatron's forward-only schedule (pipeline stages pass activations point to point), the
last stage turns its vocab-parallel logits into the requested values (gathered or reduced over
the TP group, Megatron's padded vocabulary rows dropped) and broadcasts them over the pipeline
group. Batches are right-padded with positions 0..len-1, so under causal attention a sequence
never sees its padding and needs no mask. Generation is greedy and recomputes the whole prefix
each step (no KV cache): meant for evaluation at train time and for checkpoints of moderate size.
"""
from pathlib import Path
from typing import Callable, List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from lep_megatron.checkpoint.megatron_io import HF_SUBDIR, CheckpointMeta, load_model
from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.backends.base import LMBackend
from lep_megatron.models import build_stage_model
from lep_megatron.models.hf_config import parse_dtype
from lep_megatron.parallel import init_distributed

# the tail of a generation checked for stop strings each step (as the HF backend's StopOnStrings)
STOP_TAIL_TOKENS = 8


class MegatronBackend(LMBackend):
    def __init__(self, model, tokenizer, vocab_size: int, max_positions: int):
        """`model`: this rank's GPTModel stage (or megatron's DDP wrapping it), parallel_state set
        up; `vocab_size`: the true vocabulary (the model's rows beyond it are padding)."""
        super().__init__(tokenizer, max_positions)
        self.model = model
        self.vocab_size = vocab_size

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, tp: int = 1, pp: int = 1, dtype: str = "auto") -> "MegatronBackend":
        """Load a lep-megatron checkpoint (lep_model.json; tokenizer in its hf/ folder) at tp x pp."""
        from transformers import AutoTokenizer

        meta = CheckpointMeta.read(Path(ckpt_dir))
        tokenizer_dir = Path(ckpt_dir) / HF_SUBDIR
        if not (tokenizer_dir / "tokenizer_config.json").is_file():
            raise UserInputError(f"{tokenizer_dir} has no tokenizer (tokenizer_config.json); copy the model's "
                                 "tokenizer files there")
        init_distributed(tp, pp)
        meta.check_tp(tp)
        params_dtype = parse_dtype(meta.dtype if dtype == "auto" else dtype)
        model = build_stage_model(meta.shape, meta.padded_vocab_size, params_dtype).eval()
        load_model(model, Path(ckpt_dir))
        return cls(model, AutoTokenizer.from_pretrained(str(tokenizer_dir)), meta.vocab_size,
                   meta.shape.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, batch: Sequence[List[int]], last_stage: Callable, shape, dtype) -> torch.Tensor:
        """Run `batch` right-padded through the model; `last_stage(logits [b, w, vocab/tp], tokens,
        lengths)` computes a `shape` tensor on the last stage, which every rank receives."""
        lengths = torch.tensor([len(ids) for ids in batch], device=self.device)
        width = int(lengths.max())
        tokens = torch.zeros((len(batch), width), dtype=torch.long, device=self.device)
        for i, ids in enumerate(batch):
            tokens[i, :len(ids)] = torch.tensor(ids)
        positions = torch.arange(width, device=self.device).expand(len(batch), width)
        captured = {}

        def loss_func(logits):
            captured["result"] = last_stage(logits, tokens, lengths)
            return logits.new_zeros(()), {}  # the schedule wants a loss; there is none to reduce

        def forward_step(data_iterator, model):
            return model(next(data_iterator), positions, None), loss_func

        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([tokens]), model=[self.model],
                num_microbatches=1, seq_length=width, micro_batch_size=len(batch), forward_only=True,
            )
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return captured["result"].cpu()
        result = captured.get("result")
        result = torch.empty(shape, dtype=dtype, device=self.device) if result is None else result.contiguous()
        dist.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return result.cpu()

    def _last_logits(self, logits, lengths) -> torch.Tensor:
        """[b, vocab] float32 logits at each sequence's last token, gathered over TP, unpadded."""
        rows = logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1].float()
        return tensor_parallel.gather_from_tensor_model_parallel_region(rows)[:, :self.vocab_size]

    def next_token_logprobs(self, batch: Sequence[List[int]]) -> torch.Tensor:
        def last_stage(logits, tokens, lengths):
            return self._last_logits(logits, lengths).log_softmax(-1)

        return self._forward(batch, last_stage, (len(batch), self.vocab_size), torch.float32)

    def token_logprobs(self, batch: Sequence[List[int]]) -> List[torch.Tensor]:
        def last_stage(logits, tokens, lengths):
            out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
            for i, n in enumerate(lengths.tolist()):  # one row at a time bounds float32 memory
                if n > 1:  # a lone token has nothing to predict it
                    row = logits[i, :n - 1].float()  # padding columns are -inf (models.gpt)
                    out[i, 1:n] = -tensor_parallel.vocab_parallel_cross_entropy(row, tokens[i, 1:n])
            return out

        width = max(len(ids) for ids in batch)
        out = self._forward(batch, last_stage, (len(batch), width), torch.float32)
        return [out[i, :len(ids)] for i, ids in enumerate(batch)]

    def generate_ids(self, batch: Sequence[List[int]], max_new_tokens: int, eos_ids: Sequence[int],
                     stop_strings: Sequence[str]) -> List[List[int]]:
        def last_stage(logits, tokens, lengths):
            return self._last_logits(logits, lengths).argmax(-1)

        stops = [s for s in stop_strings if s]
        sequences = [list(ids) for ids in batch]
        new: List[List[int]] = [[] for _ in batch]
        active = list(range(len(batch)))
        for _ in range(max_new_tokens):
            if not active:
                break
            chosen = self._forward([sequences[i] for i in active], last_stage, (len(active),), torch.long)
            still = []
            for i, token in zip(active, chosen.tolist()):
                sequences[i].append(token)
                new[i].append(token)
                tail = self.tokenizer.decode(new[i][-STOP_TAIL_TOKENS:])
                if token not in eos_ids and not any(s in tail for s in stops):
                    still.append(i)
            active = still
        return new

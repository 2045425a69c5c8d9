"""Deterministic synthetic token batches (tests, benchmarks, smoke runs): a skewed unigram
distribution the embeddings and head can learn, identical for any TP/PP/DP split."""
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state


def global_batch(step: int, vocab_size: int, global_batch_size: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """[global_batch_size, seq_length + 1] tokens of optimizer step `step`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    probs = torch.linspace(1.0, 0.01, vocab_size) ** 4
    tokens = torch.multinomial(probs, global_batch_size * (seq_length + 1), replacement=True, generator=g)
    return tokens.view(global_batch_size, seq_length + 1)


def rank_batches(vocab_size: int, global_batch_size: int, micro_batch_size: int, seq_length: int,
                 seed: int = 0) -> Callable[[int], Iterator[torch.Tensor]]:
    """`batches(step)` for the trainer: this data-parallel rank's micro-batches of the global batch."""
    def batches(step: int) -> Iterator[torch.Tensor]:
        dp, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        per_rank = global_batch_size // dp_size
        mine = global_batch(step, vocab_size, global_batch_size, seq_length, seed)[dp * per_rank:(dp + 1) * per_rank]
        return iter(mine.split(micro_batch_size))

    return batches

"""What the trainer eats: `batches(step)` -> this data-parallel rank's micro-batches
[micro_batch_size, seq_length + 1] of optimizer step `step` (1-based), the same global batch for
any TP/PP/DP split. From megatron GPTDatasets (`lep-megatron data`), or synthetic: a skewed unigram
distribution the embeddings and head can learn (tests, benchmarks, smoke runs)."""
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state


def global_batch(step: int, vocab_size: int, global_batch_size: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """[global_batch_size, seq_length + 1] tokens of optimizer step `step`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    probs = torch.linspace(1.0, 0.01, vocab_size) ** 4
    tokens = torch.multinomial(probs, global_batch_size * (seq_length + 1), replacement=True, generator=g)
    return tokens.view(global_batch_size, seq_length + 1)


def _rank_rows(global_batch_size: int) -> range:
    dp, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    per_rank = global_batch_size // dp_size
    return range(dp * per_rank, (dp + 1) * per_rank)


def dataset_batches(dataset, global_batch_size: int, micro_batch_size: int) -> Callable[[int], Iterator[torch.Tensor]]:
    """Batches from a megatron GPTDataset: step s takes samples [(s-1) * gbs, s * gbs)."""
    def batches(step: int) -> Iterator[torch.Tensor]:
        first = (step - 1) * global_batch_size
        rows = []
        for i in _rank_rows(global_batch_size):
            sample = dataset[first + i]
            rows.append(torch.cat([torch.as_tensor(sample["tokens"]), torch.as_tensor(sample["labels"][-1:])]))
        return iter(torch.stack(rows).long().split(micro_batch_size))

    return batches


def rank_batches(vocab_size: int, global_batch_size: int, micro_batch_size: int, seq_length: int,
                 seed: int = 0) -> Callable[[int], Iterator[torch.Tensor]]:
    """`batches(step)` for the trainer: this data-parallel rank's micro-batches of the global batch."""
    def batches(step: int) -> Iterator[torch.Tensor]:
        rows = _rank_rows(global_batch_size)
        mine = global_batch(step, vocab_size, global_batch_size, seq_length, seed)[rows.start:rows.stop]
        return iter(mine.split(micro_batch_size))

    return batches

"""Averaging initialization of vocabulary-parallel (TP-sharded) embedding tables.

Megatron splits the padded vocabulary of the input embedding and of the LM head into equal
contiguous slices, one per tensor-parallel rank. Here each rank holds its slice of the ORIGINAL
tables and ends with its slice of the NEW tables, without any rank holding a full table:

1. every rank sums the rows of its slice that the token map asks for (segment_sum: float32
   sums for both tables plus the weight mass taken, for all new rows, padding rows included);
2. a reduce-scatter over the TP group adds the partial sums and masses of all ranks and hands
   each rank the block of new rows it owns (half the traffic of an all-reduce);
3. each rank divides its sums by the mass and casts to the table dtype.

Rows of zero mass (empty token-map rows, and the padding rows) come out as zeros. Communication
and the temporary buffers are float32 [padded_new_vocab, d] per table on every rank.
Works with any torch.distributed backend that has reduce_scatter_tensor (gloo on CPU, NCCL on
GPUs); the tables and the token map must be on the backend's device.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from lep_megatron.ops import segment_sum
from lep_megatron.tokenizer.token_map import TokenMap


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp_size: int) -> int:
    """Megatron's padded vocabulary: the next multiple of make_vocab_size_divisible_by * tp_size."""
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def init_sharded_embeddings(
    input_shard: torch.Tensor,
    output_shard: torch.Tensor,
    token_map: TokenMap,
    *,
    rank: int,
    world_size: int,
    group: Optional[dist.ProcessGroup] = None,
    make_vocab_size_divisible_by: int = 128,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's slices of the new input embedding and LM head.

    Args:
        input_shard: this rank's slice of the original input embedding, [rows_per_rank, d]: rows
            [rank * rows_per_rank, (rank + 1) * rows_per_rank) of the (padded) original table.
        output_shard: the same slice of the original LM head (for tied embeddings, input_shard).
        token_map: the averaging matrix (its indices refer to the unpadded original vocabulary).
        rank: this rank's index in the TP group.
        world_size: the TP group's size.
        group: the TP process group (None: the default group); unused when world_size is 1.
        make_vocab_size_divisible_by: Megatron's padding unit of the NEW vocabulary.

    Returns:
        The rank's slices of the new tables, [padded_new_vocab / world_size, d] each, in the
        dtype of the shards, padding rows zero.
    """
    if input_shard.shape != output_shard.shape or input_shard.dim() != 2:
        raise ValueError(f"shards differ in shape or are not 2-D: {tuple(input_shard.shape)} vs {tuple(output_shard.shape)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a group of {world_size}")
    rows_per_rank = input_shard.shape[0]
    if rows_per_rank * world_size < token_map.old_vocab_size:
        raise ValueError(
            f"{world_size} shards of {rows_per_rank} rows cannot hold the original vocabulary of "
            f"{token_map.old_vocab_size}"
        )
    device = input_shard.device
    new_padded = padded_vocab_size(token_map.new_vocab_size, make_vocab_size_divisible_by, world_size)
    # Padding rows are empty CSR rows: segment_sum then yields their zero sums and zero mass.
    offsets = torch.cat(
        [token_map.offsets, token_map.offsets[-1:].expand(new_padded - token_map.new_vocab_size)]
    ).to(device)
    input_sums, output_sums, mass = segment_sum(
        input_shard.contiguous(),
        output_shard.contiguous(),
        offsets,
        token_map.indices.to(device),
        token_map.weights.to(device),
        row_begin=rank * rows_per_rank,
    )
    if world_size > 1:
        input_sums, output_sums, mass = (_reduce_scatter_rows(t, world_size, group) for t in (input_sums, output_sums, mass))
    scale = torch.where(mass == 0, 0.0, 1.0 / mass).unsqueeze(1)
    return (input_sums * scale).to(input_shard.dtype), (output_sums * scale).to(output_shard.dtype)


def _reduce_scatter_rows(full: torch.Tensor, world_size: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    block = torch.empty((full.shape[0] // world_size, *full.shape[1:]), dtype=full.dtype, device=full.device)
    dist.reduce_scatter_tensor(block, full, op=dist.ReduceOp.SUM, group=group)
    return block

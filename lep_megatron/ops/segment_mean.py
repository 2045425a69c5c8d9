"""Weighted ragged segment mean: the averaging step of the embedding initialization.

For a CSR list per new row t (``indices[offsets[t]:offsets[t+1]]`` with optional ``weights``)
both tables are averaged at once::

    new[t] = sum_k w_k * table[indices[k]] / sum_k w_k        (w_k = 1 without weights)

The op divides every row by its own weight mass, so weights need not be normalised (a
TokenMap's rows already sum to 1, for which the division changes nothing but rounding; rows
made of one entry of weight 1, the tokens shared with the original vocabulary, come out
bit-identical to the original rows). Weights must be non-negative. Rows of zero mass (no
entries) are zeros: the caller applies its fallback rule to them. Accumulation is float32;
results are in the tables' dtype (float32, bfloat16 or float16).

The compiled ops ``torch.ops.lep_megatron.segment_mean`` / ``segment_sum`` (csrc/, C++ with
OpenMP on CPU, CUDA on GPUs) are used when the extension is loaded; otherwise the pure-PyTorch
reference below (torch.nn.functional.embedding_bag), which the tests also compare against.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    from lep_megatron import _C  # noqa: F401  (registers the compiled ops)
except ImportError:
    pass


def extension_available(device_type: str = "cpu") -> bool:
    """True when the compiled ops have a kernel for `device_type` ("cpu", "cuda").

    The ops come from lep_megatron._C, or from a library loaded by hand (tests/gpu builds one);
    a CPU-only build has no CUDA kernels, and CUDA tensors then take the reference path.
    """
    return hasattr(torch.ops.lep_megatron, "segment_mean") and torch._C._dispatch_has_kernel_for_dispatch_key(
        "lep_megatron::segment_mean", device_type.upper()
    )


def segment_mean(
    input_table: torch.Tensor,
    output_table: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted means of rows of two tables [N_old, d] per CSR row -> two tables [N_new, d].

    Args:
        input_table: the input embeddings [N_old, d] (float32, bfloat16 or float16), contiguous.
        output_table: the output embeddings (LM head) of the same shape and dtype; for a tied
            model pass the input table again.
        offsets: int64 [N_new + 1], from 0 to len(indices), non-decreasing.
        indices: int64 [nnz], rows of the tables, in [0, N_old).
        weights: optional float32 [nnz], non-negative; None weighs every entry 1.
    """
    if extension_available(input_table.device.type):
        return torch.ops.lep_megatron.segment_mean(input_table, output_table, offsets, indices, weights)
    return segment_mean_reference(input_table, output_table, offsets, indices, weights)


def segment_sum(
    input_table: torch.Tensor,
    output_table: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    row_begin: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part of segment_mean that one tensor-parallel rank can do with its slice of the rows.

    The tables hold original rows [row_begin, row_begin + len(table)); entries outside that slice
    are skipped. Returns the float32 weighted sums of both tables [N_new, d] and the float32
    weight mass [N_new] of the entries taken; summing these over the slices and dividing the
    sums by the mass gives segment_mean.
    """
    if extension_available(input_table.device.type):
        return torch.ops.lep_megatron.segment_sum(input_table, output_table, offsets, indices, weights, row_begin)
    return segment_sum_reference(input_table, output_table, offsets, indices, weights, row_begin)


def register_fake_implementations() -> None:
    """Shape-only implementations of the compiled ops, for FakeTensor and torch.compile tracing."""

    @torch.library.register_fake("lep_megatron::segment_mean")
    def _segment_mean_fake(input_table, output_table, offsets, indices, weights):
        shape = (offsets.shape[0] - 1, input_table.shape[1])
        return input_table.new_empty(shape), output_table.new_empty(shape)

    @torch.library.register_fake("lep_megatron::segment_sum")
    def _segment_sum_fake(input_table, output_table, offsets, indices, weights, row_begin):
        rows = offsets.shape[0] - 1
        sums = input_table.new_empty((rows, input_table.shape[1]), dtype=torch.float32)
        return sums, torch.empty_like(sums), input_table.new_empty((rows,), dtype=torch.float32)


if hasattr(torch.ops.lep_megatron, "segment_mean"):
    register_fake_implementations()


def _row_ids(offsets: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())


def _weights_or_ones(indices: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ones(indices.shape, dtype=torch.float32, device=indices.device) if weights is None else weights.float()


def _accumulation_dtype(table: torch.Tensor) -> torch.dtype:
    # float64 tables (the tests' references) accumulate in float64, everything else in float32.
    return torch.float64 if table.dtype == torch.float64 else torch.float32


def segment_sum_reference(
    input_table: torch.Tensor,
    output_table: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    row_begin: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """segment_sum in PyTorch: embedding_bag(mode="sum") with entries outside the slice weighted 0.

    Tables of 16-bit dtypes are upcast to float32 first (embedding_bag would round the weights
    and accumulate in the table dtype); this costs a float32 copy of the tables.
    """
    acc_dtype = _accumulation_dtype(input_table)
    local = indices - row_begin
    inside = (local >= 0) & (local < input_table.shape[0])
    w = torch.where(inside, _weights_or_ones(indices, weights), 0.0).to(acc_dtype)
    local = torch.where(inside, local, 0)
    mass = torch.zeros(offsets.numel() - 1, dtype=acc_dtype, device=indices.device).index_add_(0, _row_ids(offsets), w)
    sums = tuple(
        F.embedding_bag(local, table.to(acc_dtype), offsets, mode="sum", per_sample_weights=w, include_last_offset=True)
        for table in (input_table, output_table)
    )
    return sums[0], sums[1], mass


def segment_mean_reference(
    input_table: torch.Tensor,
    output_table: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """segment_mean in PyTorch (see segment_sum_reference); also the tests' float64 reference."""
    input_sums, output_sums, mass = segment_sum_reference(input_table, output_table, offsets, indices, weights)
    divisor = torch.where(mass == 0, 1.0, mass).unsqueeze(1)
    return (input_sums / divisor).to(input_table.dtype), (output_sums / divisor).to(output_table.dtype)

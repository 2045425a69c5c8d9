// Weighted ragged segment mean over CSR lists of table rows: the averaging step of LEP's
// embedding initialization (new_row[t] = sum_k w_k * old_row[indices[k]] / sum_k w_k).
// Shared by the CPU (segment_mean.cpp) and CUDA (cuda/segment_mean.cu) implementations.
#pragma once

#include <torch/types.h>

#include <optional>

namespace lep_megatron {

// Validates the arguments of both ops and returns the weights as a contiguous float32 tensor
// (undefined when absent: every entry then weighs 1).
inline void check_segment_args(
    const at::Tensor& input_table,
    const at::Tensor& output_table,
    const at::Tensor& offsets,
    const at::Tensor& indices,
    const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(input_table.dim() == 2 && output_table.dim() == 2, "segment ops: tables must be 2-D [rows, dim]");
  TORCH_CHECK(
      input_table.sizes() == output_table.sizes(),
      "segment ops: input_table ", input_table.sizes(), " and output_table ", output_table.sizes(), " differ in shape");
  TORCH_CHECK(input_table.scalar_type() == output_table.scalar_type(), "segment ops: tables differ in dtype");
  const auto dtype = input_table.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
      "segment ops: tables must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(input_table.is_contiguous() && output_table.is_contiguous(), "segment ops: tables must be contiguous");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, "segment ops: offsets must be 1-D with new_rows + 1 entries");
  TORCH_CHECK(indices.dim() == 1, "segment ops: indices must be 1-D");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && indices.scalar_type() == at::kLong, "segment ops: offsets and indices must be int64");
  TORCH_CHECK(offsets.is_contiguous() && indices.is_contiguous(), "segment ops: offsets and indices must be contiguous");
  const auto device = input_table.device();
  TORCH_CHECK(
      output_table.device() == device && offsets.device() == device && indices.device() == device,
      "segment ops: all tensors must be on ", device);
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->numel() == indices.numel(), "segment ops: weights must match indices in length");
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->is_contiguous(), "segment ops: weights must be contiguous float32");
    TORCH_CHECK(weights->device() == device, "segment ops: weights must be on ", device);
  }
}

}  // namespace lep_megatron

// CUDA implementation of lep_megatron::segment_mean and lep_megatron::segment_sum.
//
// One warp per new row, several rows per block, grid-stride over rows. Each lane owns 16-byte
// column slices of the row: it reads them from every entry's row of both tables with 16-byte
// loads, accumulates in float32 registers and writes each slice once. The CSR index and weight
// loads are warp-uniform (one transaction, broadcast). Rows whose length or alignment does not
// allow 16-byte access take the same kernel with one element per access.
#include "../segment_mean.h"

// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers): this
// file then compiles against a bare CUDA toolkit, as csrc/compile_cuda.sh does in CI.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

namespace lep_megatron {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreadsPerBlock = 256;  // 8 rows per block
constexpr int kRowsPerBlock = kThreadsPerBlock / kWarpSize;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// kMean: divide by the weight mass and require every index inside the table (segment_mean);
// otherwise skip entries outside [row_begin, row_begin + table_rows) and emit float32 sums and
// the mass (segment_sum).
template <typename T, typename OutT, int kVec, bool kMean>
__global__ void __launch_bounds__(kThreadsPerBlock) segment_reduce_kernel(
    const T* __restrict__ input_table,
    const T* __restrict__ output_table,
    int64_t table_rows,
    int64_t row_begin,
    int64_t dim,
    const int64_t* __restrict__ offsets,
    const int64_t* __restrict__ indices,
    const float* __restrict__ weights,
    int64_t new_rows,
    OutT* __restrict__ new_input,
    OutT* __restrict__ new_output,
    float* __restrict__ mass_out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t slices = dim / kVec;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; row < new_rows;
       row += row_stride) {
    const int64_t begin = offsets[row];
    const int64_t end = offsets[row + 1];
    float mass = 0.0f;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t local = indices[k] - row_begin;
      if (kMean) {
        CUDA_KERNEL_ASSERT(local >= 0 && local < table_rows && "segment_mean: index out of range");
      } else if (local < 0 || local >= table_rows) {
        continue;
      }
      mass += weights ? weights[k] : 1.0f;
    }
    // 1 / mass keeps rows of one entry of weight 1 bit-identical to the original row; rows
    // without entries sum to zero.
    const float scale = kMean && mass != 0.0f ? 1.0f / mass : 1.0f;
    for (int64_t slice = lane; slice < slices; slice += kWarpSize) {
      float acc_in[kVec] = {};
      float acc_out[kVec] = {};
#pragma unroll 4
      for (int64_t k = begin; k < end; ++k) {
        const int64_t local = indices[k] - row_begin;
        if (!kMean && (local < 0 || local >= table_rows)) {
          continue;
        }
        const float w = weights ? weights[k] : 1.0f;
        const auto a = reinterpret_cast<const Pack<T, kVec>*>(input_table + local * dim)[slice];
        const auto b = reinterpret_cast<const Pack<T, kVec>*>(output_table + local * dim)[slice];
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          acc_in[i] += w * static_cast<float>(a.v[i]);
          acc_out[i] += w * static_cast<float>(b.v[i]);
        }
      }
      Pack<OutT, kVec> a, b;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        a.v[i] = static_cast<OutT>(acc_in[i] * scale);
        b.v[i] = static_cast<OutT>(acc_out[i] * scale);
      }
      reinterpret_cast<Pack<OutT, kVec>*>(new_input + row * dim)[slice] = a;
      reinterpret_cast<Pack<OutT, kVec>*>(new_output + row * dim)[slice] = b;
    }
    if (!kMean && lane == 0) {
      mass_out[row] = mass;
    }
  }
}

bool aligned_to(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

template <typename T, typename OutT, bool kMean>
void launch_segment_reduce(
    const at::Tensor& input_table,
    const at::Tensor& output_table,
    int64_t row_begin,
    const at::Tensor& offsets,
    const at::Tensor& indices,
    const std::optional<at::Tensor>& weights,
    const at::Tensor& new_input,
    const at::Tensor& new_output,
    float* mass_out) {
  const int64_t new_rows = offsets.numel() - 1;
  const int64_t dim = input_table.size(1);
  if (new_rows == 0 || dim == 0) {
    return;
  }
  const auto* in = static_cast<const T*>(input_table.data_ptr());
  const auto* out = static_cast<const T*>(output_table.data_ptr());
  auto* new_in = static_cast<OutT*>(new_input.data_ptr());
  auto* new_out = static_cast<OutT*>(new_output.data_ptr());
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, input_table.get_device()));
  const int64_t blocks = std::min<int64_t>((new_rows + kRowsPerBlock - 1) / kRowsPerBlock, int64_t{sms} * 16);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  constexpr int kVec = 16 / sizeof(T);
  const bool vectorised = dim % kVec == 0 && aligned_to(in, 16) && aligned_to(out, 16) &&
      aligned_to(new_in, sizeof(OutT) * kVec) && aligned_to(new_out, sizeof(OutT) * kVec);
  if (vectorised) {
    segment_reduce_kernel<T, OutT, kVec, kMean><<<blocks, kThreadsPerBlock, 0, stream>>>(
        in, out, input_table.size(0), row_begin, dim, offsets.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), w,
        new_rows, new_in, new_out, mass_out);
  } else {
    segment_reduce_kernel<T, OutT, 1, kMean><<<blocks, kThreadsPerBlock, 0, stream>>>(
        in, out, input_table.size(0), row_begin, dim, offsets.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), w,
        new_rows, new_in, new_out, mass_out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls `fn` with a null pointer of the table's element type.
template <typename Fn>
void dispatch_table_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<at::BFloat16*>(nullptr));
      break;
    case at::kHalf:
      fn(static_cast<at::Half*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "segment ops: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> segment_mean_cuda(
    const at::Tensor& input_table,
    const at::Tensor& output_table,
    const at::Tensor& offsets,
    const at::Tensor& indices,
    const std::optional<at::Tensor>& weights) {
  check_segment_args(input_table, output_table, offsets, indices, weights);
  const c10::cuda::CUDAGuard guard(input_table.device());
  const int64_t new_rows = offsets.numel() - 1;
  at::Tensor new_input = at::empty({new_rows, input_table.size(1)}, input_table.options());
  at::Tensor new_output = at::empty_like(new_input);
  dispatch_table_type(input_table.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_segment_reduce<T, T, true>(
        input_table, output_table, 0, offsets, indices, weights, new_input, new_output, nullptr);
  });
  return {new_input, new_output};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_sum_cuda(
    const at::Tensor& input_table,
    const at::Tensor& output_table,
    const at::Tensor& offsets,
    const at::Tensor& indices,
    const std::optional<at::Tensor>& weights,
    int64_t row_begin) {
  check_segment_args(input_table, output_table, offsets, indices, weights);
  const c10::cuda::CUDAGuard guard(input_table.device());
  const int64_t new_rows = offsets.numel() - 1;
  const auto fp32 = input_table.options().dtype(at::kFloat);
  at::Tensor input_sums = at::empty({new_rows, input_table.size(1)}, fp32);
  at::Tensor output_sums = at::empty_like(input_sums);
  at::Tensor mass = at::empty({new_rows}, fp32);
  dispatch_table_type(input_table.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_segment_reduce<T, float, false>(
        input_table, output_table, row_begin, offsets, indices, weights, input_sums, output_sums,
        mass.data_ptr<float>());
  });
  return {input_sums, output_sums, mass};
}

}  // namespace

TORCH_LIBRARY_IMPL(lep_megatron, CUDA, m) {
  m.impl("segment_mean", &segment_mean_cuda);
  m.impl("segment_sum", &segment_sum_cuda);
}

}  // namespace lep_megatron

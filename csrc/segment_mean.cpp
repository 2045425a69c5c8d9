// CPU implementation of lep_megatron::segment_mean and lep_megatron::segment_sum.
//
// Work is split over new rows into tasks of equal cost (rows read + rows written) that the
// threads of torch's intra-op pool (OpenMP) take one at a time. The per-row loop (reduce_row)
// is compiled for AVX-512, AVX2 and baseline x86-64 and the best one is picked when the library
// loads, so a portable build still runs vectorised.
//
// What the time goes to at Llama-3 shapes (2 x [174,816 x 4096] written from 2 x [128,256 x 4096],
// 2 cores, benchmarks/init.py), and what was kept:
// - Most of a call is the kernel handing out the ~1.4 million fresh 4 KiB pages of the two
//   outputs (page faults: about 2.2 CPU-s of system time per float32 call against 0.9 CPU-s of
//   our own). Outputs are populated a few rows ahead of the writes with MADV_POPULATE_WRITE
//   (one call per ~256 KiB instead of one fault per page; the zeroed lines are still in cache
//   when the rows are written): -20% system time.
// - Transparent huge pages are NOT requested for the outputs: on the VM this was measured on,
//   free memory is handed back to the host (virtio-balloon free page reporting), and a fresh
//   2 MiB page there costs ~4 ms to fault in (4-5x the 4 KiB pages for the same bytes; only
//   recycled huge pages are cheap), so madvise(MADV_HUGEPAGE) made the first call 2-3x slower.
//   With THP set to `always`, or torch's THP_MEM_ALLOC_ENABLE=1, the kernel uses them anyway.
// - The rows of the next table (and of the next new row) are prefetched into L2 while one row
//   is reduced: the hardware prefetcher stops at each 4 KiB page of a gathered row. -25% user
//   time for float32, -30% for bfloat16 (which then needs fewer CPU-s than embedding_bag).
// - Not kept: non-temporal stores (the page fault has just zeroed the lines in cache; streaming
//   over them was slower) and memcpy for rows copied from one original row (no faster than the
//   vector loop, which already reads and writes each byte once).
#include "segment_mean.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LEP_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LEP_SIMD_CLONES
#endif

// The 16-lane vector helpers below are forced inline into the clones: a vector passed to an
// out-of-line helper compiled for another ISA would not be passed the way the callee expects.
// No vector crosses a call boundary, so GCC's note on the AVX-512 argument ABI does not apply.
#define LEP_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lep_megatron {
namespace {

// 16-bit storage types by their bits: the conversions below are written once for scalars and
// for GCC vectors of 16 lanes (one AVX-512 register, two AVX2 or four SSE registers, depending
// on the clone), as branch-free integer and float arithmetic.
struct BF16Bits {
  uint16_t bits;
};
struct F16Bits {
  uint16_t bits;
};
static_assert(sizeof(BF16Bits) == sizeof(at::BFloat16) && sizeof(F16Bits) == sizeof(at::Half), "16-bit layouts");

constexpr int64_t kLanes = 16;
typedef float f32x16 __attribute__((vector_size(4 * kLanes)));
typedef uint32_t u32x16 __attribute__((vector_size(4 * kLanes)));
typedef int32_t i32x16 __attribute__((vector_size(4 * kLanes)));
typedef uint16_t u16x16 __attribute__((vector_size(2 * kLanes)));

LEP_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
LEP_INLINE float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
LEP_INLINE u32x16 bits_of(f32x16 x) {
  return reinterpret_cast<u32x16>(x);
}
LEP_INLINE f32x16 float_of(u32x16 u) {
  return reinterpret_cast<f32x16>(u);
}
// All ones where `condition` holds, else zero (a blend once vectorised).
LEP_INLINE uint32_t mask_if(bool condition) {
  return 0u - static_cast<uint32_t>(condition);
}
LEP_INLINE u32x16 mask_if(i32x16 condition) {
  return reinterpret_cast<u32x16>(condition);
}

// bfloat16 / float16 bits (zero-extended to 32 bits) -> float32, and back with round to nearest
// even: bit-identical to torch's casts. U is uint32_t or u32x16, F the matching float type.
template <typename U, typename F>
LEP_INLINE F bf16_to_float(U h) {
  return float_of(h << 16);
}
template <typename F, typename U>
LEP_INLINE U float_to_bf16(F x) {
  const U u = bits_of(x);
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U nan = mask_if(x != x);  // NaN stays a quiet NaN
  return (0x7fc0u & nan) | (rounded & ~nan);
}
// Exponent and mantissa moved into float32 position and rescaled by 2^(127 - 15), which also
// normalises subnormals; infinities and NaNs keep an all-ones exponent.
template <typename U, typename F>
LEP_INLINE F f16_to_float(U h) {
  const U sign = (h & 0x8000u) << 16;
  const U magnitude = (h & 0x7fffu) << 13;
  const U rescaled = bits_of(float_of(magnitude) * 0x1p112f);
  const U special = mask_if(magnitude >= (0x7c00u << 13));
  return float_of(sign | ((magnitude | 0x7f800000u) & special) | (rescaled & ~special));
}
// F. Giesen's float_to_half_fast3_rtne, written with selects: overflow to infinity, float16
// subnormals, NaN kept quiet.
template <typename F, typename U>
LEP_INLINE U float_to_f16(F x) {
  const U sign = bits_of(x) & 0x80000000u;
  const U u = bits_of(x) ^ sign;
  const U inf_or_nan = 0x7c00u | ((mask_if(u > 0x7f800000u) & 1u) << 9);
  const float denormal_magic = float_of(((127u - 15u) + (23u - 10u) + 1u) << 23);
  const U subnormal = bits_of(float_of(u) + denormal_magic) - bits_of(denormal_magic);
  const U normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const U is_subnormal = mask_if(u < (113u << 23));
  const U is_overflow = mask_if(u >= ((127u + 16u) << 23));
  const U finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  return (sign >> 16) | (inf_or_nan & is_overflow) | (finite & ~is_overflow);
}

// Loads and stores of one element (scalar) or 16 elements (vector), converting to/from float32.
LEP_INLINE float load1(const float* p) {
  return *p;
}
LEP_INLINE float load1(const BF16Bits* p) {
  return bf16_to_float<uint32_t, float>(p->bits);
}
LEP_INLINE float load1(const F16Bits* p) {
  return f16_to_float<uint32_t, float>(p->bits);
}
LEP_INLINE void store1(float* p, float x) {
  *p = x;
}
LEP_INLINE void store1(BF16Bits* p, float x) {
  p->bits = static_cast<uint16_t>(float_to_bf16<float, uint32_t>(x));
}
LEP_INLINE void store1(F16Bits* p, float x) {
  p->bits = static_cast<uint16_t>(float_to_f16<float, uint32_t>(x));
}

LEP_INLINE u32x16 load_u16x16(const void* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, u32x16);
}
LEP_INLINE void store_u16x16(void* p, u32x16 u) {
  const u16x16 h = __builtin_convertvector(u, u16x16);
  std::memcpy(p, &h, sizeof(h));
}
LEP_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
LEP_INLINE f32x16 load16(const BF16Bits* p) {
  return bf16_to_float<u32x16, f32x16>(load_u16x16(p));
}
LEP_INLINE f32x16 load16(const F16Bits* p) {
  return f16_to_float<u32x16, f32x16>(load_u16x16(p));
}
LEP_INLINE void store16(float* p, f32x16 v) {
  std::memcpy(p, &v, sizeof(v));
}
LEP_INLINE void store16(BF16Bits* p, f32x16 v) {
  store_u16x16(p, float_to_bf16<f32x16, u32x16>(v));
}
LEP_INLINE void store16(F16Bits* p, f32x16 v) {
  store_u16x16(p, float_to_f16<f32x16, u32x16>(v));
}

// The entries of one new row that fall in the table's slice: local row numbers and weights.
struct RowEntries {
  std::vector<int64_t> rows;
  std::vector<float> weights;
  float mass = 0.0f;
  int64_t count() const {
    return static_cast<int64_t>(rows.size());
  }
};

// Rows a reduce_row call prefetches (into L2) column block by column block while it works:
// those that the next call reads.
template <typename T>
struct Prefetch {
  const T* table = nullptr;
  const int64_t* rows = nullptr;
  int64_t count = 0;
};

// out[j] = scale * sum_k weights[k] * table[rows[k]][j] for one new row. The row is done in
// column blocks whose float32 accumulators stay in vector registers while the entries stream
// past, so each table byte is read once and each output byte written once.
template <typename T, typename OutT>
LEP_SIMD_CLONES void reduce_row(
    OutT* __restrict out,
    const T* __restrict table,
    const int64_t* __restrict rows,
    const float* __restrict weights,
    int64_t count,
    float scale,
    int64_t dim,
    Prefetch<T> next) {
  constexpr int64_t kBlockBytes = 4 * kLanes * static_cast<int64_t>(sizeof(T));
  int64_t j0 = 0;
  for (; j0 + 4 * kLanes <= dim; j0 += 4 * kLanes) {
    for (int64_t k = 0; k < next.count; ++k) {
      const char* block = reinterpret_cast<const char*>(next.table + next.rows[k] * dim + j0);
      for (int64_t b = 0; b < kBlockBytes; b += 64) {
        __builtin_prefetch(block + b, /*rw=*/0, /*locality=*/2);
      }
    }
    f32x16 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    for (int64_t k = 0; k < count; ++k) {
      const T* row = table + rows[k] * dim + j0;
      const float w = weights[k];
      acc0 += w * load16(row);
      acc1 += w * load16(row + kLanes);
      acc2 += w * load16(row + 2 * kLanes);
      acc3 += w * load16(row + 3 * kLanes);
    }
    store16(out + j0, acc0 * scale);
    store16(out + j0 + kLanes, acc1 * scale);
    store16(out + j0 + 2 * kLanes, acc2 * scale);
    store16(out + j0 + 3 * kLanes, acc3 * scale);
  }
  for (; j0 + kLanes <= dim; j0 += kLanes) {
    f32x16 acc = {};
    for (int64_t k = 0; k < count; ++k) {
      acc += weights[k] * load16(table + rows[k] * dim + j0);
    }
    store16(out + j0, acc * scale);
  }
  for (; j0 < dim; ++j0) {
    float acc = 0.0f;
    for (int64_t k = 0; k < count; ++k) {
      acc += weights[k] * load1(table + rows[k] * dim + j0);
    }
    store1(out + j0, acc * scale);
  }
}

// Row boundaries of `num_tasks` tasks of about equal cost, a row costing its entries plus one
// (the write): the token maps of an extended vocabulary put short rows first and long rows last.
std::vector<int64_t> balanced_row_splits(const int64_t* offsets, int64_t rows, int64_t num_tasks) {
  const int64_t total = offsets[rows] + rows;
  std::vector<int64_t> splits(num_tasks + 1, rows);
  splits[0] = 0;
  int64_t row = 0;
  for (int64_t task = 1; task < num_tasks; ++task) {
    const int64_t target = total * task / num_tasks;
    while (row < rows && offsets[row] + row < target) {
      ++row;
    }
    splits[task] = row;
  }
  return splits;
}

// Faults in the pages of [begin, end) ahead of the writes, with one system call instead of
// one page fault per 4 KiB page (Linux 5.14+; elsewhere, or if it fails, the writes fault the
// pages in as usual). Pages already in memory are left as they are.
void populate_for_write(void* begin, void* end) {
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(begin) + page - 1) & ~(page - 1);
  const uintptr_t hi = reinterpret_cast<uintptr_t>(end) & ~(page - 1);
  if (hi > lo) {
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
  }
#else
  (void)begin;
  (void)end;
#endif
}

// Shared driver. Entries whose index lies outside [row_begin, row_begin + table_rows) are
// skipped (the TP-sharded sum); `divide_by_mass` turns sums into weighted means.
template <typename T, typename OutT>
void segment_reduce_cpu(
    const T* input_table,
    const T* output_table,
    int64_t table_rows,
    int64_t row_begin,
    int64_t dim,
    const int64_t* offsets,
    const int64_t* indices,
    const float* weights,
    int64_t new_rows,
    bool divide_by_mass,
    OutT* new_input,
    OutT* new_output,
    float* mass_out) {
  // Tasks are taken one at a time by whichever thread is free (on a shared machine a thread
  // that lost its core does not hold the others up); 32 per thread keep the tail short.
  const int64_t num_threads = at::get_num_threads();
  const int64_t num_tasks = std::max<int64_t>(1, std::min<int64_t>(new_rows, 32 * num_threads));
  const std::vector<int64_t> splits = balanced_row_splits(offsets, new_rows, num_tasks);
  // Output rows populated per call: about 256 KiB of each table (L2 keeps them for the writes).
  const int64_t populate_rows = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, dim * static_cast<int64_t>(sizeof(OutT))));
  std::atomic<int64_t> next_task{0};

  auto gather = [&](int64_t row, RowEntries& entries) {
    entries.rows.clear();
    entries.weights.clear();
    entries.mass = 0.0f;
    for (int64_t k = offsets[row]; k < offsets[row + 1]; ++k) {
      const int64_t local = indices[k] - row_begin;
      if (local >= 0 && local < table_rows) {
        entries.rows.push_back(local);
        entries.weights.push_back(weights ? weights[k] : 1.0f);
        entries.mass += entries.weights.back();
      }
    }
  };

  auto run_task = [&](int64_t task, RowEntries& current, RowEntries& next) {
    const int64_t first = splits[task], last = splits[task + 1];
    if (first == last) {
      return;
    }
    gather(first, next);
    int64_t populated = first;
    for (int64_t row = first; row < last; ++row) {
      if (row == populated) {
        populated = std::min(last, row + populate_rows);
        populate_for_write(new_input + row * dim, new_input + populated * dim);
        populate_for_write(new_output + row * dim, new_output + populated * dim);
      }
      std::swap(current, next);
      if (row + 1 < last) {
        gather(row + 1, next);
      } else {
        next.rows.clear();
      }
      // Multiplying by 1 / mass keeps rows made of one entry of weight 1 (the tokens shared
      // with the original vocabulary) bit-identical to the original row; rows without entries
      // sum to zero.
      const float scale = divide_by_mass && current.mass != 0.0f ? 1.0f / current.mass : 1.0f;
      // While the input table's rows are reduced, the same rows of the output table are
      // prefetched; while those are, the input table's rows of the next new row.
      reduce_row(new_input + row * dim, input_table, current.rows.data(), current.weights.data(), current.count(), scale, dim,
                 Prefetch<T>{output_table, current.rows.data(), current.count()});
      reduce_row(new_output + row * dim, output_table, current.rows.data(), current.weights.data(), current.count(), scale, dim,
                 Prefetch<T>{input_table, next.rows.data(), next.count()});
      if (mass_out) {
        mass_out[row] = current.mass;
      }
    }
  };

  at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    RowEntries current, next;
    for (int64_t task = next_task++; task < num_tasks; task = next_task++) {
      run_task(task, current, next);
    }
  });
}

// Calls `fn` with a null pointer of the table's storage type (float, BF16Bits or F16Bits).
template <typename Fn>
void dispatch_storage_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<BF16Bits*>(nullptr));
      break;
    case at::kHalf:
      fn(static_cast<F16Bits*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "segment ops: unsupported dtype ", dtype);
  }
}

void check_csr_cpu(const at::Tensor& offsets, const at::Tensor& indices, int64_t num_index_rows, bool check_range) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t rows = offsets.numel() - 1;
  TORCH_CHECK(off[0] == 0 && off[rows] == indices.numel(), "segment ops: offsets must run from 0 to len(indices)");
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(off[r] <= off[r + 1], "segment ops: offsets must be non-decreasing (row ", r, ")");
  }
  if (check_range && indices.numel() > 0) {
    const auto [lo, hi] = at::aminmax(indices);
    TORCH_CHECK(
        lo.item<int64_t>() >= 0 && hi.item<int64_t>() < num_index_rows,
        "segment ops: indices must lie in [0, ", num_index_rows, ")");
  }
}

std::tuple<at::Tensor, at::Tensor> segment_mean_cpu(
    const at::Tensor& input_table,
    const at::Tensor& output_table,
    const at::Tensor& offsets,
    const at::Tensor& indices,
    const std::optional<at::Tensor>& weights) {
  check_segment_args(input_table, output_table, offsets, indices, weights);
  check_csr_cpu(offsets, indices, input_table.size(0), /*check_range=*/true);
  const int64_t new_rows = offsets.numel() - 1;
  const int64_t dim = input_table.size(1);
  at::Tensor new_input = at::empty({new_rows, dim}, input_table.options());
  at::Tensor new_output = at::empty({new_rows, dim}, input_table.options());
  dispatch_storage_type(input_table.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    segment_reduce_cpu<T, T>(
        static_cast<const T*>(input_table.data_ptr()),
        static_cast<const T*>(output_table.data_ptr()),
        input_table.size(0),
        /*row_begin=*/0,
        dim,
        offsets.data_ptr<int64_t>(),
        indices.data_ptr<int64_t>(),
        weights.has_value() ? weights->data_ptr<float>() : nullptr,
        new_rows,
        /*divide_by_mass=*/true,
        static_cast<T*>(new_input.data_ptr()),
        static_cast<T*>(new_output.data_ptr()),
        /*mass_out=*/nullptr);
  });
  return {new_input, new_output};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_sum_cpu(
    const at::Tensor& input_table,
    const at::Tensor& output_table,
    const at::Tensor& offsets,
    const at::Tensor& indices,
    const std::optional<at::Tensor>& weights,
    int64_t row_begin) {
  check_segment_args(input_table, output_table, offsets, indices, weights);
  check_csr_cpu(offsets, indices, 0, /*check_range=*/false);
  const int64_t new_rows = offsets.numel() - 1;
  const int64_t dim = input_table.size(1);
  const auto fp32 = input_table.options().dtype(at::kFloat);
  at::Tensor input_sums = at::empty({new_rows, dim}, fp32);
  at::Tensor output_sums = at::empty({new_rows, dim}, fp32);
  at::Tensor mass = at::empty({new_rows}, fp32);
  dispatch_storage_type(input_table.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    segment_reduce_cpu<T, float>(
        static_cast<const T*>(input_table.data_ptr()),
        static_cast<const T*>(output_table.data_ptr()),
        input_table.size(0),
        row_begin,
        dim,
        offsets.data_ptr<int64_t>(),
        indices.data_ptr<int64_t>(),
        weights.has_value() ? weights->data_ptr<float>() : nullptr,
        new_rows,
        /*divide_by_mass=*/false,
        input_sums.data_ptr<float>(),
        output_sums.data_ptr<float>(),
        mass.data_ptr<float>());
  });
  return {input_sums, output_sums, mass};
}

}  // namespace

TORCH_LIBRARY_IMPL(lep_megatron, CPU, m) {
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("segment_sum", &segment_sum_cpu);
}

}  // namespace lep_megatron

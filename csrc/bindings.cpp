// Schemas of the lep_megatron custom ops and the Python module lep_megatron._C that loads them.
// Implementations: segment_mean.cpp (CPU) and cuda/segment_mean.cu (CUDA); fake (meta)
// implementations for torch.compile and FakeTensor live in lep_megatron/ops/segment_mean.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing lep_megatron._C runs the static TORCH_LIBRARY registrations of this library.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lep_megatron, m) {
  // Weighted mean of rows of both tables per CSR row: new[t] = sum_k w_k * table[indices[k]] / sum_k w_k
  // over k in [offsets[t], offsets[t + 1]); weights default to 1; rows of zero mass are zeros.
  // Float32 accumulation; results in the tables' dtype.
  m.def(
      "segment_mean(Tensor input_table, Tensor output_table, Tensor offsets, Tensor indices, Tensor? weights)"
      " -> (Tensor, Tensor)");
  // The TP-sharded part of segment_mean: the tables hold original rows [row_begin, row_begin + rows);
  // entries outside that slice are skipped. Returns float32 weighted sums of both tables and the
  // weight mass of the entries taken, to be summed over the ranks and divided.
  m.def(
      "segment_sum(Tensor input_table, Tensor output_table, Tensor offsets, Tensor indices, Tensor? weights,"
      " int row_begin) -> (Tensor, Tensor, Tensor)");
}

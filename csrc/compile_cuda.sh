#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (csrc/cuda/*.cu) for sm_80 and sm_90, so that CUDA code
# cannot rot on machines without a GPU. Needs nvcc (CUDA_HOME, default /usr/local/cuda) and the
# headers of any torch build: the CPU wheel ships the c10/cuda headers too, and compile-only
# needs no CUDA torch libraries. Two things the CPU wheel lacks, handled here and in the source:
# - c10/cuda/impl/cuda_cmake_macros.h (generated at torch's build; on Linux it only defines a
#   Windows export macro): skipped with -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE;
# - a bare toolkit has no cuBLAS/cuSPARSE headers, which ATen/cuda/CUDAContext.h includes:
#   the kernels use c10/cuda only.
# Objects go to a temporary folder and are deleted.
#
#   usage: csrc/compile_cuda.sh [python]    (python with torch; default .venv/bin/python, else python3)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"
[[ -x "$NVCC" ]] || { echo "compile_cuda.sh: no nvcc at $NVCC (set CUDA_HOME)" >&2; exit 2; }

mapfile -t INCLUDES < <("$PYTHON" -c '
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()["include"]]:
    print("-I" + p)')
# The same ABI flag as the torch the headers come from, as torch.utils.cpp_extension passes it.
ABI=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')

OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT
shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
[[ ${#SOURCES[@]} -gt 0 ]] || { echo "compile_cuda.sh: no csrc/cuda/*.cu" >&2; exit 2; }
echo "nvcc: $("$NVCC" --version | tail -n 1)"
for src in "${SOURCES[@]}"; do
  obj="$OUT_DIR/$(basename "$src" .cu).o"
  "$NVCC" -c "$src" -o "$obj" "${INCLUDES[@]}" \
    -std=c++20 -O3 --use_fast_math -Xcompiler -fPIC \
    -DWITH_CUDA -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_C -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
  echo "ok: ${src#"$ROOT"/} -> sm_80, sm_90 ($(stat -c %s "$obj") bytes)"
done

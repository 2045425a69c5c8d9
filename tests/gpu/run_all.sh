#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA GPU (e.g. the device tool's H100/H200):
#   bash tests/gpu/run_all.sh [CHECK.py ...]   results as JSON under $OUT (default ./gpu_results)
# With no arguments: every tests/gpu/*_check.py, then the pytest tests marked gpu.
# Packages the machine lacks travel as wheels in .whl/ (megatron-core, hydra-core, omegaconf,
# antlr4 for Python 3.12); see README "GPU checks".
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/gpu_results} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0" python3 -m pip install --no-deps --no-build-isolation --use-pep517 -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
status=0
checks=("$@")
[ ${#checks[@]} -eq 0 ] && checks=(tests/gpu/*_check.py)
for check in "${checks[@]}"; do
  echo "== $check"
  timeout 400 python3 "$check" 2>&1 | tail -40 | tee "$OUT/$(basename "$check" .py).log" || status=1
done
if [ $# -eq 0 ]; then
  timeout 300 python3 -m pytest -q -m gpu tests 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log" || status=1
fi
exit $status

#!/usr/bin/env bash
# One device call: logit parity (bf16/fp32, streamed import), the gpu-marked tests, and the
# frozen-vs-full CPT benchmark on a ~1B Llama in bf16. Results under $OUT.
#   bash tests/gpu/session_checks.sh [--no-parity]
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/gpu_results} LEP_MEGATRON_NO_EXT=${LEP_MEGATRON_NO_EXT:-1}
status=0
if [ "${1:-}" = --no-parity ]; then
  timeout 200 bash tests/gpu/run_all.sh /dev/null || status=1  # installs the wheels and the package only
else
  timeout 200 bash tests/gpu/run_all.sh tests/gpu/parity_check.py || status=1
fi
export PYTHONPATH=/tmp/site
timeout 120 python3 -m pytest -q -m gpu tests/evaluation tests/training 2>&1 | tail -6 | tee "$OUT/pytest_gpu.log" || status=1
timeout 360 python3 benchmarks/cpt.py --device cuda --configs 1b 2>&1 | grep -v -i warn | tail -12 | tee "$OUT/cpt_cuda.log" || status=1
cp benchmarks/results/cpt_cuda.json "$OUT/" 2>/dev/null
exit $status

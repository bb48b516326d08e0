#!/usr/bin/env bash
# The GPU suite and the GPU log-prob benchmark, in one go, on a machine with a CUDA device:
#
#   bash benchmarks/gpu.sh            # tests/gpu (marker gpu), then the log-prob benchmark in bf16 and fp32
#   QUICK=1 bash benchmarks/gpu.sh    # small benchmark shapes only (a smoke run)
#
# Writes benchmarks/results/gpu_tests.json (each test's outcome, with the device) and
# benchmarks/results/gpu_logprob_<dtype>.json (ours beside the bare lm_head GEMM floor, TRL's and naive methods).
# On a machine without CUDA everything is skipped, nothing is written, and it exits 0: this script is also run
# there to check that it completes. It exits with the test suite's status.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PYTHON" - <<'PY'
import torch
print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
PY
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
else
    echo "No CUDA device: the GPU tests are skipped and no figures are written."
fi

echo "== GPU test suite (tests/gpu, -m gpu)"
"$PYTHON" -m pytest -q -m gpu tests/gpu -rs --junitxml "$TMP/gpu_tests.xml"
status=$?
[ "$status" -eq 5 ] && status=0  # no tests collected: nothing to run here
if [ -f "$TMP/gpu_tests.xml" ]; then
    "$PYTHON" benchmarks/gpu_report.py --junit "$TMP/gpu_tests.xml"
fi

echo "== Log-prob benchmark: ours vs the GEMM floor (bare lm_head forward + backward)"
bench=()
[ -n "${QUICK:-}" ] && bench+=(--quick)
"$PYTHON" benchmarks/gpu_report.py ${bench[@]+"${bench[@]}"} --dtype bfloat16 || status=$((status ? status : 1))
"$PYTHON" benchmarks/gpu_report.py ${bench[@]+"${bench[@]}"} --dtype float32 || status=$((status ? status : 1))
exit "$status"

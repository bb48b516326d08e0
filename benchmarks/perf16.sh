#!/usr/bin/env bash
# Issue 16's measurement: the six step benchmarks one after another, then the summary of the ratios it checks.
#
#   bash benchmarks/perf16.sh            # about 20 minutes on the 2-core development CPU, idle
#   SMOKE=1 bash benchmarks/perf16.sh    # checks the script: 1 step each, no warm-up, 16 completions a step instead
#                                        # of 64, DPO lengths up to 64; written to a temporary folder
#
# Writes benchmarks/results/{grpo_step,grpo_step_b64,grpo_step_long-prompt,dpo_step,dpo_step_varlen,sft_step}.json
# and perf16_summary.json. The step counts are sized to the budget: the heavy cases (64 completions a step, the long
# prompts, variable-length DPO) take 10-40 s a step in TRL on this CPU, so they run fewer, longer steps.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

if [[ -n "${SMOKE:-}" ]]; then
  export BENCHMARK_RESULTS_DIR=${BENCHMARK_RESULTS_DIR:-$(mktemp -d)}
  light="--steps 1 --warmup 0" heavy="--steps 1 --warmup 0" b64="--batch 16 --steps 1 --warmup 0"
  varlen="--max-len 64"
else
  light="--steps 8 --warmup 2" heavy="--steps 4 --warmup 1" b64="--batch 64 --steps 3 --warmup 1" varlen=""
fi

run() {
  echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $*"
  "$PYTHON" "$@"
  echo
}

start=$(date +%s)
# shellcheck disable=SC2086  # the step options are meant to split
run grpo_step.py $light
# shellcheck disable=SC2086
run grpo_step.py $b64
# shellcheck disable=SC2086
run grpo_step.py --case long-prompt $heavy
# shellcheck disable=SC2086
run dpo_step.py $light
# shellcheck disable=SC2086
run dpo_step.py --case varlen $heavy $varlen
# shellcheck disable=SC2086
run sft_step.py $light
echo "== all six in $(($(date +%s) - start)) s"
"$PYTHON" perf16_summary.py ${BENCHMARK_RESULTS_DIR:+--results-dir "$BENCHMARK_RESULTS_DIR"}

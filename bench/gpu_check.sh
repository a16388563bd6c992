#!/usr/bin/env bash
# The GPU check, in one go and in at most 8 minutes: what to run when a GPU machine is lent.
#
#   bash bench/gpu_check.sh [RESULTS_FOLDER]     (default: $OUT if set, else bench/results/gpu_check)
#
# 1. Stops at once, with a sentence and exit status 2, where torch sees no CUDA GPU.
# 2. Installs what it needs: the wheels in .whl/ when that folder exists (a lent machine reaches no package
#    registry; bench/RESULTS.md, "GPU check", lists the wheels carried), else `pip install -e .` unless
#    tunesmith already imports.
# 3. Runs the tests marked `cuda` (tests/test_cuda.py: bf16 training, bf16 against fp32, the fused paths,
#    packing against padding, QLoRA's 4-bit kernels, resume, and two GPUs where two exist).
# 4. Runs bench/gpu_throughput.py: tunesmith against Trainer + PEFT on a random Llama-3.2-1B-shaped model, MFU.
# Logs and the JSON go to the results folder (tests.log, bench.log, gpu.txt, gpu_throughput.json, logs/).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-bench/results/gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU found ($PY's torch says torch.cuda.is_available() is False, or torch is missing);" \
       "run this on a machine with an NVIDIA GPU (the device tool lends one)." >&2
  exit 2
fi

started=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tunesmith-site \
    .whl/*.whl || { echo "gpu_check: installing the wheels in .whl/ failed (above)." >&2; exit 1; }
  export PYTHONPATH="/tmp/tunesmith-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PY" -c "import tunesmith" 2>/dev/null; then
  "$PY" -m pip install -q -e . || { echo "gpu_check: pip install -e . failed (above)." >&2; exit 1; }
fi
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| transformers', transformers.__version__, '| peft', peft.__version__)"
  "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  nproc
} | tee "$RESULTS/gpu.txt"
echo "set-up took $(( $(date +%s) - started )) s"

timeout 150 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -o addopts="-ra --durations=10" \
  2>&1 | tee "$RESULTS/tests.log"
tests=${PIPESTATUS[0]}

timeout 200 "$PY" bench/gpu_throughput.py --out "$RESULTS/gpu_throughput.json" 2>&1 | tee "$RESULTS/bench.log"
bench=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests, bench exit $bench, $(( $(date +%s) - started )) s in all"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

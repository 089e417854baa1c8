#!/bin/bash
# One device call for the MoE core: GPU tests, tuning, layer and whole-model benchmarks.
# Usage (on the device machine, repo root): bash benchmarks/device_moe.sh [tune|notune]
# Logs and the tuned config table land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 150 python3 -m pytest -q -x tests/kernels tests/targets/test_moe_binding.py tests/targets/test_qwen3_moe.py 2>&1 \
    | tee "$OUT/tests.log" | tail -5
if [ "${1:-tune}" = tune ]; then
    timeout ${TUNE_S:-270} python3 -m eagle_trainer.kernels.moe.tune --out eagle_trainer/kernels/moe/configs 2>&1 | tee "$OUT/tune.log"
    cp eagle_trainer/kernels/moe/configs/*.json "$OUT/"
fi
timeout ${BENCH_S:-200} python3 benchmarks/moe.py --results "$OUT/RESULTS.md" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/moe.log" | tail -3
timeout 120 python3 benchmarks/moe_model.py --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/moe_model.log"
echo "=== summary"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -2
grep -E "^qwen3|TFLOP/s" "$OUT/tune.log" 2>/dev/null | cut -c1-110
grep -E " x *[0-9]" "$OUT/moe.log" | cut -c1-150; tail -1 "$OUT/moe_model.log"

#!/bin/bash
# H200 call: GPU tests of the kernels, tuning of all shipped MoE shapes, the layer benchmark. Logs in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q tests/kernels 2>&1 | tee "$OUT/tests.log" | tail -2
timeout 330 python3 -m eagle_trainer.kernels.moe.tune --out eagle_trainer/kernels/moe/configs 2>&1 | tee "$OUT/tune.log"
cp eagle_trainer/kernels/moe/configs/NVIDIA_H200*.json "$OUT/"
timeout 120 python3 benchmarks/moe.py --shapes qwen3_30b_a3b qwen3_next --tokens 4096 16384 --peers grouped_mm \
    --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/moe.log" | grep -E " x *[0-9]" | cut -c1-150

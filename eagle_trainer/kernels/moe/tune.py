"""Pick MoE tile configs on this GPU and write configs/<device>.json (run on each GPU kind we ship for).

    python -m eagle_trainer.kernels.moe.tune --shapes qwen3_30b_a3b qwen3_235b_a22b qwen3_next --out DIR

For each shape and M bucket the two GEMMs are timed separately (each with its own block N/K, warps, stages)
for every block of rows BM, on random bf16 data with uniform routing; the BM with the lowest sum wins. The
"batch_invariant" entry is the winner at the training shape (T = 16384 tokens).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from eagle_trainer.kernels.moe.configs import BUCKETS, CONFIG_DIR, device_key, shape_key
from eagle_trainer.kernels.moe.experts import moe_down_fwd_kernel, moe_gate_up_fwd_kernel
from eagle_trainer.kernels.moe.routing import align_pairs, moe_route

# name -> (num_experts, top_k, moe_intermediate_size, hidden_size)
SHAPES = {
    "qwen3_30b_a3b": (128, 8, 768, 2048),
    "qwen3_235b_a22b": (128, 8, 1536, 4096),
    "qwen3_next": (512, 10, 512, 2048),
}
TRAIN_TOKENS = 16384
MAX_TOKENS = 65536
SMEM_LIMIT = 220 * 1024


def gemm1_candidates(block_m: int):
    for bn, bk, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (3, 4)):
        if (block_m * bk + 2 * bn * bk) * 2 * stages > SMEM_LIMIT:
            continue
        if 2 * block_m * bn // (32 * warps) > 128:  # two fp32 accumulators per thread
            continue
        yield {"BN1": bn, "BK1": bk, "W1": warps, "S1": stages}


def gemm2_candidates(block_m: int):
    for bn, bk, warps, stages in itertools.product((64, 128, 256), (64, 128), (4, 8), (3, 4)):
        if (block_m * bk + bn * bk) * 2 * stages > SMEM_LIMIT:
            continue
        if block_m * bn // (32 * warps) > 128:
            continue
        yield {"BN2": bn, "BK2": bk, "W2": warps, "S2": stages}


def time_ms(fn) -> float:
    try:
        return do_bench(fn, warmup=5, rep=25, return_mode="median")
    except triton.runtime.errors.OutOfResources:
        return float("inf")


def tune_bucket(shape: tuple[int, int, int, int], num_tokens: int, block_ms=(64, 128), group_m: int = 8) -> dict:
    num_experts, top_k, inter, hidden = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    router = torch.randn(num_experts, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    down = torch.randn(num_experts, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    _, weights, ids = moe_route(x, router, top_k, True)
    num_pairs = ids.numel()
    best = None
    for block_m in block_ms:
        pairs, block_expert = align_pairs(ids, num_experts, block_m)
        num_blocks = block_expert.numel()
        y = torch.randn(num_blocks * block_m, inter, device="cuda", dtype=torch.bfloat16, generator=gen)
        o = torch.empty(num_pairs, hidden, device="cuda", dtype=torch.bfloat16)

        def gemm1(c):
            grid = (num_blocks * triton.cdiv(inter, c["BN1"]),)
            return lambda: moe_gate_up_fwd_kernel[grid](
                x, gate_up, gate_up[:, inter:], y, pairs, block_expert, num_pairs, num_blocks, hidden, inter,
                2 * inter * hidden, E=num_experts, TOPK=top_k,
                BM=block_m, BN=c["BN1"], BK=c["BK1"], GM=group_m, EVEN_K=hidden % c["BK1"] == 0, PREC="tf32", TMA=False, WS=False,
                num_warps=c["W1"], num_stages=c["S1"])

        def gemm2(c):
            grid = (num_blocks * triton.cdiv(hidden, c["BN2"]),)
            return lambda: moe_down_fwd_kernel[grid](
                y, down, o, pairs, block_expert, weights, num_pairs, num_blocks, hidden, inter, E=num_experts,
                BM=block_m, BN=c["BN2"], BK=c["BK2"], GM=group_m, EVEN_K=inter % c["BK2"] == 0, PREC="tf32", TMA=False, WS=False,
                num_warps=c["W2"], num_stages=c["S2"])

        t1, c1 = min((time_ms(gemm1(c)), sorted(c.items())) for c in gemm1_candidates(block_m))
        t2, c2 = min((time_ms(gemm2(c)), sorted(c.items())) for c in gemm2_candidates(block_m))
        if best is None or t1 + t2 < best[0]:
            best = (t1 + t2, {"BM": block_m, **dict(c1), **dict(c2), "GM": group_m}, t1, t2)
    total, config, t1, t2 = best
    flops = 2 * num_pairs * 3 * hidden * inter
    print(f"  T={num_tokens:6d} bucket={num_pairs // num_experts:5d}  gemm1 {t1:.3f} ms  gemm2 {t2:.3f} ms  "
          f"{flops / total / 1e9:.0f} TFLOP/s  {config}", flush=True)
    return config


def tune_shape(shape: tuple[int, int, int, int]) -> dict:
    num_experts, top_k = shape[0], shape[1]
    tuned, by_tokens = {}, {}
    for bucket in BUCKETS[::2]:  # 16, 64, 256, 1024, 4096 rows per expert; neighbours share
        num_tokens = bucket * num_experts // top_k
        if num_tokens > MAX_TOKENS:
            break
        tuned[bucket] = by_tokens[num_tokens] = tune_bucket(shape, num_tokens)
    table = {str(b): tuned[min(tuned, key=lambda t: abs(t.bit_length() - b.bit_length()))] for b in BUCKETS}
    invariant = by_tokens.get(TRAIN_TOKENS) or tune_bucket(shape, TRAIN_TOKENS)
    return {"buckets": table, "batch_invariant": invariant}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=CONFIG_DIR, help="directory for <device>.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    path = args.out / f"{device_key(device)}.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.shapes:
        num_experts, top_k, inter, hidden = SHAPES[name]
        print(f"{name}: E={num_experts} k={top_k} I={inter} H={hidden}", flush=True)
        table[shape_key(num_experts, inter, hidden)] = tune_shape(SHAPES[name])
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

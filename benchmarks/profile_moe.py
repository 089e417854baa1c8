"""Where the time of one MoE layer goes: per-kernel CUDA times of our forward, and config variants.

    python benchmarks/profile_moe.py [--shape qwen3_30b_a3b] [--tokens 16384] [--experts E]
Prints the profiler's kernel table for `moe_forward`, then the median time of each variant of the tuned
config (group size, TMA weight loads), then the routing/sort/sum overhead alone.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from eagle_trainer.kernels.moe import align_pairs, moe_experts, moe_route
from eagle_trainer.kernels.moe.configs import get_config
from eagle_trainer.kernels.moe.tune import SHAPES


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3_30b_a3b", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=None, help="routed experts (default: the shape's)")
    args = parser.parse_args(argv)
    num_experts, top_k, inter, hidden = SHAPES[args.shape]
    num_experts = args.experts or num_experts
    dev = torch.device("cuda")
    x = torch.randn(args.tokens, hidden, device=dev, dtype=torch.bfloat16)
    router = torch.randn(num_experts, hidden, device=dev, dtype=torch.bfloat16) * 0.02
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) * 0.02
    down = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) * 0.02
    base = get_config(dev, num_experts, inter, hidden, args.tokens * top_k, batch_invariant=True)

    def forward(config):
        _, w, ids = moe_route(x, router, top_k, True)
        return moe_experts(x, ids, w, gate_up, down, config=config)

    ref = forward(base)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            forward(base)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
    flops = 2 * args.tokens * top_k * 3 * hidden * inter
    variants = {"tuned": base, **{f"GM={g}": {**base, "GM": g} for g in (1, 4, 16, 32)},
                "TMA": {**base, "TMA": 1}, "TMA+WS": {**base, "TMA": 1, "WS": 1}, "WS": {**base, "WS": 1},
                **{f"sum {t}x{h} w{w}": {**base, "ST": t, "SH": h, "SW": w}
                   for t, h, w in ((1, 1024, 4), (1, 2048, 8), (2, 1024, 8), (4, 512, 4), (4, 1024, 8), (8, 256, 4))}}
    for name, config in variants.items():
        try:
            out = forward(config)
            ms = do_bench(lambda: forward(config), warmup=25, rep=200, return_mode="median")
            same = torch.equal(out, ref)
            print(f"{name:10s} {ms:7.3f} ms {flops / ms / 1e9:5.0f} TFLOP/s  bit-equal to tuned: {same}", flush=True)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            print(f"{name:10s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    _, w, ids = moe_route(x, router, top_k, True)
    print(f"route      {do_bench(lambda: moe_route(x, router, top_k, True), return_mode='median'):.3f} ms")
    print(f"align      {do_bench(lambda: align_pairs(ids, num_experts, base['BM']), return_mode='median'):.3f} ms")


if __name__ == "__main__":
    main()

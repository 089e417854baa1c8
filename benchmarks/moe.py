"""MoE layer forward: our Triton core vs HF transformers' `grouped_mm` and `eager` experts, same weights and inputs.

One Qwen3-MoE sparse block (router + routed experts) at Qwen3-30B-A3B, Qwen3-235B-A22B and Qwen3-Next shapes,
bf16, T tokens, uniform routing (random router) or skewed routing (4 hot experts every token picks).
Ours: `moe_forward` (fused router, sort, GEMM1+SwiGLU, GEMM2+weight, fp32 top-k sum). Peers: the HF block's
forward with config._experts_implementation set to the peer. Timed with triton.testing.do_bench (median).
Routed TFLOP/s = 2*T*k*3*H*I / time. Outputs must agree to bf16 precision (relative L2 < 2e-2).

    python benchmarks/moe.py [--tokens 4096 16384 65536] [--shapes ...] [--results PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, append_rows, row  # noqa: E402

from eagle_trainer.kernels.moe import moe_forward  # noqa: E402
from eagle_trainer.kernels.moe.tune import SHAPES  # noqa: E402

HOT_EXPERTS = 4


def build_block(shape, skewed: bool, seed: int = 0):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    num_experts, top_k, inter, hidden = shape
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts,
                            num_experts_per_tok=top_k, norm_topk_prob=True)
    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        if skewed:  # hot experts' router rows point along a direction every token shares
            direction = torch.randn(hidden, device="cuda")
            block.gate.weight[:HOT_EXPERTS] = (direction / direction.norm() * 4.0).to(torch.bfloat16)
            block.skew_direction = direction / direction.norm()
    return block


def inputs(block, num_tokens: int, skewed: bool):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(num_tokens, block.gate.hidden_dim, device="cuda", generator=gen)
    if skewed:
        x = x + 3.0 * block.skew_direction
    return x.to(torch.bfloat16)


def hf_forward(block, impl: str):
    block.experts.config._experts_implementation = impl
    return lambda x: block(x[None])[0]


def ours_forward(block):
    gate, experts = block.gate, block.experts
    return lambda x: moe_forward(x, gate.weight, experts.gate_up_proj, experts.down_proj, gate.top_k,
                                 gate.norm_topk_prob, batch_invariant=False)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--shapes", nargs="+", default=["qwen3_30b_a3b", "qwen3_next", "qwen3_235b_a22b"])
    parser.add_argument("--peers", nargs="+", default=["grouped_mm", "eager"])
    parser.add_argument("--eager-max-tokens", type=int, default=65536)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows, table = [], []
    for name in args.shapes:
        shape = SHAPES[name]
        num_experts, top_k, inter, hidden = shape
        for skewed in (False, True):
            block = build_block(shape, skewed)
            for num_tokens in args.tokens:
                x = inputs(block, num_tokens, skewed)
                ours = ours_forward(block)
                out = ours(x)
                t_ours = do_bench(lambda: ours(x), warmup=25, rep=200, return_mode="median")
                flops = 2 * num_tokens * top_k * 3 * hidden * inter
                case = f"{name} E{num_experts} k{top_k} I{inter} H{hidden} T={num_tokens} " \
                       f"{'skewed' if skewed else 'uniform'}"
                for peer in args.peers:
                    if peer == "eager" and num_tokens > args.eager_max_tokens:
                        continue
                    ref_fn = hf_forward(block, peer)
                    ref = ref_fn(x)
                    err = rel_err(out, ref)
                    if not err < 2e-2:
                        raise AssertionError(f"{case}: ours and HF {peer} disagree, relative error {err:.3g}")
                    t_peer = do_bench(lambda: ref_fn(x), warmup=25, rep=200, return_mode="median")
                    rows.append(row(case, f"{t_ours:.3f} ms ({flops / t_ours / 1e9:.0f} TFLOP/s)",
                                    f"{t_peer:.3f} ms ({flops / t_peer / 1e9:.0f} TFLOP/s)",
                                    f"HF transformers {peer}", t_peer / t_ours))
                    table.append(f"{case:58s} {peer:10s} ours {t_ours:8.3f} ms {flops / t_ours / 1e9:5.0f} TF/s  "
                                 f"peer {t_peer:8.3f} ms  x{t_peer / t_ours:5.2f}  err {err:.1e}")
                    print(table[-1], flush=True)
                del x
            del block
            torch.cuda.empty_cache()
    note = ("MoE layer forward (router + routed experts), bf16, `benchmarks/moe.py`. Ours: Triton core "
            "(eagle_trainer.kernels.moe, tuned configs, batch_invariant=False). Times are medians of "
            "triton.testing.do_bench; TFLOP/s counts routed expert FLOPs 2*T*k*3*H*I.")
    append_rows("moe", rows, note, args.results)
    print("\n".join(table))


if __name__ == "__main__":
    main()

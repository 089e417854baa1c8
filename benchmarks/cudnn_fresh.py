"""Attention at one fixed shape with new tensors every call: SDPA without cuDNN (eagle-train's default,
FlashAttention-2) vs cuDNN's fused attention, GPU time and host time per call.

Why: alone, at one shape, on the same tensors every call (benchmarks/next_attention.py), cuDNN's attention is twice
FlashAttention-2's speed on an H100; yet at full depth (train_online.py --arch qwen3_next --layers 48, B=1 T=4096)
EAGLE_CUDNN_SDPA=repeated made the step slower (176.8 ms against 157.8) and EAGLE_CUDNN_SDPA=1 made the target's
forward 138.6 ms against 99.3. Training hands every call new tensors (other addresses, the same layout): here each
call reads the next of --copies sets of inputs, so a cost that comes with new addresses shows, and the host's time
to issue each call is measured beside the GPU's (a host cost near or above the GPU time makes a step host-bound).

    target   Qwen3-Next's full attention as the bound target calls it (HF's sdpa function, no grad): causal GQA,
             16/2 heads of 256, q/k/v transposed views of [1, T, heads, 256]; ours: SDPA without cuDNN; peer:
             sdpa_kernel([CUDNN_ATTENTION])
    draft    the TTT step 0 of the draft, forward and backward (kernels/ttt_attention/step0: FlashCausal, ours, vs
             CudnnCausal) at --draft-heads heads/kv heads/head dim; 16/2/256 is the Qwen3-Next draft's (Causal
             keeps it on FlashAttention-2: cuDNN is taken for head dims up to 128), 32/8/128 a Qwen3-8B draft's

Times: CUDA events around --calls back-to-back calls after 5 warm-up calls (GPU ms a call), the host's time inside
those launches (host ms a call), median of 5 repeats. Outputs (and gradients) of both sides agree to bf16 precision
(checked).

    python benchmarks/cudnn_fresh.py [--tokens 4096] [--copies 8] [--calls 24]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, append_rows, row  # noqa: E402

NAME = "cudnn_fresh"
NOTE = ("`python benchmarks/cudnn_fresh.py`: attention at one fixed shape on new tensors every call, SDPA without "
        "cuDNN (FlashAttention-2, eagle-train's default) vs cuDNN's fused attention; ratio = peer GPU time / ours "
        "(> 1: ours faster).")


def timed(fn, inputs: list, calls: int, repeats: int = 5) -> tuple[float, float]:
    """(GPU ms, host ms) a call, medians over `repeats` runs of `calls` calls cycling through `inputs`."""
    for i in range(5):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        spent = 0.0
        start.record()
        for i in range(calls):
            t0 = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            spent += time.perf_counter() - t0
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / calls)
        host.append(spent * 1e3 / calls)
    return statistics.median(gpu), statistics.median(host)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def inputs_bthd(copies: int, tokens: int, heads: int, kv_heads: int, dim: int) -> list[tuple]:
    """`copies` sets of q, k, v as [1, heads, T, D] views of [1, T, heads, D] (the layout the models hand over)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    def one(h):
        return torch.randn(1, tokens, h, dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    return [(one(heads), one(kv_heads), one(kv_heads)) for _ in range(copies)]


@torch.no_grad()
def target_row(tokens: int, copies: int, calls: int) -> str:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    inputs = inputs_bthd(copies, tokens, 16, 2, 256)

    def ours(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def peer(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return ours(q, k, v)

    err = rel_err(peer(*inputs[0]), ours(*inputs[0]))
    if not err < 2e-2:
        raise AssertionError(f"cuDNN's target attention differs from FlashAttention-2's by {err:.3g}")
    (ours_gpu, ours_host), (peer_gpu, peer_host) = timed(ours, inputs, calls), timed(peer, inputs, calls)
    print(f"target T={tokens}: SDPA without cuDNN GPU {ours_gpu:.3f} ms host {ours_host:.3f} ms; cuDNN GPU "
          f"{peer_gpu:.3f} ms host {peer_host:.3f} ms (difference {err:.1g})", flush=True)
    case = (f"Qwen3-Next target attention forward, causal GQA 16/2 heads of 256, B=1 T={tokens}, bf16, new tensors "
            f"each call ({copies} sets; outputs within {err:.1g})")
    return row(case, f"{ours_gpu:.3f} ms GPU, {ours_host:.3f} ms host (SDPA without cuDNN)",
               f"{peer_gpu:.3f} ms GPU, {peer_host:.3f} ms host", "cuDNN fused attention (sdpa_kernel)",
               peer_gpu / ours_gpu)


def draft_row(tokens: int, copies: int, calls: int, heads: int, kv_heads: int, dim: int) -> str:
    from eagle_trainer.kernels.ttt_attention.step0 import CudnnCausal, FlashCausal
    inputs = inputs_bthd(copies, tokens, heads, kv_heads, dim)
    grad = torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    scale = dim ** -0.5

    def step(impl):
        def fn(q, k, v):
            out, lse, saved = impl.forward(q, k, v, scale)
            return (out, *impl.backward(grad, q, k, v, out, lse, saved, scale)[:3])
        return fn

    ours, peer = step(FlashCausal()), step(CudnnCausal())
    case = (f"TTT step 0 forward + backward, causal GQA {heads}/{kv_heads} heads of {dim}, B=1 T={tokens}, bf16, new "
            f"tensors each call ({copies} sets")
    try:
        errs = [rel_err(p, o) for p, o in zip(peer(*inputs[0]), ours(*inputs[0]))]
    except RuntimeError as e:  # a shape cuDNN has no engine for
        ours_gpu, ours_host = timed(ours, inputs, calls)
        print(f"draft {heads}/{kv_heads}x{dim}: cuDNN failed: {str(e).splitlines()[0]}", flush=True)
        return row(case + ")", f"{ours_gpu:.3f} ms GPU, {ours_host:.3f} ms host (FlashCausal)",
                   f"failed: {str(e).splitlines()[0][:80]}", "cuDNN fused attention (CudnnCausal)", None)
    if not max(errs) < 2e-2:
        raise AssertionError(f"cuDNN's step 0 (out, dq, dk, dv) differs from FlashAttention-2's by {errs}")
    (ours_gpu, ours_host), (peer_gpu, peer_host) = timed(ours, inputs, calls), timed(peer, inputs, calls)
    print(f"draft {heads}/{kv_heads}x{dim} T={tokens}: FlashCausal GPU {ours_gpu:.3f} ms host {ours_host:.3f} ms; "
          f"CudnnCausal GPU {peer_gpu:.3f} ms host {peer_host:.3f} ms (difference {max(errs):.1g})", flush=True)
    return row(f"{case}; outputs and gradients within {max(errs):.1g})",
               f"{ours_gpu:.3f} ms GPU, {ours_host:.3f} ms host (FlashCausal)",
               f"{peer_gpu:.3f} ms GPU, {peer_host:.3f} ms host", "cuDNN fused attention (CudnnCausal)",
               peer_gpu / ours_gpu)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--copies", type=int, default=8, help="input sets cycled through (new addresses a call)")
    parser.add_argument("--calls", type=int, default=24, help="calls a timed run")
    parser.add_argument("--draft-heads", default="16/2/256,32/8/128",
                        help="comma-separated heads/kv heads/head dim of the draft cases")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cudnn_fresh.py measures cuDNN's attention: it needs a CUDA GPU")
    from eagle_trainer.app.runtime import sdpa_without_cudnn
    sdpa_without_cudnn()  # ours as eagle-train runs it
    rows = [target_row(args.tokens, args.copies, args.calls)]
    for shape in args.draft_heads.split(","):
        heads, kv_heads, dim = (int(x) for x in shape.split("/"))
        rows.append(draft_row(args.tokens, args.copies, args.calls, heads, kv_heads, dim))
    append_rows(NAME, rows, NOTE, args.results)


if __name__ == "__main__":
    main()

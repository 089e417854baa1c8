"""Gated delta rule core, forward: ours (kernels/gdn/chunk.py) vs flash-linear-attention's chunk_gated_delta_rule.

Qwen3-Next-80B-A3B's linear attention shape: Hk 16 key heads, Hv 32 value heads, Dk = Dv = 128, bf16 q, k, v,
fp32 g, bf16 beta, q/k l2 norm in the kernel, no initial or final state. fla needs as many key heads as value
heads, so it gets q, k already repeated to 32 heads (as HF's Qwen3-Next does before calling it; the repeat is
not timed); ours reads the 16 key heads directly. Outputs must agree to bf16 precision (relative Frobenius
error < 1e-2). Times are medians of triton.testing.do_bench.

Bytes counted: q, k read once (Hk heads), v read, g (fp32) and beta read, o written: the least any
implementation must move; GB/s is that over the time (the core is bound by its sequential chunk walk, not by
bandwidth: the number says how far from the memory ceiling it is).

    python benchmarks/gdn.py [--cases 4x4096 1x65536] [--sweep] [--profile] [--results PATH]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, append_rows, row

from eagle_trainer.kernels.gdn import chunk as chunk_mod
from eagle_trainer.kernels.gdn import chunk_gated_delta_rule

HK, HV, D = 16, 32, 128


def inputs(batch: int, seq: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seq, HK, D, device="cuda", generator=gen).bfloat16()
    k = torch.randn(batch, seq, HK, D, device="cuda", generator=gen).bfloat16()
    v = torch.randn(batch, seq, HV, D, device="cuda", generator=gen).bfloat16()
    # g as Qwen3-Next makes it: -exp(A_log) * softplus(a + dt_bias), A_log ~ log U(1, 16), dt ~ small
    a_log = torch.empty(HV, device="cuda").uniform_(0, 16, generator=gen).clamp_min(1).log()
    g = -a_log.exp() * torch.nn.functional.softplus(torch.randn(batch, seq, HV, device="cuda", generator=gen) - 4)
    beta = torch.rand(batch, seq, HV, device="cuda", generator=gen).bfloat16()
    return q, k, v, g, beta


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def min_bytes(batch: int, seq: int) -> int:
    tokens = batch * seq
    return tokens * (2 * HK * D * 2 + HV * D * 2 + HV * 4 + HV * 2 + HV * D * 2)


def fla_fn(q, k, v, g, beta):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    group = HV // HK
    qr, kr = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    return lambda: fla_chunk(qr, kr, v, g, beta, output_final_state=False, use_qk_l2norm_in_kernel=True)[0]


def profile(fn, label):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    fn()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- {label}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def sweep(case, q, k, v, g, beta):
    """Our prepare kernel's (BK, warps) with the default recurrent launch, then the recurrent kernel's
    (BV, warps, stages) with the default prepare launch."""
    saved = dict(chunk_mod.RECURRENT_GPU), dict(chunk_mod.PREPARE_GPU)
    configs = [("prepare", {"BK": bk, "num_warps": w}) for bk, w in ((32, 1), (32, 2), (64, 1))]
    configs += [("recurrent", {"BV": bv, "HPP": hpp, "num_warps": 4, "num_stages": st})
                for bv, hpp, st in itertools.product((None, 32), (1, 2), (2, 3))]
    configs += [("recurrent", {"BV": bv, "HPP": 1, "num_warps": 4, "num_stages": 2}) for bv in (16, 64)]
    best = {}
    for kernel, launch in configs:
        chunk_mod.RECURRENT_GPU.update(saved[0])
        chunk_mod.PREPARE_GPU.update(saved[1])
        (chunk_mod.PREPARE_GPU if kernel == "prepare" else chunk_mod.RECURRENT_GPU).update(launch)
        ms = do_bench(lambda: chunk_gated_delta_rule(q, k, v, g, beta), warmup=10, rep=50, return_mode="median")
        print(f"sweep {case} {kernel} {launch}: {ms:.3f} ms", flush=True)
        if kernel not in best or ms < best[kernel][0]:
            best[kernel] = (ms, launch)
    chunk_mod.RECURRENT_GPU.update(saved[0])
    chunk_mod.PREPARE_GPU.update(saved[1])
    print(f"sweep {case} best: {best}")


def run_case(batch: int, seq: int, peer: str, show_profile: bool) -> tuple[str, str]:
    """Time ours and fla on one shape; -> (RESULTS row, table line)."""
    q, k, v, g, beta = inputs(batch, seq)

    def ours():
        return chunk_gated_delta_rule(q, k, v, g, beta)

    theirs = fla_fn(q, k, v, g, beta)
    err = rel_err(ours(), theirs())
    if not err < 1e-2:
        raise AssertionError(f"B={batch} T={seq}: ours and fla disagree, relative error {err:.3g}")
    t_ours = do_bench(ours, warmup=25, rep=200, return_mode="median")
    t_peer = do_bench(theirs, warmup=25, rep=200, return_mode="median")
    if show_profile:
        profile(ours, f"ours B={batch} T={seq}")
        profile(theirs, f"fla B={batch} T={seq}")
    tokens, nbytes = batch * seq, min_bytes(batch, seq)

    def fmt(ms):
        return f"{ms:.3f} ms ({tokens / ms / 1e3:.2f} M tok/s, {nbytes / ms / 1e6:.0f} GB/s)"

    label = f"B={batch} T={seq} Hk={HK} Hv={HV} D={D} bf16, l2norm in kernel"
    line = (f"{label:55s} ours {t_ours:7.3f} ms  fla {t_peer:7.3f} ms  x{t_peer / t_ours:5.2f}  "
            f"(ours/fla {t_ours / t_peer:.2f})  err {err:.1e}")
    return row(label, fmt(t_ours), fmt(t_peer), peer, t_peer / t_ours), line


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["4x4096", "1x65536"], help="BxT")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--sweep", action="store_true", help="time our launch configs (no rows written)")
    parser.add_argument("--profile", action="store_true", help="print per-kernel CUDA times of both")
    args = parser.parse_args(argv)
    import fla
    peer = f"fla {fla.__version__} chunk_gated_delta_rule"
    rows, table = [], []
    for case in args.cases:
        batch, seq = (int(x) for x in case.split("x"))
        if args.sweep:
            sweep(case, *inputs(batch, seq))
        else:
            result, line = run_case(batch, seq, peer, args.profile)
            rows.append(result)
            table.append(line)
            print(line, flush=True)
        torch.cuda.empty_cache()
    if rows:
        append_rows("gdn", rows, __doc__.split("\n\n")[1].replace("\n", " "), args.results)
    print("\n".join(table))


if __name__ == "__main__":
    main()

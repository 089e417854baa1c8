"""Soft cross-entropy rows with their gradient (kernels/soft_ce): ours vs torch.compile of the plain-torch reference.

The EAGLE-3 loss head (drafts/soft_ce.py) runs this once per logits chunk: bf16 draft logits z [C, V] and teacher
logits [C, V] in, per-row ce and argmax hit and dz = w (softmax(z) - softmax(teacher)) out, dz written over z.
Draft vocab V = 32000; C = 4096 (a T=4096 step's rows) and 16384. Both sides read the same inputs; the peer is
`torch.compile(soft_ce_rows_reference)` (Inductor's fused softmax/reductions). Outputs must agree: ce to 1e-4,
dz relative Frobenius error < 1e-2, hits equal. Times are medians of triton.testing.do_bench.

Bytes counted: z and the teacher read once, dz written (6 bytes per bf16 element): the least any implementation
moves. The ceiling beside it is a measured copy of the same bytes (read 4, write 2 per element: torch.add of z and
the teacher into a third buffer). --sweep times our kernel's block sizes and warp counts. A second row per C times the
kernel as the loss head runs it: given the teacher's row statistics, plus 1/K of forming them (K = 7 steps read each
teacher row).

    python benchmarks/soft_ce.py [--rows 4096 16384] [--sweep] [--results PATH]
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

from eagle_trainer.kernels.soft_ce import soft_ce_rows, soft_ce_rows_reference, teacher_stats

V = 32000
K = 7  # TTT steps: the loss head forms the teacher's row statistics once for K steps' chunks


def inputs(rows: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = (torch.randn(rows, V, device="cuda", generator=g) * 3).bfloat16()
    t = (torch.randn(rows, V, device="cuda", generator=g) * 3).bfloat16()
    w = torch.rand(rows, device="cuda", generator=g)
    return z, t, w


def bench(fn, *args, **kwargs) -> float:
    return do_bench(lambda: fn(*args, **kwargs))


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--sweep", action="store_true", help="time our block sizes and warp counts")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    peer = torch.compile(soft_ce_rows_reference)
    rows_out = []
    for rows in args.rows:
        z, t, w = inputs(rows)
        nbytes = 6 * rows * V
        out = torch.empty_like(z)
        ceiling = nbytes / (bench(torch.add, z, t, out=out) * 1e-3) / 1e9
        ref_dz, ref_ce, ref_hit = soft_ce_rows_reference(z, t, w)
        p_dz, p_ce, p_hit = peer(z, t, w)
        assert rel_err(p_dz, ref_dz) < 1e-2 and torch.allclose(p_ce, ref_ce, atol=1e-4, rtol=1e-5)
        assert torch.equal(p_hit, ref_hit)
        peer_ms = bench(peer, z, t, w)
        configs = (itertools.product([1024, 2048, 4096, 8192, 32768], [4, 8, 16, 32]) if args.sweep
                   else [(None, None)])
        for block, warps in configs:
            kwargs = {} if block is None else {"block": block, "num_warps": warps}
            dz, ce, hit = soft_ce_rows(z, t, w, **kwargs)
            torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-4)
            assert rel_err(dz, ref_dz) < 1e-2 and torch.equal(hit, ref_hit)
            ms = bench(soft_ce_rows, z, t, w, out=out, **kwargs)
            label = "default" if block is None else f"block {block} warps {warps}"
            print(f"rows {rows} V {V} {label:24s} ours {ms * 1e3:8.1f} us {nbytes / ms / 1e6:7.0f} GB/s   "
                  f"peer {peer_ms * 1e3:8.1f} us {nbytes / peer_ms / 1e6:7.0f} GB/s   copy ceiling {ceiling:5.0f} GB/s",
                  flush=True)
            if block is None:
                stats = teacher_stats(t)
                assert torch.equal(soft_ce_rows(z, t, w, stats=stats)[2], ref_hit)
                per_step = bench(soft_ce_rows, z, t, w, out=out, stats=stats) + bench(teacher_stats, t) / K
                print(f"rows {rows} V {V} in a K={K} loss head     ours {per_step * 1e3:8.1f} us", flush=True)
                rows_out.append(row(
                    f"C={rows} rows x V={V} bf16, per step of a K={K} loss head: row kernel given the teacher's "
                    f"statistics + 1/{K} of forming them; GB/s of 6 B/element", f"{per_step * 1e3:.0f} us "
                    f"({nbytes / per_step / 1e6:.0f} GB/s)", f"{peer_ms * 1e3:.0f} us ({nbytes / peer_ms / 1e6:.0f} "
                    "GB/s)", f"torch {torch.__version__} torch.compile(soft_ce_rows_reference)", peer_ms / per_step))
                rows_out.append(row(
                    f"C={rows} rows x V={V} bf16 (loss-head chunk), ce + hit + dz; GB/s of 6 B/element vs a copy "
                    f"ceiling of {ceiling:.0f} GB/s", f"{ms * 1e3:.0f} us ({nbytes / ms / 1e6:.0f} GB/s)",
                    f"{peer_ms * 1e3:.0f} us ({nbytes / peer_ms / 1e6:.0f} GB/s)",
                    f"torch {torch.__version__} torch.compile(soft_ce_rows_reference)", peer_ms / ms))
    if rows_out:
        append_rows("soft_ce", rows_out, path=args.results)


if __name__ == "__main__":
    main()

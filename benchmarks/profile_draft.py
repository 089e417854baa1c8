"""Where our EAGLE-3 draft step's time and memory go (benchmarks/draft_step.py's step, ours only).

    python benchmarks/profile_draft.py [--seqs 8192 16384] [--rows 30]
Per T: memory after the forward pass and the peaks of forward and backward (GiB, from this step's own
allocations on), then the profiler's kernel table of one step (fwd + bwd + AdamW) by device time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from draft_step import VD, build_ours, make_inputs, write_target_config  # noqa: E402


def memory_split(step) -> str:
    gib, base = 2**30, torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step.forward()
    fwd_peak, after_fwd = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    out.loss.backward()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    del out
    return (f"held before the step {base / gib:.2f} GiB; forward peak +{fwd_peak / gib:.2f}, after forward "
            f"+{after_fwd / gib:.2f}, backward peak +{bwd_peak / gib:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    hf_config = write_target_config(Path(tempfile.mkdtemp(prefix="profile_draft_")), tiny=False)
    for seq in args.seqs:
        inputs = make_inputs(hf_config, VD, seq, device, torch.bfloat16)
        step = build_ours(hf_config, inputs, VD, "fused", device)
        for _ in range(3):
            step()
        print(f"=== T={seq}: {memory_split(step)}", flush=True)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=90),
              flush=True)
        del step, inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

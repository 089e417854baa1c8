"""Where our EAGLE-3 draft step's time and memory go (benchmarks/draft_step.py's step, ours only).

    python benchmarks/profile_draft.py [--seqs 8192 16384] [--rows 30] [--snapshot] [--gaps] [--no-recompute]
                                       [--warmup 40]
Per T: memory after the forward pass and the peaks of forward and backward (GiB, from this step's own
allocations on), then one step's device time by kernel family and the profiler's kernel table of one step
(fwd + bwd + AdamW) by device time. With --snapshot, also what is alive at the step's peak: the CUDA caching
allocator's history of one step is replayed to the moment of most memory allocated, and the blocks alive then are
summed by the source line that allocated them (the innermost frame in eagle_trainer/ or benchmarks/; backward's
allocations carry no Python frame). With --gaps, where the GPU waits on the host in the second of two steps run
back to back: the idle stretches between kernels, largest first, each with the kernel after it, the host call
that launched that kernel late, and the synchronising calls made while the GPU waited.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from draft_step import VD, build_ours, make_inputs, time_steps, write_target_config


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


def _site(frames: list[dict]) -> str:
    """The allocating line: the innermost frame in our code, else the innermost frame."""
    for f in frames:
        if "eagle_trainer" in f["filename"] or "benchmarks" in f["filename"]:
            return f"{Path(f['filename']).name}:{f['line']} {f['name']}"
    return f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "(no frame)"


def live_at_peak(step, rows: int) -> str:
    """Replay one step's allocator trace; the blocks alive at its peak, summed by allocating line (GiB)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, best, best_live = {}, 0, -1, {}
    for event in snapshot["device_traces"][torch.cuda.current_device()]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
            total += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
        if total > best:
            best, best_live = total, dict(live)
    by_site: dict[str, list[int]] = {}
    for size, site in best_live.values():
        by_site.setdefault(site, []).append(size)
    gib, mib = 2**30, 2**20
    lines = [f"alive at the step's peak (allocated during the step): {best / gib:.3f} GiB"]
    for site, sizes in sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        common = ", ".join(f"{n} x {size / mib:.1f} MiB" for size, n in Counter(sizes).most_common(3))
        lines.append(f"  {sum(sizes) / gib:7.3f} GiB  {site}  ({common})")
    return "\n".join(lines)


GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNCS = ("Synchronize", "cudaMemcpy", "cuMemcpy", "cudaFree", "cudaMalloc")


def trace_steps(step):
    """Two runs of `step` back to back under the profiler (CPU ops with Python frames, CUDA kernels), as a training
    loop runs them -> (the trace's complete events, kernel launches by correlation id, host ops and Python frames,
    the GPU work the second run's host calls launched, in time order)."""
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True,
                     record_shapes=True) as prof:
            step()
            with torch.profiler.record_function("second step"):
                step()
            torch.cuda.synchronize()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    second = next(e for e in events if e["name"] == "second step" and e.get("cat") != "gpu_user_annotation")
    lo, hi = second["ts"], second["ts"] + second["dur"]

    def in_second(e):
        launch = launches.get(e.get("args", {}).get("correlation"))
        return launch is not None and lo <= launch["ts"] <= hi
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS and in_second(e)), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in ("cpu_op", "python_function")]
    return events, launches, host, gpu


def _launched_in(kernel, launches, host, code=("eagle_trainer", "benchmarks")):
    """The host ops around a kernel's launch, innermost first, and the innermost frame of `code`."""
    launch = launches.get(kernel.get("args", {}).get("correlation"))
    at = launch["ts"] if launch else kernel["ts"]
    around = sorted((h for h in host if h["ts"] <= at <= h["ts"] + h["dur"]), key=lambda h: h["dur"])
    ours = [h["name"] for h in around if any(c in h["name"] for c in code)]
    return around, (ours[0] if ours else "?")


def kernel_sites(trace, rows: int) -> str:
    """The second traced run's device time (`trace_steps`) by (kernel, the aten op that launched it, the innermost
    line of ours or of transformers' modeling code around it), largest first."""
    _, launches, host, gpu = trace
    sites: dict[str, list[float]] = {}
    for e in gpu:
        around, site = _launched_in(e, launches, host, ("eagle_trainer", "benchmarks", "modeling_"))
        op = next((h["name"] for h in around if h["name"].startswith("aten::")), "")
        key = f"{e['name'][:44]:44s} {op[:24]:24s} {site[-64:]}"
        sites.setdefault(key, []).append(e["dur"])
    lines = [f"device time by launch site ({sum(map(sum, sites.values())) / 1e3:.2f} ms):"]
    lines += [f"  {sum(d) / 1e3:6.2f} ms {len(d):4d} x  {key}"
              for key, d in sorted(sites.items(), key=lambda kv: -sum(kv[1]))[:rows]]
    return "\n".join(lines)


def idle_gaps(trace, rows: int, min_us: float = 20.0) -> str:
    """The GPU's idle stretches within the second of two traced steps (`trace_steps`: the kernels its host calls
    launched), and the copy kernels it ran."""
    events, launches, host, gpu = trace
    syncs = [e for e in events
             if e.get("cat") in ("cuda_runtime", "cuda_driver") and any(s in e["name"] for s in SYNCS)]
    gaps, end = [], gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        if e["ts"] - end > min_us:
            gaps.append((e["ts"] - end, end, e))
        end = max(end, e["ts"] + e["dur"])
    span = end - gpu[0]["ts"]
    busy = sum(e["dur"] for e in gpu)
    idle = sum(g[0] for g in gaps)
    lines = [(f"GPU span of the step {span / 1e3:.2f} ms, kernels {busy / 1e3:.2f} ms; {len(gaps)} idle stretches "
              f"over {min_us:.0f} us, {idle / 1e3:.2f} ms in all")]
    for gap, start, kernel in sorted(gaps, key=lambda g: -g[0])[:rows]:
        around, site = _launched_in(kernel, launches, host)
        waited = sorted({s["name"] for s in syncs if start <= s["ts"] + s["dur"] and s["ts"] <= kernel["ts"]})
        lines.append(f"  {gap / 1e3:6.2f} ms before {kernel['name'][:50]!r}; launched in "
                     f"{site[-60:]} / {' < '.join(h['name'][:40] for h in around[:2])}"
                     f"{'; host waited in ' + ', '.join(waited) if waited else ''}")
    copies: dict[str, list[float]] = {}  # copy kernels by the host code that launched them
    for e in gpu:
        if e["name"].startswith("triton_") or not any(w in e["name"] for w in ("Memcpy", "copy_kernel", "CatArray")):
            continue  # (Inductor's fused kernels are named after their ops, "_to_copy" among them)
        around, site = _launched_in(e, launches, host)
        ops = [h for h in around if h["name"].startswith("aten::")][:2]
        dims = ops[0].get("args", {}).get("Input Dims", "") if ops else ""
        key = (f"{(site if site != '?' else '(backward)')[-60:]} / {' < '.join(h['name'] for h in ops)} {dims} "
               f"[{e['name'][:40]}]")
        copies.setdefault(key, []).append(e["dur"])
    lines.append(f"copy kernels: {sum(map(sum, copies.values())) / 1e3:.2f} ms")
    for key, durations in sorted(copies.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"  {sum(durations) / 1e3:6.2f} ms {len(durations):4d} x  {key}")
    return "\n".join(lines)


FAMILIES = (("GEMM (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma")), ("attention (cuDNN/flash)", ("sdpa", "flash", "fmha")),
            ("soft-CE, row statistics (ours)", ("soft_ce", "row_stats")), ("TTT merge (ours)", ("merge", "ttt_")),
            ("Inductor (compiled elementwise)", ("triton_",)), ("AdamW", ("multi_tensor", "adam")),
            ("copy/memset", ("Memcpy", "Memset", "copy_kernel", "CatArray")))


def kernel_families(prof, families=FAMILIES) -> str:
    """Device time of one profiled step summed by kernel family (the first whose keys name the kernel), then the
    remainder by kernel name."""
    totals: dict[str, float] = {}
    other: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us <= 0:
            continue
        family = next((f for f, keys in families if any(k in e.key for k in keys)), None)
        if family is None:
            other[e.key[:70]] = other.get(e.key[:70], 0.0) + us
            family = "other"
        totals[family] = totals.get(family, 0.0) + us
    lines = [f"kernel families: {sum(totals.values()) / 1e3:.2f} ms"]
    lines += [f"  {us / 1e3:7.2f} ms  {family}" for family, us in sorted(totals.items(), key=lambda kv: -kv[1])]
    lines += [f"      {us / 1e3:7.2f} ms  {name}" for name, us in sorted(other.items(), key=lambda kv: -kv[1])[:8]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--snapshot", action="store_true", help="also sum what is alive at the peak by source line")
    parser.add_argument("--gaps", action="store_true", help="also list where the GPU idles within a step")
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                        help="draft.recompute (default on)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before timing; from the 33rd at one T the "
                        "step-0 attention is cuDNN's (kernels/utils.RepeatedShapes): --warmup 40 profiles that "
                        "steady state")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    hf_config = write_target_config(Path(tempfile.mkdtemp(prefix="profile_draft_")), tiny=False)
    for seq in args.seqs:
        inputs = make_inputs(hf_config, VD, seq, device, torch.bfloat16)
        step = build_ours(hf_config, inputs, VD, "fused", device, args.recompute)
        for _ in range(args.warmup):
            step()
        times = time_steps(step, device, 5)
        print(f"=== T={seq}: {memory_split(step)}; step {statistics.median(times):.1f} ms (median of 5)", flush=True)
        if args.snapshot:
            print(live_at_peak(step, args.rows), flush=True)
        if args.gaps:
            print(idle_gaps(trace_steps(step), args.rows), flush=True)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(kernel_families(prof), flush=True)
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=90),
              flush=True)
        del step, inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

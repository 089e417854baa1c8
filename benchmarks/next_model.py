"""Whole-target forward: a 4-layer Qwen3-Next-80B-A3B-shaped Qwen3NextForCausalLM, our kernels vs HF transformers.

The real 80B-A3B config (tests/fixtures) cut to `--layers` decoder layers (4: three gated delta net layers, then
one gated full-attention layer); 512 experts top-10 plus the gated shared expert in every layer. Random bf16
weights N(0, 0.02), except the ones HF's `_init_weights` gives their own init (the GDN's A_log and dt_bias, the
zero-centred and gated RMSNorm weights), so the GDN decays and the norm scales are realistic. B=4 sequences of
T=4096 tokens, sdpa attention, the backbone forward under no_grad (hidden states, no lm_head: the frozen target's
job in training). One model object; the variants are switched with the Qwen3-Next entry's bind function:

    peer            HF transformers: moe grouped_mm, HF norms, HF's GDN (flash-linear-attention's
                    chunk_gated_delta_rule and causal-conv1d's causal_conv1d_fn where importable, else HF's torch)
    moe             our MoE core (router, routed experts and the gated shared expert in one fixed-order sum)
    moe+gdn         ... and our GDN core
    moe+gdn+norm    ... and our zero-centred fused RMSNorm (all of ours)

Correctness: the same weights in fp32 through HF's own code are the truth; each variant's last hidden state must
be within 1.5x the peer's relative Frobenius error of it (with 512 near-uniform random router logits, bf16 rounding
flips some top-10 choices in either bf16 path, so the two bf16 paths are not held to each other). Tokens/s =
B*T / median; TFLOP/s and MFU by eagle_trainer.flops (the trainer's counter) against the dense bf16 peak.

    python benchmarks/next_model.py [--layers 4] [--batch 4] [--seq 4096] [--results PATH] [--profile]
    python benchmarks/next_model.py --device cpu --tiny     # dry run: tiny widths, fp32, Triton interpreted
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, add_run_args, append_rows, row

from eagle_trainer import registry
from eagle_trainer.flops import TargetFlops, peak_tflops

FIXTURE = Path(__file__).parents[1] / "tests/fixtures/qwen3_next_80b_a3b_config.json"
# widths for a CPU dry run of this script (the layer pattern, k = 10 and the blocks stay)
TINY = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32, "num_experts": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "vocab_size": 1024}
# name -> (moe_impl, norm_impl, gdn_impl); the first is the peer
VARIANTS = {
    "peer": ("grouped_mm", "hf", "hf"),
    "moe": ("triton", "hf", "hf"),
    "moe+gdn": ("triton", "hf", "triton"),
    "moe+gdn+norm": ("triton", "triton", "triton"),
}
LABELS = {"moe": "our MoE core; HF GDN and RMSNorm", "moe+gdn": "our MoE + GDN cores; HF RMSNorm",
          "moe+gdn+norm": "our MoE + GDN cores + zero-centred fused RMSNorm and attention glue (all ours)"}
# HF's GDN functions that look for an optimised package at import (use_kernel_func_from_hub_with_fallback)
HF_GDN_FUNCTIONS = ("torch_chunk_gated_delta_rule", "causal_conv1d_fn")


def hf_gdn_paths() -> dict[str, str]:
    """Which code HF's Qwen3-Next GDN forward calls for each of HF_GDN_FUNCTIONS: the decorator picked either the
    package's function (fla.ops.gated_delta_rule.chunk_gated_delta_rule, causal_conv1d.causal_conv1d_fn) or
    its own torch fallback when it decorated them, at import."""
    from transformers.models.qwen3_next import modeling_qwen3_next as hf
    paths = {}
    for name in HF_GDN_FUNCTIONS:
        fn = getattr(hf, name)
        try:
            impl = inspect.getclosurevars(fn).nonlocals.get("implementation")
        except TypeError:  # not a plain function: another wrapper (e.g. a hub kernel) replaced HF's
            impl = None
        if impl is None:
            paths[name] = f"unknown ({type(fn).__name__} {getattr(fn, '__module__', '?')})"
        elif impl is getattr(fn, "__wrapped__", None) or impl.__module__ == hf.__name__:
            paths[name] = "HF torch fallback"
        else:
            paths[name] = f"{impl.__module__}.{impl.__qualname__}"
    return paths


def peer_name(paths: dict[str, str]) -> str:
    if paths["torch_chunk_gated_delta_rule"].startswith("fla."):
        return "HF transformers (fla chunk_gated_delta_rule + grouped_mm)"
    return "HF transformers (torch GDN fallback: fla NOT importable + grouped_mm)"


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3NextConfig
    fields = json.loads(FIXTURE.read_text())
    fields["num_hidden_layers"] = args.layers
    if args.tiny:
        fields.update(TINY)
    config = Qwen3NextConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # HF's _init_weights ran
    keep = {id(p) for m in model.modules() if type(m).__name__ in ("Qwen3NextRMSNorm", "Qwen3NextRMSNormGated")
            for p in m.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) not in keep and not name.endswith(("A_log", "dt_bias")):
                p.normal_(0, 0.02)
    return model, config


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@torch.no_grad()
def fp32_truth(model, ids: torch.Tensor) -> torch.Tensor:
    """The same weights in fp32 through HF's own code (HF's experts loop, norms and GDN): what both bf16 paths
    approximate."""
    import copy

    from eagle_trainer.targets import bind_qwen3_next
    ref = copy.deepcopy(model).float()
    bind_qwen3_next(ref, SimpleNamespace(moe_impl="hf", moe_batch_invariant=True, norm_impl="hf", gdn_impl="hf",
                                         attn_layer_impl="hf"))
    out = ref.model(input_ids=ids, use_cache=False).last_hidden_state.float()
    del ref
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def bench(fn, device: torch.device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=50, rep=500, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile_table(fn) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="default 4 (--tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="default 4096 (--tiny: 80)")
    add_run_args(parser, "cpu: fp32 with the Triton kernels interpreted (a dry run; use with --tiny)",
                 "print the CUDA kernel table of each variant")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (80 if args.tiny else 4096)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when our kernels are first imported (inside the forwards)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's bf16 tl.dot is wrong
    import transformers
    import triton

    from eagle_trainer.targets import bind_qwen3_next
    versions = f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}"
    paths = hf_gdn_paths()
    peer = peer_name(paths)
    gdn_text = ", ".join(f"{k} = {v}" for k, v in paths.items())
    print(versions)
    print(f"HF GDN path: {gdn_text}")
    if "fla NOT" in peer:
        print("WARNING: flash-linear-attention is not importable: the peer runs HF's torch chunk_gated_delta_rule, "
              "not fla's kernel; the comparison is against HF's slow fallback", file=sys.stderr)

    model, config = build_model(args, device, dtype)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    # the backbone's forward FLOPs by the trainer's counter (no lm_head / teacher), for TFLOP/s and MFU
    info = registry.target_spec("Qwen3NextForCausalLM").read_info("Qwen3NextForCausalLM", config)
    flops = args.batch * TargetFlops.from_target(info, config).forward(args.seq, draft_vocab=0, argmax_mask=False)
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None

    def rate(ms: float) -> str:
        tflops = flops / ms / 1e9
        return f"{tflops:.0f} TFLOP/s" + (f", MFU {tflops / peak:.0%}" if peak else "")
    # no cache, as the frozen target runs (a cache makes HF keep conv/recurrent states and bypasses our GDN core)
    fn = lambda: model.model(input_ids=ids, use_cache=False).last_hidden_state
    results = {}
    for name, (moe_impl, norm_impl, gdn_impl) in VARIANTS.items():
        cfg = SimpleNamespace(moe_impl=moe_impl, moe_batch_invariant=True, norm_impl=norm_impl, gdn_impl=gdn_impl,
                              attn_layer_impl=norm_impl)  # the attention layers' q/k norms go with the norms
        bound = bind_qwen3_next(model, cfg)
        assert bound == {"moe": moe_impl, "norm": norm_impl, "gdn": gdn_impl, "attn": norm_impl}, bound
        out = fn()
        ms = bench(fn, device)
        results[name] = (out, ms)
        if args.profile and device.type == "cuda":
            print(f"--- {name}\n{profile_table(fn)}")
        print(f"{name:13s} {ms:9.2f} ms  {tokens / ms * 1e3:12,.0f} tokens/s", flush=True)

    truth = fp32_truth(model, ids)
    t_peer = results["peer"][1]
    err_peer = rel_err(results["peer"][0], truth)
    shape = "tiny Qwen3-Next" if args.tiny else "Qwen3-Next-80B-A3B shape"
    num_full = config.layer_types.count("full_attention")
    rows, table = [], [("peer", t_peer, 1.0, err_peer)]
    for name, label in LABELS.items():
        out, t_ours = results[name]
        err = rel_err(out, truth)
        # Both bf16 paths approximate the fp32 model; with 512 near-uniform random router logits, bf16 rounding
        # flips some top-10 choices in either path, so each is held to the fp32 truth, not to the other.
        if not err <= 1.5 * err_peer + 1e-3:
            raise AssertionError(f"{name}: error vs the fp32 model {err:.3g}, the peer's {err_peer:.3g}")
        table.append((name, t_ours, t_peer / t_ours, err))
        case = (f"{shape}, {args.layers} layers ({args.layers - num_full} GDN + {num_full} full attention), "
                f"B={args.batch} T={args.seq}, sdpa, backbone; {label}; peer's GDN: {gdn_text}; error vs fp32 "
                f"ours {err:.1e}, peer {err_peer:.1e}")
        rows.append(row(case, f"{t_ours:.2f} ms ({tokens / t_ours * 1e3:,.0f} tok/s, {rate(t_ours)})",
                        f"{t_peer:.2f} ms ({tokens / t_peer * 1e3:,.0f} tok/s, {rate(t_peer)})", peer,
                        t_peer / t_ours))
    results_path = args.results if args.tiny else (args.results or RESULTS)
    if results_path is not None:
        append_rows("next_model", rows, "Frozen-target forward, `benchmarks/next_model.py`: one model object, "
                    "kernels switched with the Qwen3-Next entry's bind function (ours: batch-invariant MoE config; "
                    "the shared expert in the MoE core's sum).", results_path)
    print(f"\n{shape}, {versions}; peer = {peer}")
    print("| variant | ms | tokens/s | rate | x peer | err vs fp32 |\n|---|---|---|---|---|---|")
    for name, ms, ratio, err in table:
        print(f"| {name} | {ms:.2f} | {tokens / ms * 1e3:,.0f} | {rate(ms)} | {ratio:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()

"""Whole-target forward: a 4-layer Qwen3-30B-A3B-shaped Qwen3MoeForCausalLM with our MoE core vs HF `grouped_mm`.

Random bf16 weights, B=4 sequences of T=4096 tokens, sdpa attention, the backbone forward (hidden states, no
lm_head: the frozen target's job in training). Both runs use the same model object, switched with
`targets.moe.bind_moe`; last hidden states must agree to bf16 precision. Tokens/s = B*T / median time.

    python benchmarks/moe_model.py [--layers 4] [--batch 4] [--seq 4096] [--results PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, append_rows, row  # noqa: E402

from eagle_trainer.targets import bind_qwen3_moe  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "tests/fixtures/qwen3_30b_a3b_config.json"


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="print the kernel table of each forward")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    fields = json.loads(FIXTURE.read_text())
    fields["num_hidden_layers"] = args.layers
    fields["max_window_layers"] = args.layers
    config = Qwen3MoeConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    for p in model.parameters():
        p.normal_(0, 0.02)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda")
    results = {}
    variants = {"grouped_mm": ("grouped_mm", "hf"), "triton": ("triton", "hf"), "triton+norm": ("triton", "triton")}
    for impl, (moe_impl, norm_impl) in variants.items():
        cfg = SimpleNamespace(moe_impl=moe_impl, moe_batch_invariant=True, norm_impl=norm_impl)
        assert bind_qwen3_moe(model, cfg) == {"moe": moe_impl, "norm": norm_impl}
        fn = lambda: model.model(input_ids=ids).last_hidden_state  # noqa: E731
        out = fn()
        ms = do_bench(fn, warmup=50, rep=500, return_mode="median")
        results[impl] = (out, ms)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))
        print(f"{impl:10s} {ms:8.2f} ms  {args.batch * args.seq / ms * 1e3:,.0f} tokens/s", flush=True)
    ref, t_peer = results["grouped_mm"]
    tokens = args.batch * args.seq
    rows = []
    for impl, label in (("triton", "our MoE core, HF RMSNorm"), ("triton+norm", "our MoE core + fused RMSNorm")):
        out, t_ours = results[impl]
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        if not err < 2e-2:
            raise AssertionError(f"{impl} and HF grouped_mm disagree: relative error {err:.3g}")
        case = f"Qwen3-30B-A3B shape, {args.layers} layers, B={args.batch} T={args.seq}, sdpa, backbone; {label}"
        rows.append(row(case, f"{t_ours:.2f} ms ({tokens / t_ours * 1e3:,.0f} tok/s)",
                        f"{t_peer:.2f} ms ({tokens / t_peer * 1e3:,.0f} tok/s)", "HF transformers grouped_mm",
                        t_peer / t_ours))
        print(f"{label}: {t_ours:.2f} ms vs HF grouped_mm {t_peer:.2f} ms, x{t_peer / t_ours:.2f}, "
              f"rel err {err:.1e}")
    append_rows("moe_model", rows, "Frozen-target forward, `benchmarks/moe_model.py`: one model object, kernels "
                "switched with the Qwen3-MoE entry's bind function (ours: batch-invariant MoE config).", args.results)


if __name__ == "__main__":
    main()

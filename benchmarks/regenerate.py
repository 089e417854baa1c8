"""Regeneration throughput: our decode loop (data/regenerate.py) vs HF `model.generate`, greedy, bf16.

A random Qwen3-30B-A3B-shaped Qwen3MoeForCausalLM (the real config, tests/fixtures, cut to `--layers` decoder
layers), built on the GPU with HF's init; lm_head rescaled so that logits have a standard deviation of about 6 (a
random model's are near-uniform, and greedy decoding would then follow bf16 rounding noise). B prompts of 112..128
random ids, left-padded; every row decodes exactly `--new-tokens` ids (no stop ids, no eos: both sides). One model
object, its kernels switched with the Qwen3-MoE entry's bind function:

    ours    decode(..., mode) of data/regenerate.py with our Triton MoE core and fused RMSNorm (what the target gets
            on a GPU by default); mode graph: a static KV cache, the decode step captured once per batch as a CUDA
            graph and replayed; eager: HF's DynamicCache, one eager forward a step
    peer    HF transformers `model.generate` (DynamicCache) with its default grouped_mm experts and HF's RMSNorm

Tokens/s = B * new tokens / wall time of the whole call (prefill, and our graph capture, included; one warm-up
call each first). Agreement: the fraction of rows whose first 32 greedy ids are the same on both sides (bf16: the
two paths round differently, and a near-tie in the logits or the router sends a row another way); beside it the same
for our loop run with HF's kernels (eager decode, grouped_mm experts, HF's RMSNorm), which isolates the loop.

    python benchmarks/regenerate.py [--layers 48] [--batch 32 64 128] [--new-tokens 512] [--decode graph eager]
    python benchmarks/regenerate.py --quick                 # 8 layers, B=32, 128 new tokens
    python benchmarks/regenerate.py --device cpu --tiny     # dry run: tiny widths, fp32, Triton interpreted
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, add_run_args, append_rows, row  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "tests/fixtures/qwen3_30b_a3b_config.json"
# widths for a CPU dry run of this script
TINY = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8,
        "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 1024, "bos_token_id": None, "eos_token_id": None}
AGREE_TOKENS = 32
LOGIT_STD = 6.0


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    fields = json.loads(FIXTURE.read_text())
    fields.update(num_hidden_layers=args.layers, max_window_layers=args.layers)
    if args.tiny:
        fields.update(TINY)
    config = Qwen3MoeConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(LOGIT_STD / (head.float().std() * config.hidden_size**0.5))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, config


def make_prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(112, 129, (batch,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def left_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def bind(model, moe_impl: str, norm_impl: str) -> None:
    from eagle_trainer.targets import bind_qwen3_moe
    cfg = SimpleNamespace(moe_impl=moe_impl, moe_batch_invariant=True, norm_impl=norm_impl)
    assert bind_qwen3_moe(model, cfg) == {"moe": moe_impl, "norm": norm_impl}


def timed(fn, device: torch.device):
    """(fn's result, seconds), the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def ours(model, prompts: list[list[int]], new_tokens: int, mode: str) -> list[list[int]]:
    from eagle_trainer.data.regenerate import decode
    return decode(model, prompts, [new_tokens] * len(prompts), stop_ids=[], pad_id=0,
                  pick=lambda logits, step: logits.argmax(-1), mode=mode)


@torch.no_grad()
def peer(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> list[list[int]]:
    ids, mask = left_padded(prompts, device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def agreement(a: list[list[int]], b: list[list[int]], n: int = AGREE_TOKENS) -> float:
    return sum(x[:n] == y[:n] for x, y in zip(a, b)) / len(a)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 48, the real depth)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 32 64 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="ids each row decodes (default 512)")
    parser.add_argument("--decode", nargs="+", default=None, choices=["graph", "static", "eager"],
                        help="our decode modes to time (default graph; --device cpu: static)")
    parser.add_argument("--quick", action="store_true", help="8 layers, B=32, 128 new tokens")
    add_run_args(parser, "cpu: fp32 with the Triton kernels interpreted (a dry run; use with --tiny)",
                 "print the CUDA kernel table of one of our decode steps")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or args.tiny
    args.layers = args.layers or (2 if args.tiny else 8 if quick else 48)
    args.batch = args.batch or ([2] if args.tiny else [32] if quick else [32, 64, 128])
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128 if quick else 512)
    args.decode = args.decode or (["graph"] if device.type == "cuda" else ["static"])
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when our kernels are first imported (inside the forwards)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's bf16 tl.dot is wrong
    peer_moe = "grouped_mm" if device.type == "cuda" else "hf"
    import transformers
    import triton
    versions = f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}"
    print(versions)

    model, config = build_model(args, device, dtype)
    shape = "tiny Qwen3-MoE" if args.tiny else "Qwen3-30B-A3B shape"
    warm = [make_prompts(min(args.batch), config.vocab_size, seed=1), min(8, args.new_tokens)]
    table = []
    results_path = args.results if args.tiny else (args.results or RESULTS)

    def record(line: str) -> None:  # each row as soon as it is measured: a run cut short keeps what it measured
        if results_path is not None:
            append_rows("regenerate", [line], "Regeneration decode, `benchmarks/regenerate.py`: our loop "
                        "(data/regenerate.py `decode`) vs HF `model.generate`, one model object, greedy, every row "
                        "decoding the same number of ids; tokens/s over the whole call (prefill included).",
                        results_path)
    for batch in args.batch:
        prompts = make_prompts(batch, config.vocab_size)
        tokens = batch * args.new_tokens
        bind(model, peer_moe, "hf")
        peer(model, *warm, device)
        peer_ids, t_peer = timed(lambda: peer(model, prompts, args.new_tokens, device), device)
        free(device)
        # our loop with the peer's kernels: agreement here is the loop's, not the kernels' rounding
        same_kernels = agreement(ours(model, prompts, min(AGREE_TOKENS, args.new_tokens), "eager"), peer_ids)
        free(device)
        bind(model, "triton", "triton")
        for mode in args.decode:
            ours(model, *warm, mode)
            our_ids, t_ours = timed(lambda: ours(model, prompts, args.new_tokens, mode), device)
            free(device)
            assert all(len(r) == args.new_tokens for r in our_ids), "a row stopped early"
            agree = agreement(our_ids, peer_ids)
            ratio = t_peer / t_ours
            table.append((batch, mode, tokens / t_ours, tokens / t_peer, ratio, agree))
            print(f"B={batch:4d} decode={mode:6s} ours {tokens / t_ours:10,.0f} tok/s  HF generate "
                  f"{tokens / t_peer:10,.0f} tok/s  x{ratio:.2f}  rows identical over {AGREE_TOKENS} ids: "
                  f"{agree:.2f} (our loop with HF's kernels: {same_kernels:.2f})", flush=True)
            case = (f"{shape}, {args.layers} layers, B={batch}, prompts 112..128 ids, {args.new_tokens} new ids "
                    f"(forced), greedy {str(dtype).removeprefix('torch.')}; ours decode={mode}, Triton MoE + fused "
                    f"RMSNorm; rows identical over the first {AGREE_TOKENS} ids: {agree:.2f} (our loop with HF's "
                    f"kernels: {same_kernels:.2f})")
            record(row(case, f"{tokens / t_ours:,.0f} tok/s ({t_ours:.2f} s)",
                       f"{tokens / t_peer:,.0f} tok/s ({t_peer:.2f} s)",
                       f"HF transformers generate ({peer_moe} experts)", ratio))
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ours(model, make_prompts(args.batch[0], config.vocab_size), 16, args.decode[0])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
    print(f"\n{shape}, {args.layers} layers, {versions}")
    print("| B | decode | ours tok/s | HF tok/s | x HF | rows identical |\n|---|---|---|---|---|---|")
    for batch, mode, t_ours, t_peer, ratio, agree in table:
        print(f"| {batch} | {mode} | {t_ours:,.0f} | {t_peer:,.0f} | {ratio:.2f} | {agree:.2f} |")


if __name__ == "__main__":
    main()

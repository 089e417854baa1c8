"""Qwen3-Next's gated full-attention layer at the full-depth run's shape: our attention-layer forward
(targets/attention_layer.py: q/k norm + partial RoPE and the output gate in kernels/attention_glue) vs HF's
`Qwen3NextAttention.forward` on the same module and inputs, and the attention call alone under each backend.

Shape: the real 80B layer (hidden 2048, 16 query / 2 key-value heads of 256, RoPE on 64 of them), B=1,
T=--tokens, random weights N(0, 0.02) and q/k norm weights N(0, 0.3), bf16. SDPA's backends are eagle-train's
(app/runtime.py `sdpa_without_cudnn`) unless a row names another.

    layer      one layer's forward (projections, glue, attention, o_proj): ours vs HF's forward with HF's norms
               (the peer configuration), and vs HF's forward with our fused RMSNorm bound to q_norm/k_norm (what
               the full-depth run ran before these kernels); outputs agree to bf16 precision (checked)
    attention  the causal GQA attention alone at [1, 16, T, 256]: SDPA without cuDNN (what eagle-train gets) vs
               cuDNN (torch's own order on Hopper, one fixed shape: its graph built once), and compiled
               flex_attention; TFLOP/s = 2 * T^2 * D * H / time (the causal half of 4 T^2 D H)

Times: triton.testing.do_bench, median, after its warm-up.

    python benchmarks/next_attention.py [--tokens 4096]
    python benchmarks/next_attention.py --device cpu --tiny      # dry run of the script (interpreted kernels)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from next_model import bench  # noqa: E402
from results import RESULTS, append_rows, row  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "tests/fixtures/qwen3_next_80b_a3b_config.json"
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
NAME = "next_attention"
NOTE = ("`python benchmarks/next_attention.py`: one Qwen3-Next gated full-attention layer (real 80B widths, B=1, "
        "bf16), our attention-layer forward vs HF's, and the attention call alone under each backend.")


def build_layer(tiny: bool, device: torch.device, dtype: torch.dtype):
    """One Qwen3NextAttention (layer 3, full attention) and the model's rotary embedding."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding
    fields = json.loads(FIXTURE.read_text())
    if tiny:
        fields.update(TINY)
    config = Qwen3NextConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen3NextAttention(config, layer_idx=3).to(device, dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.02)
    return layer, Qwen3NextRotaryEmbedding(config).to(device), config


def widths(config, rotary) -> str:
    return (f"hidden {config.hidden_size}, {config.num_attention_heads}/{config.num_key_value_heads} heads of "
            f"{config.head_dim}, RoPE {2 * rotary.inv_freq.numel()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def sdpa_backends() -> str:
    """Which attention backend the layer rows ran: EAGLE_CUDNN_SDPA moves ours (and with =1 HF's) onto cuDNN."""
    from eagle_trainer.kernels.utils import CUDNN_SDPA_ENV
    return {"1": "SDPA in torch's order (cuDNN first)",
            "repeated": "ours on cuDNN once its layout repeated (EAGLE_CUDNN_SDPA=repeated), HF's SDPA without cuDNN",
            }.get(os.environ.get(CUDNN_SDPA_ENV, ""), "SDPA without cuDNN")


def layer_rows(layer, rotary, config, tokens: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    from types import SimpleNamespace

    from eagle_trainer.targets.attention_layer import bind_gated_attention
    from eagle_trainer.targets.norms import bind_rms_norm
    hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(tokens, device=device)[None]
    cos_sin = rotary(hidden, positions)

    def forward():
        return layer(hidden_states=hidden, position_embeddings=cos_sin, attention_mask=None, position_ids=positions)[0]

    def bind(attn_layer_impl, norm_impl):
        cfg = SimpleNamespace(attn_layer_impl=attn_layer_impl, norm_impl=norm_impl)
        bind_gated_attention(layer, cfg, ("Qwen3NextAttention",))
        bind_rms_norm(layer, cfg, ("Qwen3NextRMSNorm",), zero_centred=True)

    bind("hf", "hf")
    hf_out = forward()
    hf_ms = bench(forward, device)
    bind("hf", "triton")
    norm_out = forward()
    norm_ms = bench(forward, device)
    bind("triton", "hf")  # our forward reads the norm weights itself
    ours_out = forward()
    ours_ms = bench(forward, device)
    bind("hf", "hf")
    errs = rel_err(ours_out, hf_out), rel_err(norm_out, hf_out)
    print(f"layer T={tokens}: ours {ours_ms:.3f} ms, HF {hf_ms:.3f} ms, HF + our RMSNorm {norm_ms:.3f} ms; "
          f"relative difference to HF's output: ours {errs[0]:.2g}, HF + our RMSNorm {errs[1]:.2g}", flush=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if not max(errs) < tol:
        raise AssertionError(f"outputs differ from HF's by {errs} (tolerance {tol})")
    case = (f"Qwen3-Next gated full-attention layer forward ({widths(config, rotary)}), B=1 T={tokens}, "
            f"{sdpa_backends()} (output within {errs[0]:.1g} of HF's)")
    ours = f"{ours_ms:.3f} ms"
    return [row(case, ours, f"{hf_ms:.3f} ms", "HF transformers Qwen3NextAttention.forward (HF's RMSNorm)",
                hf_ms / ours_ms),
            row(case, ours, f"{norm_ms:.3f} ms", "HF transformers Qwen3NextAttention.forward + our fused RMSNorm "
                "(the full-depth run's attention before kernels/attention_glue)", norm_ms / ours_ms)]


@torch.no_grad()
def attention_rows(config, rotary, tokens: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, tokens, heads, dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k, v = (torch.randn(1, tokens, kv_heads, dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
            for _ in range(2))
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    flops = 2 * tokens * tokens * dim * heads
    ours_out = sdpa()
    ours_ms = bench(sdpa, device)  # the backends as eagle-train leaves them
    results = {}
    if device.type == "cuda":
        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return sdpa()
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, tokens, tokens, device=device)
        compiled = torch.compile(flex_attention)
        flex = lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)  # noqa: E731
        for name, fn in (("cuDNN (torch's SDPA order on Hopper)", cudnn), ("flex_attention, compiled", flex)):
            out = fn()
            results[name] = (bench(fn, device), rel_err(out, ours_out))
    rate = lambda ms: f"{ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s"  # noqa: E731
    print(f"attention T={tokens}: ours (SDPA without cuDNN) {rate(ours_ms)}; "
          + "; ".join(f"{n} {rate(ms)} (difference {e:.1g})" for n, (ms, e) in results.items()), flush=True)
    case = f"Qwen3-Next full attention alone, causal GQA ({widths(config, rotary)}) bf16, T={tokens}"
    rows = []
    for name, (ms, err) in results.items():
        if not err < 2e-2:
            raise AssertionError(f"{name} differs from SDPA without cuDNN by {err:.3g}")
        rows.append(row(f"{case} (outputs within {err:.1g})", f"{rate(ours_ms)} (SDPA without cuDNN, as eagle-train)",
                        rate(ms), name, ms / ours_ms))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the script")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a dry run of the script)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"RESULTS.md to append to (default {RESULTS.name}; a --tiny run appends only here)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when our kernels are first imported (inside the forwards)
    else:
        from eagle_trainer.app.runtime import sdpa_without_cudnn
        sdpa_without_cudnn()  # as eagle-train on a GPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer, rotary, config = build_layer(args.tiny, device, dtype)
    rows = []
    for tokens in args.tokens:
        rows += layer_rows(layer, rotary, config, tokens, device, dtype)
        rows += attention_rows(config, rotary, tokens, device, dtype)
    if args.results is not None or not args.tiny:
        append_rows(NAME, rows, NOTE, args.results or RESULTS)


if __name__ == "__main__":
    main()

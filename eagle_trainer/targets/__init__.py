"""Frozen target adapters: load a local HF checkpoint, capture hidden states, compute the teacher.

Registers the built-in target entries with the registry on import. HF transformers' modeling code is the
model definition; an entry says where things live and which kernels to bind.
"""

from __future__ import annotations

from dataclasses import replace

from eagle_trainer import registry
from eagle_trainer.targets.gdn import bind_gdn
from eagle_trainer.targets.moe import bind_moe
from eagle_trainer.targets.norms import bind_rms_norm


def bind_qwen3_moe(model, cfg) -> dict[str, str]:
    """Our MoE core (router + experts) and fused RMSNorm, as `cfg.moe_impl` / `cfg.norm_impl` ask."""
    return {"moe": bind_moe(model, cfg), "norm": bind_rms_norm(model, cfg, ("Qwen3MoeRMSNorm",))}


def bind_qwen3_next(model, cfg) -> dict[str, str]:
    """Our GDN core for the linear-attention layers (`gdn_impl`); HF's own MoE paths and norms: moe_impl auto is
    eager on the CPU, grouped_mm on a GPU.

    Our MoE core does not fuse Qwen3-Next's gated shared expert yet, and our RMSNorm kernel computes `w * x_hat`,
    not Qwen3-Next's zero-centred `(1 + w) * x_hat`: asking for triton there is refused rather than silently
    served by HF.
    """
    if "triton" in (cfg.moe_impl, cfg.norm_impl):
        raise ValueError(f"target.moe_impl={cfg.moe_impl!r}, target.norm_impl={cfg.norm_impl!r}: no Triton MoE or "
                         "RMSNorm kernels are bound for Qwen3NextForCausalLM yet; use moe_impl=auto|eager|grouped_mm and "
                         "norm_impl=auto|hf")
    if cfg.norm_impl not in ("auto", "hf"):
        raise ValueError(f"target.norm_impl={cfg.norm_impl!r} is not one of ('auto', 'triton', 'hf')")
    moe = cfg.moe_impl
    if moe == "auto":
        moe = "grouped_mm" if next(model.parameters()).device.type == "cuda" else "eager"
    return {"moe": bind_moe(model, replace(cfg, moe_impl=moe)), "norm": "hf", "gdn": bind_gdn(model, cfg)}


QWEN3 = registry.register_target(registry.TargetSpec(architectures=("Qwen3ForCausalLM",)))
QWEN3_MOE = registry.register_target(registry.TargetSpec(
    architectures=("Qwen3MoeForCausalLM",), experts="mlp.experts", bind_kernels=bind_qwen3_moe))
# Hybrid: layers 3, 7, ... hold `self_attn` (gated full attention), the rest `linear_attn` (gated delta net);
# every layer's `mlp` is sparse, with `mlp.shared_expert` beside the routed `mlp.experts`.
# The gated delta net's recurrent state can neither take a tree mask nor be rolled back to the accepted
# tokens: evaluate/ verifies drafts for it token by token along the accepted path (tree_verify=False).
QWEN3_NEXT = registry.register_target(registry.TargetSpec(
    architectures=("Qwen3NextForCausalLM",), experts="mlp.experts", bind_kernels=bind_qwen3_next,
    tree_verify=False))

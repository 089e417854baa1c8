"""Frozen target adapters: load a local HF checkpoint, capture hidden states, compute the teacher.

Registers the built-in target entries with the registry on import. HF transformers' modeling code is the
model definition; an entry says where things live and which kernels to bind.
"""

from __future__ import annotations

from eagle_trainer import registry
from eagle_trainer.targets.moe import bind_moe
from eagle_trainer.targets.norms import bind_rms_norm


def bind_qwen3_moe(model, cfg) -> dict[str, str]:
    """Our MoE core (router + experts) and fused RMSNorm, as `cfg.moe_impl` / `cfg.norm_impl` ask."""
    return {"moe": bind_moe(model, cfg), "norm": bind_rms_norm(model, cfg, ("Qwen3MoeRMSNorm",))}


QWEN3 = registry.register_target(registry.TargetSpec(architectures=("Qwen3ForCausalLM",)))
QWEN3_MOE = registry.register_target(registry.TargetSpec(
    architectures=("Qwen3MoeForCausalLM",), experts="mlp.experts", bind_kernels=bind_qwen3_moe))

"""Frozen target adapters: load a local HF checkpoint, capture hidden states, compute the teacher.

Registers the built-in target entries with the registry on import. HF transformers' modeling code is the
model definition; an entry says where things live and which kernels to bind.
"""

from __future__ import annotations

from eagle_trainer import registry
from eagle_trainer.targets.attention_layer import bind_gated_attention
from eagle_trainer.targets.gdn import RecurrentStates, bind_gdn
from eagle_trainer.targets.moe import bind_moe
from eagle_trainer.targets.norms import bind_rms_norm


def bind_qwen3_moe(model, cfg) -> dict[str, str]:
    """Our MoE core (router + experts) and fused RMSNorm, as `cfg.moe_impl` / `cfg.norm_impl` ask."""
    return {"moe": bind_moe(model, cfg), "norm": bind_rms_norm(model, cfg, ("Qwen3MoeRMSNorm",))}


def bind_qwen3_next(model, cfg) -> dict[str, str]:
    """Our MoE core (router, routed experts and the gated shared expert, `moe_impl`), the zero-centred fused RMSNorm
    for Qwen3NextRMSNorm (`norm_impl`), our GDN core for the linear-attention layers (`gdn_impl`) and our q/k norm +
    RoPE and output-gate kernels for the full-attention layers (`attn_layer_impl`); auto is triton on a GPU (hf on the
    CPU).

    With moe_impl=triton each Qwen3NextSparseMoeBlock gets our block forward: the shared expert (a dense
    Qwen3NextMLP) runs through the core's GEMMs, scaled by sigmoid(`shared_expert_gate`) in fp32, and is the last
    term of the core's fixed-order sum; with hf or grouped_mm HF's block forward adds it in the model dtype. The
    GDN's gated norm (Qwen3NextRMSNormGated) is not a Qwen3NextRMSNorm: it belongs to the GDN binding.
    """
    return {"moe": bind_moe(model, cfg, shared_blocks=("Qwen3NextSparseMoeBlock",)),
            "norm": bind_rms_norm(model, cfg, ("Qwen3NextRMSNorm",), zero_centred=True), "gdn": bind_gdn(model, cfg),
            "attn": bind_gated_attention(model, cfg, ("Qwen3NextAttention",))}


QWEN3 = registry.register_target(registry.TargetSpec(architectures=("Qwen3ForCausalLM",)))
QWEN3_MOE = registry.register_target(registry.TargetSpec(
    architectures=("Qwen3MoeForCausalLM",), experts="mlp.experts", bind_kernels=bind_qwen3_moe))
# Hybrid: layers 3, 7, ... hold `self_attn` (gated full attention), the rest `linear_attn` (gated delta net);
# every layer's `mlp` is sparse, with `mlp.shared_expert` beside the routed `mlp.experts` (bound into the MoE core's
# sum by bind_qwen3_next; expert parallelism splits only `mlp.experts`, the shared expert is whole on every rank).
# The gated delta net's recurrent state can neither take a tree mask nor be rolled back to the accepted tokens:
# evaluate/ keeps it per tree node while verifying (RecurrentStates).
QWEN3_NEXT = registry.register_target(registry.TargetSpec(
    architectures=("Qwen3NextForCausalLM",), experts="mlp.experts", bind_kernels=bind_qwen3_next,
    recurrent_states=RecurrentStates))

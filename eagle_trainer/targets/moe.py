"""Binding the Triton MoE core into HF's Qwen3-MoE and Qwen3-Next modeling code (no forked model files).

HF transformers 5.x dispatches each `@use_experts_implementation` experts module through
`ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`. We register our core there as "eagle_triton" and
switch the loaded model to it. The router (`mlp.gate`, a `*TopKRouter`) is a plain module whose forward
returns (router_logits, top_k_weights, top_k_index); with our core bound its forward is replaced, per
instance, by our fused router kernel, so routing is batch invariant and ties go to the lowest expert id.
A sparse block with a gated shared expert (Qwen3-Next's Qwen3NextSparseMoeBlock: `shared_expert`, a dense SwiGLU
MLP, behind the sigmoid `shared_expert_gate`) gets our block forward per instance: the router, the shared expert
through the core's GEMMs, then the experts module called with its output as the last term of the core's fixed-order
fp32 sum (`shared_out`), so the block's output is rounded once; HF adds the two in the model dtype. Calling the
experts module (not the core directly) keeps expert parallelism's hooks in the path (parallel/expert.py adds
`shared_out` after combining the routed terms).

    moe_impl   what runs
    triton     our router + our experts core, with the shared expert where a block has one (GPU, or the CPU
               under TRITON_INTERPRET=1)
    hf         HF's default experts code, the per-expert loop (the reference; HF's "eager" experts); HF's router
               and sparse block
    grouped_mm HF's torch._grouped_mm experts (HF's default on GPU); HF's router and sparse block
    auto       triton on a GPU, hf on the CPU
Every `*_impl` switch (moe_impl, norm_impl, gdn_impl) names HF's own code `hf` and is resolved here.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn

from eagle_trainer.kernels.utils import triton_runs_on

IMPLEMENTATIONS = ("auto", "triton", "hf", "grouped_mm")
HF_EXPERTS = {"hf": "eager", "grouped_mm": "grouped_mm"}  # moe_impl -> HF's config._experts_implementation
TRITON_NAME = "eagle_triton"  # the key our core is registered under in HF's experts interface


def resolve_kernel_impl(option: str, impl: str, choices: tuple[str, ...], device: torch.device) -> str:
    """`target.<option>`: "auto" is triton on a GPU and hf (HF's own code) elsewhere; triton off the GPU needs the
    interpreter."""
    if impl == "eager":
        raise ValueError(f"target.{option}='eager' is not a choice: HF's own code is 'hf' in every *_impl switch; "
                         f"use target.{option}=hf")
    if impl not in choices:
        raise ValueError(f"target.{option}={impl!r} is not one of {choices}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "hf"
    if impl == "triton" and not triton_runs_on(device):
        raise ValueError(f"target.{option}=triton needs a CUDA device (the target is on {device}); use "
                         f"{option}=hf on the CPU, or set TRITON_INTERPRET=1 to run the kernels interpreted")
    return impl


def bind_instances(model: nn.Module, option: str, impl: str, class_names: tuple[str, ...], forward) -> str:
    """Give every instance of `class_names` in `model` `forward` (impl "triton") or its class's forward back
    (any other impl, which must already be resolved); returns `impl`. `option` names the recipe key in errors."""
    modules = [m for m in model.modules() if type(m).__name__ in class_names]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no {class_names} modules to bind (target.{option})")
    for module in modules:
        if impl == "triton":
            module.forward = MethodType(forward, module)
        else:
            module.__dict__.pop("forward", None)
    return impl


def resolve_moe_impl(impl: str, device: torch.device) -> str:
    return resolve_kernel_impl("moe_impl", impl, IMPLEMENTATIONS, device)


def _experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, shared_out: torch.Tensor | None = None) -> torch.Tensor:
    """HF experts-interface signature: [T,H], [T,k] ids, [T,k] weights -> [T,H]; `shared_out` [T,H] (passed by
    our shared-expert block forward) is summed last."""
    from eagle_trainer.kernels.moe import moe_experts
    return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                       batch_invariant=getattr(self, "eagle_batch_invariant", True), shared_out=shared_out)


def _shared_block_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Drop-in for Qwen3NextSparseMoeBlock.forward: [B,T,H] -> [B,T,H]. The shared expert's weights are read from
    its modules at every call (a sharded target gathers them anew for each forward)."""
    from eagle_trainer.kernels.moe import SharedExpert, moe_shared_expert
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])  # [N, H]
    _, weights, ids = self.gate(x)
    mlp, gate = self.shared_expert, self.shared_expert_gate
    shared = SharedExpert(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, gate.weight)
    shared_out = moe_shared_expert(x, shared, batch_invariant=getattr(self.experts, "eagle_batch_invariant", True))
    return self.experts(x, ids, weights, shared_out=shared_out).reshape(shape)


def _router_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Drop-in for HF's *TopKRouter.forward: -> (router_logits, top_k_weights fp32, top_k_index)."""
    from eagle_trainer.kernels.moe import moe_route
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    return moe_route(hidden_states, self.weight, self.top_k, self.norm_topk_prob)


def register_experts_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    if TRITON_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(TRITON_NAME, _experts_forward)


def _routers(model: nn.Module):
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            yield module


def bind_moe(model: nn.Module, cfg: Any, shared_blocks: tuple[str, ...] = ()) -> str:
    """Switch a loaded HF MoE model to `cfg.moe_impl` (a TargetConfig); returns the implementation bound.

    `shared_blocks`: the sparse-block classes (HF's Qwen3NextSparseMoeBlock layout) whose gated shared expert joins
    the core's sum; their instances get our block forward with triton, HF's back otherwise.
    """
    device = next(model.parameters()).device
    impl = resolve_moe_impl(cfg.moe_impl, device)
    routers = list(_routers(model))
    if not routers:
        raise ValueError(f"{type(model).__name__} has no *TopKRouter modules: not an HF MoE model this binding knows")
    if impl == "triton":
        register_experts_implementation()
        model.set_experts_implementation(TRITON_NAME)
        for router in routers:
            router.forward = MethodType(_router_forward, router)
        for module in model.modules():
            if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
                module.eagle_batch_invariant = bool(cfg.moe_batch_invariant)
    else:
        model.set_experts_implementation(HF_EXPERTS[impl])
        for router in routers:  # undo an earlier binding of ours
            router.__dict__.pop("forward", None)
    if shared_blocks:
        bind_instances(model, "moe_impl", impl, shared_blocks, _shared_block_forward)
    return impl

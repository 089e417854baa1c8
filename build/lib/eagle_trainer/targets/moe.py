"""Binding the Triton MoE core into HF's Qwen3-MoE and Qwen3-Next modeling code (no forked model files).

HF transformers 5.x dispatches each `@use_experts_implementation` experts module through
`ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`. We register our core there as "eagle_triton" and
switch the loaded model to it. The router (`mlp.gate`, a `*TopKRouter`) is a plain module whose forward
returns (router_logits, top_k_weights, top_k_index); with our core bound its forward is replaced, per
instance, by our fused router kernel, so routing is batch invariant and ties go to the lowest expert id.
Anything else in the sparse block stays HF's: Qwen3-Next's shared expert and its sigmoid gate run as HF's
modules and are added to our experts' output by HF's Qwen3NextSparseMoeBlock.forward.

    moe_impl   what runs
    triton     our router + our experts core (GPU, or the CPU under TRITON_INTERPRET=1)
    hf         HF's default experts code, the per-expert loop (the reference; HF's "eager" experts)
    grouped_mm HF's torch._grouped_mm experts (HF's default on GPU)
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
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """HF experts-interface signature: [T,H], [T,k] ids, [T,k] weights -> [T,H]."""
    from eagle_trainer.kernels.moe import moe_experts
    return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                       batch_invariant=getattr(self, "eagle_batch_invariant", True))


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


def bind_moe(model: nn.Module, cfg: Any) -> str:
    """Switch a loaded HF MoE model to `cfg.moe_impl` (a TargetConfig); returns the implementation bound."""
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
    return impl

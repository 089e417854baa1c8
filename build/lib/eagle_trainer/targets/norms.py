"""Binding the fused Triton RMSNorm into HF modeling code, per module instance (no forked model files).

HF's Qwen3 RMSNorm modules make about six passes over their input (fp32 cast, square, mean, scale, cast,
weight); on a Qwen3-30B-A3B layer at 16k tokens those passes cost more than the attention kernel. An entry
names the norm classes whose arithmetic `kernels.rmsnorm` reproduces and says which form they compute: plain
`weight * x_hat` (Qwen3, Qwen3-MoE) or zero-centred `(1 + weight) * x_hat` (Qwen3-Next's Qwen3NextRMSNorm);
their instances get our forward.

    norm_impl   triton (GPU, or the CPU under TRITON_INTERPRET=1) | hf | auto (triton on a GPU, else hf)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eagle_trainer.targets.moe import bind_instances, resolve_kernel_impl

IMPLEMENTATIONS = ("auto", "triton", "hf")


def _epsilon(module: nn.Module) -> float:
    """HF's plain RMSNorms keep eps as `variance_epsilon`; the zero-centred Qwen3NextRMSNorm keeps it as `eps`."""
    return module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from eagle_trainer.kernels.rmsnorm import rms_norm
    return rms_norm(hidden_states, self.weight, _epsilon(self))


def _zero_centred_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from eagle_trainer.kernels.rmsnorm import rms_norm
    return rms_norm(hidden_states, self.weight, _epsilon(self), zero_centred=True)


def resolve_norm_impl(impl: str, device: torch.device) -> str:
    return resolve_kernel_impl("norm_impl", impl, IMPLEMENTATIONS, device)


def bind_rms_norm(model: nn.Module, cfg: Any, class_names: tuple[str, ...], zero_centred: bool = False) -> str:
    """Give every instance of `class_names` in `model` the fused forward (or HF's back); returns the impl bound.

    `zero_centred`: the classes scale by (1 + weight) in fp32, as Qwen3NextRMSNorm does (see kernels.rmsnorm).
    """
    impl = resolve_norm_impl(cfg.norm_impl, next(model.parameters()).device)
    forward = _zero_centred_norm_forward if zero_centred else _norm_forward
    return bind_instances(model, "norm_impl", impl, class_names, forward)

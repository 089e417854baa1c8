"""Plain-torch q/k norm + RoPE and the sigmoid output gate as HF's Qwen3 / Qwen3-Next attention computes them.

    qk_norm_rope_reference: y = rms_norm(x); y[..., :R] = y_rot * cos + rotate_half(y_rot) * sin
    sigmoid_gate_reference: attn * sigmoid(gate), flattened to [B, T, H * D]
Every op runs in the tensors' dtype as in HF's modules, so each product and sum is rounded to it (cos and sin come
in the model's dtype from HF's rotary embedding). Shapes as in kernels/attention_glue/__init__.py.
"""

from __future__ import annotations

import torch

from eagle_trainer.kernels.rmsnorm.reference import rms_norm_reference


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def qk_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                           zero_centred: bool = False) -> torch.Tensor:
    y = rms_norm_reference(x, weight, eps, zero_centred)  # [B, T, H, D]
    rotary = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [B, T, 1, R]
    rot, rest = y[..., :rotary], y[..., rotary:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


def sigmoid_gate_reference(attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return attn.reshape(*attn.shape[:-2], -1) * torch.sigmoid(gate.reshape(*gate.shape[:-2], -1))

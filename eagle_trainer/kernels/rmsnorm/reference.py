"""Plain-torch RMSNorm as HF's Qwen3 / Qwen3-MoE modules compute it (the ground truth for the kernel).

    x [..., D], weight [D] -> weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)
The normalised value is rounded to x's dtype before the weight multiplies it, as HF does.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)

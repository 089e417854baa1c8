"""Plain-torch RMSNorm as HF's modules compute it (the ground truth for the kernel).

    plain (Qwen3RMSNorm, Qwen3MoeRMSNorm):  weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)
    zero_centred (Qwen3NextRMSNorm):        ((x_fp32 * rsqrt(mean(x_fp32^2) + eps)) * (1 + weight_fp32)).to(x.dtype)
x [..., D], weight [D]. The plain form rounds the normalised value to x's dtype before the weight multiplies it
(result in promote(x, weight)); the zero-centred form stays in fp32 until the one rounding to x's dtype.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centred:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)

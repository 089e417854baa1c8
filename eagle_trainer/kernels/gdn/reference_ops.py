"""Plain-torch ground truth for the gated delta net's small ops (conv.py, gating.py, norm.py).

    causal_conv1d_silu_reference  x [B, T, C], weight [C, K] (or [C, 1, K]), bias [C] -> [B, T, C]
    gdn_gating_reference          a, b [..., Hv], A_log, dt_bias [Hv] -> g fp32, beta in b's dtype
    gated_rms_norm_reference      x, z [..., D], weight [D] -> [..., D] in x's dtype
Same arithmetic as HF's Qwen3NextGatedDeltaNet, written for reading, not speed; packed documents are cut
apart by cu_seqlens and run one by one.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def causal_conv1d_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    if weight.dim() == 3:
        weight = weight[:, 0]
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        return torch.cat([causal_conv1d_silu_reference(x[:, start:end], weight, bias)
                          for start, end in itertools.pairwise(bounds)], dim=1)
    seq_len, kernel_size = x.shape[1], weight.shape[1]
    h = F.pad(x.to(torch.float32), (0, 0, kernel_size - 1, 0))  # [B, K-1+T, C]: zeros before the first token
    out = torch.zeros_like(h[:, :seq_len])
    if bias is not None:
        out += bias.to(torch.float32)
    for k in range(kernel_size):
        out += weight[:, k].to(torch.float32) * h[:, k:k + seq_len]
    return F.silu(out.to(weight.dtype).to(torch.float32)).to(weight.dtype).to(x.dtype)


def gdn_gating_reference(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
                         dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = -A_log.to(torch.float32).exp() * F.softplus(a.to(torch.float32) + dt_bias.to(torch.float32))
    return g, torch.sigmoid(b.to(torch.float32)).to(b.dtype)


def gated_rms_norm_reference(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(x.dtype)
    return (h * F.silu(z.to(torch.float32))).to(x.dtype)

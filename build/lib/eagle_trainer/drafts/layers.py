"""Llama building blocks shared by the draft models: RMSNorm, rotary embedding, SwiGLU MLP, the frozen target embedding.

Shapes: B batch, T tokens, H hidden, nh/nkv query/key-value heads, D head dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 statistics, the normalised value rounded to x's dtype, times the weight (HF Llama's arithmetic)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of Llama RoPE, with the `llama3` and `linear` scalings the engines implement."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"rope scaling {kind!r} is not supported by the draft; use none, 'linear' or 'llama3'")


class Rotary(nn.Module):
    """cos/sin tables for integer positions (computed on the fly: positions reach t + K - 1)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(positions, self.inv_freq)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, D] (fp32)."""
    freqs = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, D]
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama/Qwen3) of x [..., D] by cos/sin broadcast to it, in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, T, D]; cos/sin [B, T, D]."""
    return rotate(x, cos[:, None], sin[:, None])


def set_frozen_embedding(embedding: nn.Embedding, weight: torch.Tensor, share: bool = False) -> None:
    """The target's input embedding [V, H] into a draft's frozen `embedding`. With `share` the draft holds the
    target's own tensor wherever it can stand in for the copy (same device; same dtype, or a GPU, where training
    reads it under bf16 autocast and the Trainer holds frozen weights in bf16), so online training keeps one [V, H]
    (0.6 GiB for Qwen3-30B-A3B) instead of two; otherwise, or without `share`, its values are copied in."""
    mine = embedding.weight
    if weight.shape != mine.shape:
        raise ValueError(f"the target embedding is {tuple(weight.shape)}, the draft's is {tuple(mine.shape)}: the "
                         "draft was built for another target (vocab size, hidden size)")
    if share and weight.device == mine.device and (weight.dtype == mine.dtype or weight.is_cuda):
        embedding.weight = nn.Parameter(weight.detach(), requires_grad=False)
    else:
        with torch.no_grad():
            mine.copy_(weight)

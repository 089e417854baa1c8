"""Gated RMSNorm, the epilogue of Qwen3-Next's gated delta net: one read of x and z, one write of y.

    y = (weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)) * silu(z_fp32)   -> x's dtype
Shapes: x, z [..., D] (D the value head dim), weight [D] -> y [..., D] in x's dtype.
The arithmetic is HF's Qwen3NextRMSNormGated step by step: fp32 statistics, the normalised value rounded to x's
dtype, times the plain weight (not zero-centred, unlike Qwen3NextRMSNorm) in promote(weight, x) dtype, times
silu of z in fp32, rounded to x's dtype. Rows are independent: batch invariant by construction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.utils import new_buffer


@triton.jit
def gated_rms_norm_fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, N, D, eps, BR: tl.constexpr, BD: tl.constexpr,
                              ROUND_WN: tl.constexpr):
    o_r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    o_d = tl.arange(0, BD)
    m = (o_r < N)[:, None] & (o_d < D)[None, :]
    o_x = o_r[:, None] * D + o_d[None, :]
    b_h = tl.load(x_ptr + o_x, mask=m, other=0.0).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_h * b_h, axis=1) / D + eps)
    b_n = (b_h * b_rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    b_w = tl.load(w_ptr + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    b_wn = b_w[None, :] * b_n
    if ROUND_WN:  # weight and x share a low-precision dtype: HF's product is rounded to it
        b_wn = b_wn.to(x_ptr.dtype.element_ty).to(tl.float32)
    b_z = tl.load(z_ptr + o_x, mask=m, other=0.0).to(tl.float32)
    b_y = b_wn * (b_z * tl.sigmoid(b_z))
    tl.store(y_ptr + o_x, b_y.to(y_ptr.dtype.element_ty), mask=m)


def gated_rms_norm_fwd(rows: torch.Tensor, z_rows: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    num_rows, dim = rows.shape
    y = new_buffer((num_rows, dim), rows)
    if num_rows == 0:
        return y
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(64, 4096 // block_d))  # about 4096 elements per program
    round_wn = torch.promote_types(weight.dtype, rows.dtype) == rows.dtype and rows.dtype != torch.float32
    gated_rms_norm_fwd_kernel[(triton.cdiv(num_rows, block_r),)](
        rows, z_rows, weight, y, num_rows, dim, eps, BR=block_r, BD=block_d, ROUND_WN=round_wn,
        num_warps=4 if block_d * block_r <= 4096 else 8)
    return y


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dim, times weight, times silu(z) (HF's Qwen3NextRMSNormGated).

    x [..., D]; z [..., D] (the gate, same shape as x); weight [D]. -> [..., D] in x's dtype.
    """
    dim = x.shape[-1]
    if weight.shape != (dim,) or z.shape != x.shape:
        raise ValueError(f"gated RMSNorm weight {tuple(weight.shape)} / gate {tuple(z.shape)} do not fit "
                         f"x {tuple(x.shape)}: expected weight [D] and a gate shaped like x")
    y = gated_rms_norm_fwd(x.reshape(-1, dim).contiguous(), z.reshape(-1, dim).contiguous(), weight.contiguous(),
                           eps)
    return y.view(x.shape)


__all__ = ["gated_rms_norm"]

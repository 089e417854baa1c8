"""Gated RMSNorm, the epilogue of Qwen3-Next's gated delta net: one read of x and z, one write of y.

    y = (weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)) * silu(z_fp32)   -> x's dtype
Shapes: x, z [..., D] (D the value head dim), weight [D] -> y [..., D] in x's dtype. The gate may also come
grouped, z [..., Hk, G, D] for x [..., Hk * G, D], with any strides but a contiguous last dim: Qwen3-Next's z is
such a view of the in_proj_qkvz output (its heads interleave with q, k and v), which HF copies into [..., Hv, D].
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
def gated_rms_norm_fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, N, D, eps, stride_zt, stride_zh, stride_zg,
                              HK: tl.constexpr, G: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                              ROUND_WN: tl.constexpr):
    """Row r of x is (token r // (HK * G), key head, group member); z's row of it is found by its strides."""
    o_r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    o_d = tl.arange(0, BD)
    m = (o_r < N)[:, None] & (o_d < D)[None, :]
    o_x = o_r[:, None] * D + o_d[None, :]
    o_h = o_r % (HK * G)
    o_z = (o_r // (HK * G)) * stride_zt + (o_h // G) * stride_zh + (o_h % G) * stride_zg
    b_h = tl.load(x_ptr + o_x, mask=m, other=0.0).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_h * b_h, axis=1) / D + eps)
    b_n = (b_h * b_rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    b_w = tl.load(w_ptr + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    b_wn = b_w[None, :] * b_n
    if ROUND_WN:  # weight and x share a low-precision dtype: HF's product is rounded to it
        b_wn = b_wn.to(x_ptr.dtype.element_ty).to(tl.float32)
    b_z = tl.load(z_ptr + o_z[:, None] + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_y = b_wn * (b_z * tl.sigmoid(b_z))
    tl.store(y_ptr + o_x, b_y.to(y_ptr.dtype.element_ty), mask=m)


def gated_rms_norm_fwd(rows: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rows [N, D] contiguous; z [N / (Hk * G), Hk, G, D] with a contiguous last dim."""
    num_rows, dim = rows.shape
    y = new_buffer((num_rows, dim), rows)
    if num_rows == 0:
        return y
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(64, 4096 // block_d))  # about 4096 elements per program
    round_wn = torch.promote_types(weight.dtype, rows.dtype) == rows.dtype and rows.dtype != torch.float32
    gated_rms_norm_fwd_kernel[(triton.cdiv(num_rows, block_r),)](
        rows, z, weight, y, num_rows, dim, eps, z.stride(0), z.stride(1), z.stride(2), HK=z.shape[1],
        G=z.shape[2], BR=block_r, BD=block_d, ROUND_WN=round_wn,
        num_warps=4 if block_d * block_r <= 4096 else 8)
    return y


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dim, times weight, times silu(z) (HF's Qwen3NextRMSNormGated).

    x [..., D]; z [..., D] (the gate, same shape as x) or grouped [..., Hk, G, D] for x [..., Hk * G, D] (read
    through its strides, no copy; its last dim contiguous); weight [D]. -> [..., D] in x's dtype.
    """
    dim = x.shape[-1]
    grouped = z.dim() == x.dim() + 1 and x.dim() >= 2 and (
        z.shape[:-3] == x.shape[:-2] and z.shape[-3] * z.shape[-2] == x.shape[-2] and z.shape[-1] == dim)
    if weight.shape != (dim,) or not (z.shape == x.shape or grouped):
        raise ValueError(f"gated RMSNorm weight {tuple(weight.shape)} / gate {tuple(z.shape)} do not fit "
                         f"x {tuple(x.shape)}: expected weight [D] and a gate shaped like x, or [..., Hk, G, D]")
    # [tokens, Hk, G, D] (ungrouped: one head a token); a view wherever the leading dims merge, else a copy
    z = z.reshape(-1, *z.shape[-3:]) if grouped else z.reshape(-1, 1, 1, dim)
    if z.stride(-1) != 1:
        z = z.contiguous()
    y = gated_rms_norm_fwd(x.reshape(-1, dim).contiguous(), z, weight.contiguous(), eps)
    return y.view(x.shape)


__all__ = ["gated_rms_norm"]

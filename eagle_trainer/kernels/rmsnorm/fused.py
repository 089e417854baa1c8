"""Fused RMSNorm forward: one program normalises BR rows, reading x once and writing y once.

    rms_norm(x [..., D], weight [D], eps, zero_centred=False) -> [..., D]
Plain (HF's Qwen3RMSNorm / Qwen3MoeRMSNorm): fp32 statistics, the normalised value rounded to x's dtype, then
multiplied by the weight; y in promote(x.dtype, weight.dtype).
Zero-centred (HF's Qwen3NextRMSNorm, whose weight is stored as an offset from 1): fp32 throughout,
x_hat * (1 + weight), rounded once to x's dtype; y in x.dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.utils import new_buffer


@triton.jit
def rms_normed(b_h, b_rstd, b_w, x_ptr, ZERO_CENTRED: tl.constexpr):
    """HF's RMSNorm of fp32 rows b_h [BR, BD] (of x's dtype), given their b_rstd [BR] and the fp32 weight b_w [BD]:
    fp32, not yet rounded to the output dtype. Also called by kernels/attention_glue's q/k norm."""
    b_n = b_h * b_rstd[:, None]
    if ZERO_CENTRED:  # HF: (x_hat * (1 + w.float())).type_as(x), no rounding before the weight
        return b_n * (1.0 + b_w[None, :])
    return b_w[None, :] * b_n.to(x_ptr.dtype.element_ty).to(tl.float32)  # HF: w * x_hat.to(x.dtype)


@triton.jit
def rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, N, D, eps, BR: tl.constexpr, BD: tl.constexpr,
                        ZERO_CENTRED: tl.constexpr):
    o_r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    o_d = tl.arange(0, BD)
    m = (o_r < N)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x_ptr + o_r[:, None] * D + o_d[None, :], mask=m, other=0.0)
    b_h = b_x.to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_h * b_h, axis=1) / D + eps)
    b_w = tl.load(w_ptr + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    b_y = rms_normed(b_h, b_rstd, b_w, x_ptr, ZERO_CENTRED)
    tl.store(y_ptr + o_r[:, None] * D + o_d[None, :], b_y.to(y_ptr.dtype.element_ty), mask=m)


def rms_norm_fwd(rows: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool) -> torch.Tensor:
    """rows [N, D] (row-major) -> y [N, D]."""
    num_rows, dim = rows.shape
    dtype = rows.dtype if zero_centred else torch.promote_types(rows.dtype, weight.dtype)
    y = new_buffer((num_rows, dim), rows, dtype)
    if num_rows == 0:
        return y
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(64, 4096 // block_d))  # about 4096 elements per program
    rms_norm_fwd_kernel[(triton.cdiv(num_rows, block_r),)](
        rows, weight, y, num_rows, dim, eps, BR=block_r, BD=block_d, ZERO_CENTRED=zero_centred,
        num_warps=4 if block_d * block_r <= 4096 else 8)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    """RMSNorm of x over its last dim: x [..., D], weight [D] -> [..., D] (dtype: see the module docstring).

    `zero_centred`: scale by (1 + weight) in fp32 (Qwen3-Next) instead of by weight (Qwen3, Qwen3-MoE).
    """
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"RMSNorm weight {tuple(weight.shape)} does not fit x [..., {dim}]")
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) != dim):
        rows = rows.contiguous()
    return rms_norm_fwd(rows, weight, eps, zero_centred).view(x.shape)

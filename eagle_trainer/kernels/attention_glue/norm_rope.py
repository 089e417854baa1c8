"""q/k RMSNorm + RoPE in one pass: each (token, head) row is read once (its rotary partner again, from cache) and
written once; HF's modules make about a dozen passes (norm, slices, rotate_half's cat, products, sum, cat).

    qk_norm_rope(x [B, T, H, D], weight [D], eps, cos, sin [B, T, R], zero_centred=False) -> y [B, T, H, D]
x may be any view whose last dim is contiguous and whose [B, T] rows collapse to one stride (Qwen3-Next's query is
every other half-row of q_proj's output). y is contiguous. The norm is kernels/rmsnorm's (plain: Qwen3, zero-centred:
Qwen3-Next) over each head's D values; the first R dims are then rotated in HF's rotate_half form,
y_rot * cos + rotate_half(y_rot) * sin, each product and the sum rounded to y's dtype as HF's ops do (partial RoPE
when R < D: Qwen3-Next rotates 64 of 256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.rmsnorm.fused import rms_normed
from eagle_trainer.kernels.utils import new_buffer


# Each product of the rotation is rounded to y's dtype before the sum, as HF's ops round it. With FP fusion on, the
# compiler narrows the fp32 ops between those roundings to bf16 ones and contracts the product and the sum into one
# bf16 FMA, which drops the product's rounding (the kernel is memory-bound: fusion buys nothing here).
FP_FUSION = False


@triton.jit
def _normed(b_x, b_rstd, b_w, x_ptr, y_ptr, ZERO_CENTRED: tl.constexpr):
    """kernels/rmsnorm's output for fp32 rows b_x, rounded to y's dtype as HF's norm module returns it, in fp32."""
    return rms_normed(b_x, b_rstd, b_w, x_ptr, ZERO_CENTRED).to(y_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def qk_norm_rope_fwd_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, num_rows, num_heads, stride_xt, stride_xh,
                            stride_ct, eps, D: tl.constexpr, R: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                            ZERO_CENTRED: tl.constexpr):
    """Row r is (token r // num_heads, head r % num_heads); y's rows are contiguous."""
    dtype = y_ptr.dtype.element_ty
    o_r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_r = o_r < num_rows
    i_t = o_r // num_heads
    p_x = x_ptr + i_t * stride_xt + (o_r % num_heads) * stride_xh
    m = m_r[:, None] & (o_d < D)[None, :]
    b_x = tl.load(p_x[:, None] + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_w = tl.load(w_ptr + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    b_y = _normed(b_x, b_rstd, b_w, x_ptr, y_ptr, ZERO_CENTRED)
    # rotate_half: dim d < R/2 pairs with d + R/2 (negated), d in [R/2, R) with d - R/2
    m_rot = o_d < R
    o_p = tl.where(o_d < R // 2, o_d + R // 2, o_d - R // 2)
    m_p = m_r[:, None] & m_rot[None, :]
    b_xp = tl.load(p_x[:, None] + o_p[None, :], mask=m_p, other=0.0).to(tl.float32)
    b_wp = tl.load(w_ptr + o_p, mask=m_rot, other=0.0).to(tl.float32)
    b_yp = _normed(b_xp, b_rstd, b_wp, x_ptr, y_ptr, ZERO_CENTRED)
    b_yp = tl.where((o_d < R // 2)[None, :], -b_yp, b_yp)
    o_c = i_t[:, None] * stride_ct + o_d[None, :]
    b_cos = tl.load(cos_ptr + o_c, mask=m_p, other=0.0).to(tl.float32)
    b_sin = tl.load(sin_ptr + o_c, mask=m_p, other=0.0).to(tl.float32)
    b_e = (b_y * b_cos).to(dtype).to(tl.float32) + (b_yp * b_sin).to(dtype).to(tl.float32)
    b_y = tl.where(m_rot[None, :], b_e, b_y)
    tl.store(y_ptr + o_r[:, None] * D + o_d[None, :], b_y.to(dtype), mask=m)


def qk_norm_rope_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                     zero_centred: bool) -> torch.Tensor:
    """x [N, H, D] (last dim contiguous), cos/sin [N, R] (last dim contiguous, one row stride) -> y [N, H, D]."""
    num_tokens, num_heads, dim = x.shape
    dtype = x.dtype if zero_centred else torch.promote_types(x.dtype, weight.dtype)
    y = new_buffer((num_tokens, num_heads, dim), x, dtype)
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return y
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(64, 4096 // block_d))  # about 4096 elements per program
    qk_norm_rope_fwd_kernel[(triton.cdiv(num_rows, block_r),)](
        x, weight, cos, sin, y, num_rows, num_heads, x.stride(0), x.stride(1), cos.stride(0), eps, D=dim,
        R=cos.shape[-1], BR=block_r, BD=block_d, ZERO_CENTRED=zero_centred, num_warps=4, enable_fp_fusion=FP_FUSION)
    return y


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """t [B, T, ...] as [B * T, ...] with a contiguous last dim: a view when t's [B, T] strides collapse, else a
    copy."""
    rows = t.reshape(-1, *t.shape[2:])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 zero_centred: bool = False) -> torch.Tensor:
    """RMSNorm over each head of x, then RoPE on its first R dims: x [B, T, H, D], weight [D], cos/sin [B, T, R]
    (R even, at most D; a batch dim of 1 broadcasts) -> y [B, T, H, D] contiguous (dtype: x's when
    `zero_centred`, else promote(x, weight), as kernels/rmsnorm)."""
    batch, tokens, _, dim = x.shape
    rotary = cos.shape[-1]
    if weight.shape != (dim,) or sin.shape != cos.shape or cos.shape[-2] != tokens or rotary % 2 or rotary > dim \
            or cos.shape[0] not in (1, batch):
        raise ValueError(f"qk_norm_rope: x {tuple(x.shape)}, weight {tuple(weight.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}: expected weight [D], cos and sin [B or 1, T, R] with R even <= D")
    cos, sin = (token_rows(c.expand(batch, tokens, rotary)) for c in (cos, sin))
    if sin.stride() != cos.stride():  # the kernel addresses both by cos's row stride
        cos, sin = cos.contiguous(), sin.contiguous()
    return qk_norm_rope_fwd(token_rows(x), weight, eps, cos, sin, zero_centred).view(x.shape)

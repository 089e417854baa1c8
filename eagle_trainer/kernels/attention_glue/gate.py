"""Qwen3-Next's attention output gate in one pass: out = attn * sigmoid(gate), read where both lie.

    sigmoid_gate(attn [B, T, H, D], gate [B, T, H, D]) -> out [B, T, H * D]
Either input may be any view whose last dim is contiguous and whose [B, T] rows collapse to one stride: the gate is
the second half of each head's row of q_proj's output, which HF copies out before its sigmoid. As HF's ops: the
sigmoid is rounded to the inputs' dtype, then the product is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.attention_glue.norm_rope import token_rows
from eagle_trainer.kernels.utils import new_buffer


@triton.jit
def sigmoid_gate_fwd_kernel(a_ptr, g_ptr, y_ptr, num_rows, num_heads, stride_at, stride_ah, stride_gt, stride_gh,
                            D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Row r is (token r // num_heads, head r % num_heads); y's rows are contiguous."""
    dtype = y_ptr.dtype.element_ty
    o_r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    o_d = tl.arange(0, BD)
    i_t, i_h = o_r // num_heads, o_r % num_heads
    m = (o_r < num_rows)[:, None] & (o_d < D)[None, :]
    b_a = tl.load(a_ptr + (i_t * stride_at + i_h * stride_ah)[:, None] + o_d[None, :], mask=m, other=0.0)
    b_g = tl.load(g_ptr + (i_t * stride_gt + i_h * stride_gh)[:, None] + o_d[None, :], mask=m, other=0.0)
    b_s = tl.sigmoid(b_g.to(tl.float32)).to(dtype).to(tl.float32)
    tl.store(y_ptr + o_r[:, None] * D + o_d[None, :], (b_a.to(tl.float32) * b_s).to(dtype), mask=m)


def sigmoid_gate_fwd(attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """attn, gate [N, H, D] (last dims contiguous) -> y [N, H, D]."""
    num_tokens, num_heads, dim = attn.shape
    y = new_buffer((num_tokens, num_heads, dim), attn)
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return y
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(64, 4096 // block_d))
    sigmoid_gate_fwd_kernel[(triton.cdiv(num_rows, block_r),)](
        attn, gate, y, num_rows, num_heads, attn.stride(0), attn.stride(1), gate.stride(0), gate.stride(1), D=dim,
        BR=block_r, BD=block_d, num_warps=4)
    return y


def sigmoid_gate(attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """attn * sigmoid(gate): attn, gate [B, T, H, D] of one dtype -> [B, T, H * D] contiguous."""
    if attn.shape != gate.shape or attn.dtype != gate.dtype or attn.dim() != 4:
        raise ValueError(f"sigmoid_gate: attn {tuple(attn.shape)} {attn.dtype}, gate {tuple(gate.shape)} {gate.dtype}: "
                         "expected both [B, T, H, D] in one dtype")
    batch, tokens, heads, dim = attn.shape
    return sigmoid_gate_fwd(token_rows(attn), token_rows(gate)).view(batch, tokens, heads * dim)

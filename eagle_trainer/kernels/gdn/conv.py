"""Depthwise causal conv1d + SiLU over time, the first op of Qwen3-Next's gated delta net (forward only).

    y[t, c] = silu(bias[c] + sum_{k<K} weight[c, k] * x[t - (K-1) + k, c]),  x[s] = 0 before the document starts
Shapes: x [B, T, C] channels last (HF transposes to [B, C, T] for nn.Conv1d; we read the projection's layout),
weight [C, K] (HF's conv1d.weight [C, 1, K] is accepted too), bias [C] or None -> y [B, T, C] in x's dtype.
Packed documents: x [1, T_total, C] with cu_seqlens [N+1] int32; each token finds its document's start by a
binary search over cu_seqlens (no host sync), so no token sees the previous document (state reset).
Scattered channels: with column_starts [C / S] the channels are read from a wider x [B, T, W] in runs of S
(channel j*S + i is x's column column_starts[j] + i), so Qwen3-Next's conv reads its q, k and v channels straight
out of the in_proj_qkvz output, whose columns interleave them per key head with z; no copy gathers them first.
Arithmetic as HF's causal_conv1d_fn: fp32 accumulation, the pre-activation rounded to the weight's dtype,
SiLU in fp32, rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.utils import new_buffer


@triton.jit
def document_of(cu_ptr, x, num_docs, num_steps):
    """The largest i < num_docs with cu[i] <= x (x a scalar or a tensor of positions; cu ascending, cu[0] <= x):
    a binary search of num_steps = bit_length(num_docs - 1) loads, no host sync. Also used by chunk.py."""
    lo = x * 0
    hi = x * 0 + (num_docs - 1)
    for _ in range(num_steps):
        mid = (lo + hi + 1) // 2
        go_up = tl.load(cu_ptr + mid) <= x
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid - 1)
    return lo


@triton.jit
def causal_conv1d_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, cu_ptr, starts_ptr, T, C, W, num_docs, num_steps,
                             K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, S: tl.constexpr,
                             HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr, SCATTERED: tl.constexpr,
                             ALIGN: tl.constexpr):
    """x rows of W columns; y rows of C. SCATTERED: BC divides the run length S, so a program's BC channels lie
    in one run and read BC consecutive columns of x from that run's start; every start is a multiple of ALIGN,
    which lets the compiler vectorise those loads (unhinted, a loaded start made them 2-byte loads: 2.4x slower
    at Qwen3-Next's widths on an H100)."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t = o_t < T
    m_c = o_c < C
    if IS_VARLEN:
        b_start = tl.load(cu_ptr + document_of(cu_ptr, o_t, num_docs, num_steps))
    else:
        b_start = tl.zeros_like(o_t)
    if SCATTERED:
        start = tl.multiple_of(tl.load(starts_ptr + (i_c * BC) // S), ALIGN)
        o_x = start + tl.multiple_of((i_c * BC) % S, BC) + tl.arange(0, BC)
    else:
        o_x = o_c
    p_x = x_ptr + i_b.to(tl.int64) * T * W + o_x[None, :]
    b_acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        b_acc += tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        o_s = o_t - (K - 1) + k  # source time step of tap k
        m_s = (o_s >= b_start) & m_t
        b_x = tl.load(p_x + o_s.to(tl.int64)[:, None] * W, mask=m_s[:, None] & m_c[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_c * K + k, mask=m_c, other=0.0)
        b_acc += b_x.to(tl.float32) * b_w.to(tl.float32)[None, :]
    b_acc = b_acc.to(w_ptr.dtype.element_ty).to(tl.float32)
    b_y = (b_acc * tl.sigmoid(b_acc)).to(w_ptr.dtype.element_ty)
    p_y = y_ptr + i_b.to(tl.int64) * T * C + o_t.to(tl.int64)[:, None] * C + o_c[None, :]
    tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


def causal_conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None, column_starts: torch.Tensor | None = None,
                      column_align: int = 1) -> torch.Tensor:
    """x [B, T, W] contiguous; weight [C, K]; column_starts [C / S] int32, each a multiple of column_align, or
    None (then W = C)."""
    batch, seq_len, width = x.shape
    channels, kernel_size = weight.shape
    y = new_buffer((batch, seq_len, channels), x)
    if y.numel() == 0:
        return y
    num_docs = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
    run = channels if column_starts is None else channels // column_starts.numel()
    block_t = min(64, triton.next_power_of_2(seq_len))
    block_c = min(128, triton.next_power_of_2(channels))
    if column_starts is not None:
        block_c = min(block_c, run & -run)  # the largest power of two dividing the run: a block in one run
    grid = (triton.cdiv(seq_len, block_t), triton.cdiv(channels, block_c), batch)
    causal_conv1d_fwd_kernel[grid](
        x, weight, bias, y, cu_seqlens, column_starts, seq_len, channels, width, num_docs,
        max(num_docs - 1, 0).bit_length(), K=kernel_size, BT=block_t, BC=block_c, S=run, HAS_BIAS=bias is not None,
        IS_VARLEN=cu_seqlens is not None, SCATTERED=column_starts is not None, ALIGN=column_align, num_warps=4)
    return y


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None,
                       column_starts: torch.Tensor | None = None, column_align: int = 1) -> torch.Tensor:
    """Depthwise causal conv1d over time, then SiLU (Qwen3-Next's conv1d on the concatenated q, k, v channels).

    x [B, T, C]; weight [C, K] or [C, 1, K]; bias [C] or None; cu_seqlens [N+1] int (first 0, last T) for
    packed documents in x [1, T, C]. column_starts [C / S] int (S the run length): the C channels are read from
    x [B, T, W] in runs, channel j*S + i from column column_starts[j] + i (each run inside x's W columns; not
    checked on the device). column_align: a power of two that divides every start (the caller knows them; not
    checked on the device): the runs' loads are vectorised by it. -> [B, T, C] in x's dtype.
    """
    batch, _, width = x.shape
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    channels = width if column_starts is None else weight.shape[0]
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"conv1d weight {tuple(weight.shape)} does not fit x [B, T, {channels}]: "
                         f"expected [C, K] or HF's [C, 1, K]")
    if column_starts is not None:
        runs = column_starts.numel()
        if column_starts.dim() != 1 or runs == 0 or channels % runs or channels // runs > width:
            raise ValueError(f"column_starts {tuple(column_starts.shape)} does not split the conv's {channels} "
                             f"channels into equal runs of at most x's {width} columns: expected [C / S]")
        column_starts = column_starts.to(device=x.device, dtype=torch.int32).contiguous()
    if column_align < 1 or column_align & (column_align - 1):
        raise ValueError(f"column_align={column_align} must be a power of two (1: no promise)")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"conv1d bias {tuple(bias.shape)} does not fit x [B, T, {channels}]: expected [C]")
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"packed documents (cu_seqlens) need x [1, T_total, C], got {tuple(x.shape)}")
        cu_seqlens = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    return causal_conv1d_fwd(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                             cu_seqlens, column_starts, column_align)


__all__ = ["causal_conv1d_silu"]

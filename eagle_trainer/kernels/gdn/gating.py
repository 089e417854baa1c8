"""Per-token, per-value-head decay and write strength of Qwen3-Next's gated delta rule (forward only).

    g    = -exp(A_log) * softplus(a + dt_bias)     fp32 out; softplus as torch's (beta 1, threshold 20)
    beta = sigmoid(b)                              computed in fp32, rounded to b's dtype as HF's b.sigmoid()
Shapes: a, b [..., Hv] (in_proj_ba's halves, any float dtype), or both the in_proj_ba output [..., W] with the
column each head reads; A_log, dt_bias [Hv] -> g, beta [..., Hv].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.utils import new_buffer


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) as torch computes it: x itself above 20; log1p by the exact-log trick (no tl log1p)."""
    e = tl.exp(tl.minimum(x, 20.0))  # no overflow in the branch that is not taken
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def gdn_gating_fwd_kernel(a_ptr, b_ptr, a_cols_ptr, b_cols_ptr, a_log_ptr, dt_bias_ptr, g_ptr, beta_ptr, N, H,
                          stride_a, stride_b, BN: tl.constexpr, COLUMNS: tl.constexpr):
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_h = o_n % H
    o_t = o_n // H
    if COLUMNS:  # head h of a token reads column a_cols[h] of its row of a, b_cols[h] of its row of b
        c_a = tl.load(a_cols_ptr + o_h, mask=m_n, other=0)
        c_b = tl.load(b_cols_ptr + o_h, mask=m_n, other=0)
    else:
        c_a = o_h
        c_b = o_h
    b_a = tl.load(a_ptr + o_t * stride_a + c_a, mask=m_n, other=0.0).to(tl.float32)
    b_b = tl.load(b_ptr + o_t * stride_b + c_b, mask=m_n, other=0.0).to(tl.float32)
    b_a_log = tl.load(a_log_ptr + o_h, mask=m_n, other=0.0).to(tl.float32)
    b_dt = tl.load(dt_bias_ptr + o_h, mask=m_n, other=0.0).to(tl.float32)
    b_g = -tl.exp(b_a_log) * _softplus(b_a + b_dt)
    tl.store(g_ptr + o_n, b_g, mask=m_n)
    tl.store(beta_ptr + o_n, tl.sigmoid(b_b).to(beta_ptr.dtype.element_ty), mask=m_n)


def gdn_gating_fwd(a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor,
                   a_columns: torch.Tensor | None = None,
                   b_columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [N, W] rows with unit column stride; head h reads column h (no column indices) or a_columns[h] /
    b_columns[h] -> g, beta [N, Hv]."""
    num_heads = a_log.shape[0]
    g = new_buffer((a.shape[0], num_heads), a, torch.float32)
    beta = new_buffer((b.shape[0], num_heads), b, b.dtype)
    num = g.numel()
    if num == 0:
        return g, beta
    columns = a_columns is not None
    block_n = min(1024, triton.next_power_of_2(num))
    gdn_gating_fwd_kernel[(triton.cdiv(num, block_n),)](
        a, b, a_columns if columns else a, b_columns if columns else b, a_log, dt_bias, g, beta, num, num_heads,
        a.stride(0), b.stride(0), BN=block_n, COLUMNS=columns, num_warps=4)
    return g, beta


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., W] -> [N, W] rows of one stride with unit column stride: a view where x lies so (a projection's
    output, a slice of its columns), else a copy."""
    if x.stride(-1) == 1:
        try:
            return x.view(-1, x.shape[-1])
        except RuntimeError:  # leading dims that do not merge
            pass
    return x.reshape(-1, x.shape[-1]).contiguous()


def gdn_gating(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
               a_columns: torch.Tensor | None = None,
               b_columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), as Qwen3NextGatedDeltaNet computes them.

    a, b [..., Hv]; A_log, dt_bias [Hv]. -> g [..., Hv] fp32, beta [..., Hv] in b's dtype (HF's rounding).
    With a_columns, b_columns [Hv] (integer, on a's device): a and b are [..., W] rows, e.g. both the in_proj_ba
    output, and head h reads column a_columns[h] of a and b_columns[h] of b (where HF's split takes it from), so the
    split's copies are never made.
    """
    if (a_columns is None) != (b_columns is None):
        raise ValueError("gdn_gating takes a_columns and b_columns together, or neither")
    columns = a_columns is not None
    num_heads = a_columns.shape[0] if columns else a.shape[-1]
    fits = A_log.shape == (num_heads,) and dt_bias.shape == (num_heads,)
    if columns:
        fits = fits and a.shape[:-1] == b.shape[:-1] and a_columns.shape == b_columns.shape == (num_heads,)
    else:
        fits = fits and b.shape == a.shape and a.shape[-1] == num_heads
    if not fits:
        expected = ("a, b [..., W] with the same leading dims and a_columns, b_columns [Hv]" if columns else
                    "a, b [..., Hv]")
        raise ValueError(f"gating inputs a {tuple(a.shape)}, b {tuple(b.shape)}, A_log {tuple(A_log.shape)}, "
                         f"dt_bias {tuple(dt_bias.shape)} do not fit: expected {expected} and [Hv] params")
    if columns:
        a_columns, b_columns = a_columns.contiguous(), b_columns.contiguous()
    g, beta = gdn_gating_fwd(_rows(a), _rows(b), A_log.contiguous(), dt_bias.contiguous(), a_columns, b_columns)
    shape = (*a.shape[:-1], num_heads)
    return g.view(shape), beta.view(shape)


__all__ = ["gdn_gating"]

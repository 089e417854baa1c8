"""Per-token, per-value-head decay and write strength of Qwen3-Next's gated delta rule (forward only).

    g    = -exp(A_log) * softplus(a + dt_bias)     fp32 out; softplus as torch's (beta 1, threshold 20)
    beta = sigmoid(b)                              computed in fp32, rounded to b's dtype as HF's b.sigmoid()
Shapes: a, b [..., Hv] (in_proj_ba's halves, any float dtype); A_log, dt_bias [Hv] -> g, beta [..., Hv].
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
def gdn_gating_fwd_kernel(a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, g_ptr, beta_ptr, N, H, BN: tl.constexpr):
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_h = o_n % H
    b_a = tl.load(a_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_b = tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_a_log = tl.load(a_log_ptr + o_h, mask=m_n, other=0.0).to(tl.float32)
    b_dt = tl.load(dt_bias_ptr + o_h, mask=m_n, other=0.0).to(tl.float32)
    b_g = -tl.exp(b_a_log) * _softplus(b_a + b_dt)
    tl.store(g_ptr + o_n, b_g, mask=m_n)
    tl.store(beta_ptr + o_n, tl.sigmoid(b_b).to(beta_ptr.dtype.element_ty), mask=m_n)


def gdn_gating_fwd(a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor,
                   dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = a.numel()
    g = new_buffer(a.shape, a, torch.float32)
    beta = new_buffer(b.shape, b, b.dtype)
    if num == 0:
        return g, beta
    block_n = min(1024, triton.next_power_of_2(num))
    gdn_gating_fwd_kernel[(triton.cdiv(num, block_n),)](a, b, a_log, dt_bias, g, beta, num, a.shape[-1],
                                                        BN=block_n, num_warps=4)
    return g, beta


def gdn_gating(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
               dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), as Qwen3NextGatedDeltaNet computes them.

    a, b [..., Hv]; A_log, dt_bias [Hv]. -> g [..., Hv] fp32, beta [..., Hv] in b's dtype (HF's rounding).
    """
    num_heads = a.shape[-1]
    if b.shape != a.shape or A_log.shape != (num_heads,) or dt_bias.shape != (num_heads,):
        raise ValueError(f"gating inputs a {tuple(a.shape)}, b {tuple(b.shape)}, A_log {tuple(A_log.shape)}, "
                         f"dt_bias {tuple(dt_bias.shape)} do not fit: expected a, b [..., Hv] and [Hv] params")
    return gdn_gating_fwd(a.contiguous(), b.contiguous(), A_log.contiguous(), dt_bias.contiguous())


__all__ = ["gdn_gating"]

"""The merge kernels of TTT attention: step 0's output and log-sum-exp joined with the step's diagonal terms.

Per token t and query head (grouped under kv head g), with the n diagonal keys/values k_j, v_j of steps 1..n at t:
    forward:  s_j = q . k_j * scale,   lse = logsumexp(lse0, s_1..s_n)
              out = out0 exp(lse0 - lse) + sum_j exp(s_j - lse) v_j                 (merge_fwd_kernel)
    backward: p_j = exp(s_j - lse), ds_j = p_j (dout.v_j - rowsum(dout * out)):
              dq += sum_j ds_j k_j scale,  dk_j = sum_heads ds_j q scale,  dv_j = sum_heads p_j dout (merge_bwd_kernel)
One program per (token, kv head) holds the kv head's G query heads. Off a GPU without the interpreter the
launchers fall back to reference.py.
Shapes: q, out0, out [B, nh, T, D]; lse0, lse [B, nh, T] fp32; diagonal keys/values stacked [n, B, nkv, T, D]
(any strides with a unit stride in D, the same for keys and values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.ttt_attention.reference import merge_backward_reference, merge_forward_reference
from eagle_trainer.kernels.utils import new_buffer, triton_runs_on


@triton.jit
def _program_tile(T, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """This program's token (b, t), kv head g, its G query heads and the head-dim offsets, with their masks."""
    pid = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    oh, od = tl.arange(0, BG), tl.arange(0, BD)
    mh, md = oh < G, od < D
    return pid // T, pid % T, g, (g * G + oh).to(tl.int64), od, mh, md, mh[:, None] & md[None, :]


@triton.jit
def _load_heads(ptr, b, heads, t, od, s_b, s_h, s_t, mask):
    """[BG, BD] fp32 tile of a [B, nh, T, D] tensor (strides s_b, s_h, s_t; unit stride in D) at token (b, t)."""
    return tl.load(ptr + b * s_b + heads[:, None] * s_h + t * s_t + od[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def merge_fwd_kernel(q_ptr, o0_ptr, l0_ptr, k_ptr, v_ptr, o_ptr, l_ptr, T, NH, n_diag, scale,
                     sq_b, sq_h, sq_t, so_b, so_h, so_t, sk_n, sk_b, sk_h, sk_t,
                     G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    b, t, g, heads, od, mh, md, m2 = _program_tile(T, G, BG, D, BD)
    q = _load_heads(q_ptr, b, heads, t, od, sq_b, sq_h, sq_t, m2)
    l0 = tl.load(l0_ptr + (b * NH + heads) * T + t, mask=mh, other=0.0)
    kv = b * sk_b + g * sk_h + t * sk_t
    run_max, run_sum = l0, tl.full((BG,), 1.0, tl.float32)
    for j in range(n_diag):
        kj = tl.load(k_ptr + kv + j * sk_n + od, mask=md, other=0.0).to(tl.float32)
        s = tl.sum(q * kj[None, :], 1) * scale
        new = tl.maximum(run_max, s)
        run_sum = run_sum * tl.exp(run_max - new) + tl.exp(s - new)
        run_max = new
    lse = run_max + tl.log(run_sum)
    o_off = b * so_b + heads[:, None] * so_h + t * so_t + od[None, :]
    o = _load_heads(o0_ptr, b, heads, t, od, so_b, so_h, so_t, m2) * tl.exp(l0 - lse)[:, None]
    for j in range(n_diag):
        kj = tl.load(k_ptr + kv + j * sk_n + od, mask=md, other=0.0).to(tl.float32)
        vj = tl.load(v_ptr + kv + j * sk_n + od, mask=md, other=0.0).to(tl.float32)
        s = tl.sum(q * kj[None, :], 1) * scale
        o += tl.exp(s - lse)[:, None] * vj[None, :]
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=m2)
    tl.store(l_ptr + (b * NH + heads) * T + t, lse, mask=mh)


@triton.jit
def merge_bwd_kernel(do_ptr, o_ptr, q_ptr, l_ptr, dq_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr, T, NH, n_diag, scale,
                     sdo_b, sdo_h, sdo_t, so_b, so_h, so_t, sq_b, sq_h, sq_t, sdq_b, sdq_h, sdq_t,
                     sk_n, sk_b, sk_h, sk_t,
                     G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    b, t, g, heads, od, mh, md, m2 = _program_tile(T, G, BG, D, BD)
    do = _load_heads(do_ptr, b, heads, t, od, sdo_b, sdo_h, sdo_t, m2)
    o = _load_heads(o_ptr, b, heads, t, od, so_b, so_h, so_t, m2)
    q = _load_heads(q_ptr, b, heads, t, od, sq_b, sq_h, sq_t, m2)
    lse = tl.load(l_ptr + (b * NH + heads) * T + t, mask=mh, other=0.0)
    dq = _load_heads(dq_ptr, b, heads, t, od, sdq_b, sdq_h, sdq_t, m2)
    dq_off = b * sdq_b + heads[:, None] * sdq_h + t * sdq_t + od[None, :]
    rowdot = tl.sum(do * o, 1)
    kv = b * sk_b + g * sk_h + t * sk_t
    for j in range(n_diag):
        kj = tl.load(k_ptr + kv + j * sk_n + od, mask=md, other=0.0).to(tl.float32)
        vj = tl.load(v_ptr + kv + j * sk_n + od, mask=md, other=0.0).to(tl.float32)
        p = tl.where(mh, tl.exp(tl.sum(q * kj[None, :], 1) * scale - lse), 0.0)
        ds = p * (tl.sum(do * vj[None, :], 1) - rowdot)
        dq += ds[:, None] * kj[None, :] * scale
        tl.store(dk_ptr + kv + j * sk_n + od, (tl.sum(ds[:, None] * q, 0) * scale).to(dk_ptr.dtype.element_ty),
                 mask=md)
        tl.store(dv_ptr + kv + j * sk_n + od, tl.sum(p[:, None] * do, 0).to(dv_ptr.dtype.element_ty), mask=md)
    tl.store(dq_ptr + dq_off, dq.to(dq_ptr.dtype.element_ty), mask=m2)


def new_like(x: torch.Tensor) -> torch.Tensor:
    """A new buffer with x's shape, dtype and strides (x dense: a permutation of a contiguous layout)."""
    return new_buffer(x.shape, x, x.dtype).as_strided(x.shape, x.stride())


def _meta(q: torch.Tensor, nkv: int) -> dict:
    group = q.shape[1] // nkv
    # one warp per program: the cross-head sums of dk, dv stay inside it (H100, T=8192, G 8, D 128: backward 0.24 ms
    # with 1 warp, 0.62 ms with 2; forward 0.17 vs 0.25 ms)
    return dict(G=group, BG=triton.next_power_of_2(group), D=q.shape[-1], BD=triton.next_power_of_2(q.shape[-1]),
                num_warps=1)


def merge_forward(q, out0, lse0, diag_k, diag_v, scale):
    """-> out (out0's layout and dtype), lse [B, nh, T] fp32. See the module docstring."""
    if not triton_runs_on(q.device):
        return merge_forward_reference(q, out0, lse0, diag_k, diag_v, scale)
    b, nh, t, _ = q.shape
    n, nkv = diag_k.shape[0], diag_k.shape[2]
    assert diag_k.stride() == diag_v.stride() and diag_k.stride(-1) == 1 and lse0.is_contiguous()
    out = new_like(out0)
    lse = new_buffer((b, nh, t), q, torch.float32)
    merge_fwd_kernel[(b * t, nkv)](q, out0, lse0, diag_k, diag_v, out, lse, t, nh, n, scale,
                                   q.stride(0), q.stride(1), q.stride(2), out0.stride(0), out0.stride(1),
                                   out0.stride(2), *diag_k.stride()[:4], **_meta(q, nkv))
    return out, lse


def merge_backward(dout, out, q, lse, dq0, diag_k, diag_v, scale):
    """-> dq (dq0 updated in place), dk, dv [n, B, nkv, T, D] in the diagonal keys' dtype and layout."""
    if not triton_runs_on(q.device):
        dq, dk, dv = merge_backward_reference(dout, out, q, lse, dq0, diag_k, diag_v, scale)
        return dq, dk.to(diag_k.dtype), dv.to(diag_v.dtype)
    b, nh, t, _ = q.shape
    n, nkv = diag_k.shape[0], diag_k.shape[2]
    assert diag_k.stride() == diag_v.stride() and diag_k.stride(-1) == 1
    dk, dv = new_like(diag_k), new_like(diag_v)  # the kernel writes them with the keys' strides
    merge_bwd_kernel[(b * t, nkv)](dout, out, q, lse, dq0, diag_k, diag_v, dk, dv, t, nh, n, scale,
                                   *dout.stride()[:3], *out.stride()[:3], *q.stride()[:3], *dq0.stride()[:3],
                                   *diag_k.stride()[:4], **_meta(q, nkv))
    return dq0, dk, dv

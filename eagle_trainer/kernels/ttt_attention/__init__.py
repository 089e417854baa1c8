"""TTT attention (DESIGN section 4) with a fused step-0 kernel and the diagonal terms merged through the log-sum-exp.

At TTT step k, query t attends the step-0 keys <= t (causal; with packing also same-document) and the k diagonal
keys of steps 1..k at t. The step-0 block is one library attention call that also returns its log-sum-exp:
cuDNN's fused attention (unpacked batches, the fastest on Hopper), FlashAttention-2 varlen (packed batches: each
document is one sequence) or aten's CPU flash attention (CPU, tests). Grouped-query heads are read as they are.

    forward:  out0, lse0 = step0(q, k0, v0)
              s_j = q . k_j * scale,   lse = logsumexp(lse0, s_1..s_k)
              out = out0 exp(lse0 - lse) + sum_j exp(s_j - lse) v_j                 (merge_fwd_kernel)
    backward: the library's backward called with the MERGED out and lse: its P = exp(S - lse) is then the merged
              softmax over the step-0 keys, and its rowsum(dout * out) the merged one, so dq, dk0, dv0 are exact;
              the diagonal terms add p_j = exp(s_j - lse), ds_j = p_j (dout.v_j - rowsum(dout * out)):
              dq += sum_j ds_j k_j scale,  dk_j = sum_heads ds_j q scale,  dv_j = sum_heads p_j dout (merge_bwd_kernel)

Nothing [T, T] is held; saved for backward: q, k0, v0 (shared by all steps), out, lse, the diagonal keys/values
(views of the unroll's `DiagonalStore`, or without one the step's own tensors, stacked [n, ...] for the kernels only
while they run).
reference.py holds the merge kernels in plain torch. Shapes: q [B, nh, T, D]; k0/v0 [B, nkv, T, D];
diagonal keys/values stacked [n, B, nkv, T, D] (any strides with a unit stride in D, the same for keys and
values); lse [B, nh, T] fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.moe.configs import interpreting
from eagle_trainer.kernels.ttt_attention.reference import (
    merge_backward_reference,
    merge_forward_reference,
)

__all__ = ["DiagonalStore", "merge_backward", "merge_forward", "step0_kernel", "ttt_attention"]


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


def new_buffer(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised output memory (tests swap this for NaN-filled buffers)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def _like(x: torch.Tensor) -> torch.Tensor:
    """A new buffer with x's shape, dtype and strides (x dense: a permutation of a contiguous layout)."""
    return new_buffer(x.shape, x, x.dtype).as_strided(x.shape, x.stride())


def _use_kernels(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" or interpreting()


def _meta(q: torch.Tensor, nkv: int) -> dict:
    group = q.shape[1] // nkv
    # one warp per program: on an H100 at T=8192 (G 8, D 128) the backward ran in 0.24 ms with 1 warp, 0.62 / 1.99 /
    # 3.66 ms with 2 / 4 / 8 (the cross-head sums of dk, dv stay inside one warp); the forward 0.17 vs 0.25 ms
    return dict(G=group, BG=triton.next_power_of_2(group), D=q.shape[-1], BD=triton.next_power_of_2(q.shape[-1]),
                num_warps=1)


def merge_forward(q, out0, lse0, diag_k, diag_v, scale):
    """-> out (out0's layout and dtype), lse [B, nh, T] fp32. See the module docstring."""
    if not _use_kernels(q):
        return merge_forward_reference(q, out0, lse0, diag_k, diag_v, scale)
    b, nh, t, _ = q.shape
    n, nkv = diag_k.shape[0], diag_k.shape[2]
    assert diag_k.stride() == diag_v.stride() and diag_k.stride(-1) == 1 and lse0.is_contiguous()
    out = _like(out0)
    lse = new_buffer((b, nh, t), q, torch.float32)
    merge_fwd_kernel[(b * t, nkv)](q, out0, lse0, diag_k, diag_v, out, lse, t, nh, n, scale,
                                   q.stride(0), q.stride(1), q.stride(2), out0.stride(0), out0.stride(1),
                                   out0.stride(2), *diag_k.stride()[:4], **_meta(q, nkv))
    return out, lse


def merge_backward(dout, out, q, lse, dq0, diag_k, diag_v, scale):
    """-> dq (dq0 updated in place), dk, dv [n, B, nkv, T, D] in the diagonal keys' dtype and layout."""
    if not _use_kernels(q):
        dq, dk, dv = merge_backward_reference(dout, out, q, lse, dq0, diag_k, diag_v, scale)
        return dq, dk.to(diag_k.dtype), dv.to(diag_v.dtype)
    b, nh, t, _ = q.shape
    n, nkv = diag_k.shape[0], diag_k.shape[2]
    assert diag_k.stride() == diag_v.stride() and diag_k.stride(-1) == 1
    dk, dv = _like(diag_k), _like(diag_v)  # the kernel writes them with the keys' strides
    merge_bwd_kernel[(b * t, nkv)](dout, out, q, lse, dq0, diag_k, diag_v, dk, dv, t, nh, n, scale,
                                   *dout.stride()[:3], *out.stride()[:3], *q.stride()[:3], *dq0.stride()[:3],
                                   *diag_k.stride()[:4], **_meta(q, nkv))
    return dq0, dk, dv


class CudnnCausal:
    """Step 0 of an unpacked batch: cuDNN's fused causal attention (grouped-query heads native)."""

    def forward(self, q, k, v, scale):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
        out, lse = res[0], res[1]  # lse [B, nh, T, 1]
        return out, lse.reshape(q.shape[:3]).contiguous(), res[2:8]

    def backward(self, dout, q, k, v, out, lse, saved, scale):
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse[..., None], seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True,
            scale=scale)


class FlashVarlenCausal:
    """Step 0 of a packed row (B = 1): FlashAttention-2 varlen, each document one causal sequence."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int):
        self.cu, self.max_len = cu_seqlens.to(torch.int32), max_len

    @staticmethod
    def _tokens(x):  # [1, n, T, D] -> [T, n, D] with unit stride in D
        x = x[0].transpose(0, 1)
        return x if x.stride(-1) == 1 else x.contiguous()

    def forward(self, q, k, v, scale):
        q3, k3, v3 = (self._tokens(x) for x in (q, k, v))
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q3, k3, v3, self.cu, self.cu, self.max_len, self.max_len, 0.0, True, False, scale=scale)
        return out.transpose(0, 1)[None], lse[None], (rng, unused)  # out [1, nh, T, D]; lse [1, nh, T]

    def backward(self, dout, q, k, v, out, lse, saved, scale):
        rng, unused = saved
        q3, k3, v3, o3, do3 = (self._tokens(x) for x in (q, k, v, out, dout))
        grads = torch.ops.aten._flash_attention_backward(
            do3, q3, k3, v3, o3, lse[0], self.cu, self.cu, self.max_len, self.max_len, 0.0, True, rng, unused,
            scale=scale)
        return tuple(g.transpose(0, 1)[None] for g in grads)


class CpuFlash:
    """Step 0 on the CPU (tests): aten's CPU flash attention, causal or under a [B, 1, T, T] same-document mask."""

    def __init__(self, allowed: torch.Tensor | None = None):
        self.allowed = allowed  # bool [B, 1, T, T] or None (causal)

    def _bias(self, q):  # the op takes an additive mask in q's dtype
        if self.allowed is None:
            return None
        return torch.zeros(self.allowed.shape, dtype=q.dtype).masked_fill_(~self.allowed, float("-inf"))

    def forward(self, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, self.allowed is None, attn_mask=self._bias(q), scale=scale)
        return out, lse.contiguous(), None

    def backward(self, dout, q, k, v, out, lse, saved, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, self.allowed is None, attn_mask=self._bias(q), scale=scale)


def step0_kernel(device: torch.device, documents: torch.Tensor | None = None):
    """The step-0 attention for a batch: CudnnCausal / FlashVarlenCausal (packed, from `documents` [1, T]) on a
    GPU, CpuFlash on the CPU. Built once per unroll (a packed row's document bounds cost one host sync)."""
    if device.type != "cuda":
        if documents is None:
            return CpuFlash()
        t = documents.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=documents.device).tril()
        return CpuFlash((causal & (documents[:, :, None] == documents[:, None, :]))[:, None])
    if documents is None:
        return CudnnCausal()
    if documents.shape[0] != 1:
        raise ValueError(f"packed TTT attention takes one row of documents, got documents {tuple(documents.shape)}")
    starts = torch.nonzero(documents[0, 1:] != documents[0, :-1]).flatten() + 1
    n = documents.shape[1]
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), n)])
    return FlashVarlenCausal(cu, int((cu[1:] - cu[:-1]).max()))


class DiagonalStore:
    """The diagonal keys and values of one unroll, each in one buffer [K-1, B, T, nkv, D] filled as the steps make
    them: step k hands the merge kernels views of its k entries [k, B, nkv, T, D] (strided, token-major as the draft
    makes them) instead of stacking k copies, forward and backward. Entries are written once and never change, so
    the steps' autograd nodes hold the views without version checks."""

    def __init__(self, capacity: int):
        self.capacity, self.k, self.v, self.ptrs = capacity, None, None, []

    def extend(self, keys: list, values: list) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values: this step's diagonal lists (the earlier steps' lists, one entry longer) -> stacked views."""
        n = len(keys)
        if n > self.capacity or [k.data_ptr() for k in keys[:len(self.ptrs)]] != self.ptrs:
            raise ValueError(f"DiagonalStore(capacity={self.capacity}) got {n} diagonal keys that do not extend the "
                             f"{len(self.ptrs)} it holds: one store per unroll, one entry more per step")
        if self.k is None:
            shape = (self.capacity, *keys[0].transpose(1, 2).shape)  # [K-1, B, T, nkv, D]
            self.k = torch.empty(shape, device=keys[0].device, dtype=keys[0].dtype)
            self.v = torch.empty(shape, device=values[0].device, dtype=values[0].dtype)
        for j in range(len(self.ptrs), n):
            self.k[j].copy_(keys[j].transpose(1, 2))
            self.v[j].copy_(values[j].transpose(1, 2))
            self.ptrs.append(keys[j].data_ptr())
        return self.k[:n].transpose(2, 3), self.v[:n].transpose(2, 3)


class _TTTAttention(torch.autograd.Function):
    """One step's attention; the diagonal keys then values come as separate tensors (`*diag`). With a
    `DiagonalStore` the merge kernels read the store's views of them (kept for backward: the tensors themselves are
    not); without one they are saved as they are and stacked for the kernels only while they run: a stacked copy
    kept per step would hold the j-th step's keys K-j times over the unroll."""

    @staticmethod
    def forward(ctx, step0, store, q, k0, v0, *diag):
        scale = q.shape[-1] ** -0.5
        out0, lse0, saved = step0.forward(q, k0, v0, scale)
        n = len(diag) // 2
        stacked = None
        if n == 0:
            out, lse = out0, lse0
        else:
            stacked = store.extend(diag[:n], diag[n:]) if store else (torch.stack(diag[:n]), torch.stack(diag[n:]))
            out, lse = merge_forward(q, out0, lse0, *stacked, scale)
        ctx.save_for_backward(q, k0, v0, out, lse, *(diag if store is None else ()))
        ctx.step0, ctx.saved, ctx.scale, ctx.n = step0, saved, scale, n
        ctx.stacked = stacked if store else None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k0, v0, out, lse, *diag = ctx.saved_tensors
        if dout.stride() != out.stride():  # the libraries read dout in out's layout
            dout = _like(out).copy_(dout)
        dq, dk0, dv0 = ctx.step0.backward(dout, q, k0, v0, out, lse, ctx.saved, ctx.scale)
        n = ctx.n
        if n == 0:
            return None, None, dq, dk0, dv0
        stacked = ctx.stacked or (torch.stack(diag[:n]), torch.stack(diag[n:]))
        ctx.stacked = None
        dq, ddk, ddv = merge_backward(dout, out, q, lse, dq, *stacked, ctx.scale)
        return None, None, dq, dk0, dv0, *ddk.unbind(0), *ddv.unbind(0)


def ttt_attention(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, diag_k: list, diag_v: list,
                  step0=None, store: DiagonalStore | None = None) -> torch.Tensor:
    """TTT attention of one step: q [B, nh, T, D]; k0/v0 [B, nkv, T, D]; diag_k/diag_v: the k earlier steps'
    keys/values at each position (lists of [B, nkv, T, D]); step0: `step0_kernel(...)` (default: causal, by
    q's device); store: the unroll's `DiagonalStore` (default: stack the diagonal terms per call).
    -> [B, nh, T, D] in q's dtype (bf16/fp16 on a GPU)."""
    if len(diag_k) != len(diag_v):
        raise ValueError(f"ttt_attention got {len(diag_k)} diagonal keys and {len(diag_v)} values")
    return _TTTAttention.apply(step0 or step0_kernel(q.device), store, q, k0, v0, *diag_k, *diag_v)

"""TTT attention of one step: the autograd Function that joins step 0 (step0.py) and the merge kernels (merge.py).

    forward:  out0, lse0 = step0(q, k0, v0);  out, lse = merge_forward(q, out0, lse0, diagonal keys/values)
    backward: the library's backward called with the MERGED out and lse: its P = exp(S - lse) is then the merged
              softmax over the step-0 keys, and its rowsum(dout * out) the merged one, so dq, dk0, dv0 are exact;
              merge_backward adds the diagonal terms' part of dq and their dk, dv.
Nothing [T, T] is held; saved for backward: q, k0, v0 (shared by all steps), out, lse, the diagonal keys/values
(views of the unroll's `DiagonalStore`, or without one the step's own tensors, stacked [n, ...] for the kernels only
while they run). Shapes: q [B, nh, T, D]; k0/v0 and each diagonal key/value [B, nkv, T, D].
"""

from __future__ import annotations

import torch

from eagle_trainer.kernels.ttt_attention.merge import merge_backward, merge_forward, new_like
from eagle_trainer.kernels.ttt_attention.step0 import step0_kernel


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
            dout = new_like(out).copy_(dout)
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

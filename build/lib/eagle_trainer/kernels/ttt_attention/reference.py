"""Plain-torch references of the TTT attention merge kernels (kernels/ttt_attention), in fp32 (fp64 in, fp64 out)."""

from __future__ import annotations

import torch


def _grouped(x: torch.Tensor, nkv: int, dim: int = 1) -> torch.Tensor:
    """Split the head dim `dim` (nh) into [nkv, nh / nkv]: query heads grouped by their kv head."""
    return x.unflatten(dim, (nkv, x.shape[dim] // nkv))


def diag_scores(q: torch.Tensor, diag_k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, nh, T, D], diag_k [n, B, nkv, T, D] -> s [n, B, nh, T] (acc dtype): q at t against step-j's key at t."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = _grouped(q.to(acc), diag_k.shape[2])  # [B, nkv, G, T, D]
    s = (qg[None] * diag_k.to(acc)[:, :, :, None]).sum(-1) * scale  # [n, B, nkv, G, T]
    return s.flatten(2, 3)


def merge_forward_reference(q, out0, lse0, diag_k, diag_v, scale):
    """Softmax over [step-0 keys (given as out0, lse0), the n diagonal keys]: -> out [B, nh, T, D] (q's dtype),
    lse [B, nh, T] (acc dtype)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    nkv = diag_k.shape[2]
    s = diag_scores(q, diag_k, scale)  # [n, B, nh, T]
    lse = torch.logsumexp(torch.cat([lse0.to(acc)[None], s]), dim=0)
    out = out0.to(acc) * (lse0.to(acc) - lse).exp()[..., None]
    w = _grouped((s - lse).exp(), nkv, dim=2)  # [n, B, nkv, G, T]
    out = out + (w[..., None] * diag_v.to(acc)[:, :, :, None]).sum(0).flatten(1, 2)
    return out.to(q.dtype), lse


def merge_backward_reference(dout, out, q, lse, dq0, diag_k, diag_v, scale):
    """The diagonal terms' gradients under the merged softmax: -> dq (dq0 + the diagonal part, q's dtype),
    dk, dv [n, B, nkv, T, D] (acc dtype)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    nkv = diag_k.shape[2]
    s = diag_scores(q, diag_k, scale)
    p = _grouped((s - lse.to(acc)).exp(), nkv, dim=2)  # [n, B, nkv, G, T]
    do, o, qa = (_grouped(x.to(acc), nkv) for x in (dout, out, q))  # [B, nkv, G, T, D]
    rowdot = (do * o).sum(-1)  # [B, nkv, G, T]
    kv, vv = diag_k.to(acc)[:, :, :, None], diag_v.to(acc)[:, :, :, None]  # [n, B, nkv, 1, T, D]
    dp = (do[None] * vv).sum(-1)  # [n, B, nkv, G, T]
    ds = p * (dp - rowdot[None])
    dq = dq0.to(acc) + (ds[..., None] * kv).sum(0).flatten(1, 2) * scale
    dk = (ds[..., None] * qa[None]).sum(3) * scale
    dv = (p[..., None] * do[None]).sum(3)
    return dq.to(q.dtype), dk, dv

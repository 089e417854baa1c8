"""Plain-torch reference of the gated delta rule (Qwen3-Next linear attention core), token by token in fp64.

Shapes: T tokens, Hk key heads, Hv = G * Hk value heads (value head h reads key head h // G), Dk, Dv head dims.
    q, k      [B, T, Hk, Dk]  or packed [1, T_total, Hk, Dk] with cu_seqlens [N+1] int32
    v         [B, T, Hv, Dv]
    g, beta   [B, T, Hv]      log decay (<= 0) and write strength in (0, 1)
    o         [B, T, Hv, Dv]
Per value head, with the state S [Dk, Dv] at zero at each sequence (document) start:
    S = exp(g_t) * S;   S = S + k_t^T (beta_t * (v_t - k_t S));   o_t = scale * q_t S
which is HF transformers' torch_recurrent_gated_delta_rule (qwen3_next) with packed documents added.
"""

from __future__ import annotations

import itertools

import torch


def l2norm_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (HF's and FLA's l2norm)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _recurrence(q, k, v, g, beta):
    """Whole sequences from a zero state: q, k [B, T, Hv, Dk] (heads grouped), v [B, T, Hv, Dv], g, beta [B, T, Hv]."""
    batch, num_tokens, num_v_heads, head_k_dim = k.shape
    state = q.new_zeros(batch, num_v_heads, head_k_dim, v.shape[-1])  # [B, Hv, Dk, Dv]
    out = torch.empty_like(v)
    for t in range(num_tokens):
        state = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t]  # [B, Hv, Dk]
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, state))
        state = state + k_t[..., None] * delta[..., None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], state)
    return out


def gated_delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                               scale: float | None = None, l2norm_qk: bool = True) -> torch.Tensor:
    """The gated delta rule in fp64, one token at a time; -> o [B, T, Hv, Dv] in v's dtype (shapes above).

    With cu_seqlens (B must be 1) the state restarts at every document start cu_seqlens[i].
    l2norm_qk normalises q and k per head first (Qwen3-Next's use_qk_l2norm_in_kernel); scale defaults to Dk^-0.5.
    """
    num_k_heads, head_k_dim = k.shape[-2:]
    group = v.shape[-2] // num_k_heads
    dtype = v.dtype
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    if l2norm_qk:
        q, k = l2norm_reference(q), l2norm_reference(k)
    q = q * (head_k_dim ** -0.5 if scale is None else scale)
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)  # [B, T, Hv, Dk]
    if cu_seqlens is None:
        return _recurrence(q, k, v, g, beta).to(dtype)
    out = torch.empty_like(v)
    for bos, eos in itertools.pairwise(cu_seqlens.tolist()):
        out[:, bos:eos] = _recurrence(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], g[:, bos:eos], beta[:, bos:eos])
    return out.to(dtype)

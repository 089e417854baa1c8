"""Plain-torch references of the gated delta net's kernels: the ground truth in the tests, written for reading.

    causal_conv1d_silu_reference  x [B, T, C], weight [C, K] (or [C, 1, K]), bias [C] -> [B, T, C]   (conv.py)
    gdn_gating_reference          a, b [..., Hv], A_log, dt_bias [Hv] -> g fp32, beta in b's dtype   (gating.py)
    gated_rms_norm_reference      x, z [..., D], weight [D] -> [..., D] in x's dtype                 (norm.py)
    gated_delta_rule_reference    the delta rule token by token in fp64 (shapes below)               (chunk.py)
    tree_gated_delta_rule_reference  the delta rule over a tree of tokens, a depth at a time   (tree.py)
The small ops use HF's Qwen3NextGatedDeltaNet arithmetic; packed documents are cut apart by cu_seqlens and run one
by one.

Gated delta rule. Shapes: T tokens, Hk key heads, Hv = G * Hk value heads (value head h reads key head h // G),
Dk, Dv head dims.
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
import torch.nn.functional as F


def causal_conv1d_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    if weight.dim() == 3:
        weight = weight[:, 0]
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        return torch.cat([causal_conv1d_silu_reference(x[:, start:end], weight, bias)
                          for start, end in itertools.pairwise(bounds)], dim=1)
    seq_len, kernel_size = x.shape[1], weight.shape[1]
    h = F.pad(x.to(torch.float32), (0, 0, kernel_size - 1, 0))  # [B, K-1+T, C]: zeros before the first token
    out = torch.zeros_like(h[:, :seq_len])
    if bias is not None:
        out += bias.to(torch.float32)
    for k in range(kernel_size):
        out += weight[:, k].to(torch.float32) * h[:, k:k + seq_len]
    return F.silu(out.to(weight.dtype).to(torch.float32)).to(weight.dtype).to(x.dtype)


def gdn_gating_reference(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
                         dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = -A_log.to(torch.float32).exp() * F.softplus(a.to(torch.float32) + dt_bias.to(torch.float32))
    return g, torch.sigmoid(b.to(torch.float32)).to(b.dtype)


def gated_rms_norm_reference(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(x.dtype)
    return (h * F.silu(z.to(torch.float32))).to(x.dtype)


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


def tree_gated_delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                    beta: torch.Tensor, parents: torch.Tensor, s0: torch.Tensor,
                                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule over a tree, a depth at a time (tree.py's shapes: q, k [n, Hk, Dk] as projected, v [n, Hv, Dv],
    g, beta [n, Hv], parents [n] with -1 for s0 [Hv, Dk, Dv]); q and k are l2-normalised, q scaled (default
    Dk^-0.5) and both expanded to the value heads, then each node advances its parent's state: the nodes of one depth
    together, as their parents all lie one depth up.
    -> (o [n, Hv, Dv], states [n, Hv, Dk, Dv]) in fp32 or the inputs' wider dtype."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    group = v.shape[1] // k.shape[1]
    q, k = (l2norm_reference(x.to(dtype)).repeat_interleave(group, dim=1) for x in (q, k))
    q = q * (k.shape[-1] ** -0.5 if scale is None else scale)
    v, g, beta, s0 = (x.to(dtype) for x in (v, g, beta, s0))
    # states[0] is s0, states[1 + i] node i's, so a parent of -1 reads s0
    states = torch.cat([s0[None], v.new_empty(k.shape[0], *s0.shape)])
    levels, depth_of = [], []
    for i, parent in enumerate(parents.tolist()):
        depth_of.append(0 if parent < 0 else depth_of[parent] + 1)
        if depth_of[i] == len(levels):
            levels.append([])
        levels[depth_of[i]].append(i)
    for nodes in levels:
        # an EAGLE tree lists its nodes depth by depth, so a level is mostly a run of rows
        run = nodes[-1] - nodes[0] + 1 == len(nodes)
        rows = slice(nodes[0], nodes[-1] + 1) if run else torch.tensor(nodes, device=v.device)
        state = states[parents[rows] + 1] * g[rows].exp()[:, :, None, None]  # [m, Hv, Dk, Dv]
        delta = beta[rows, :, None] * (v[rows] - torch.einsum("mhk,mhkv->mhv", k[rows], state))
        states[1:][rows] = state + k[rows, :, :, None] * delta[:, :, None, :]
    states = states[1:]
    return torch.einsum("nhk,nhkv->nhv", q, states), states

"""The gated delta rule over a tree of tokens (speculative decoding's draft tree), in one launch per layer.

Each node advances its parent's state by its own token (the root's parent is the committed state S0), so every
root-to-node path sees exactly the states plain decoding along it would. Every node's state is written out: after
verification, the accepted path's last node's state becomes the committed one without running its tokens again.

    q, k = l2norm(q) * scale, l2norm(k)   (in fp32; key head h // G serves value head h)
    S_i = exp(g_i) * S_parent(i);   S_i = S_i + k_i^T (beta_i * (v_i - k_i S_i));   o_i = q_i S_i

q, k and v come as the conv's output left them (rows of any stride, heads contiguous): the normalisation, the
scale and the grouping of value heads onto key heads happen here, so that a tree forward spends one launch per
layer on the rule, not a dozen element-wise ops. One program per (value head, BV columns of Dv) walks the nodes
in order, parents first; a node's parent state is read back from the states buffer (the same program wrote it:
same layout, so the same threads), whose slot 0 holds S0.

Shapes: n nodes, Hk key heads, Hv = G * Hk value heads, Dk/Dv head dims.
    q, k [n, Hk, Dk]; v [n, Hv, Dv]; g, beta [n, Hv]; parents [n] int (-1: the root's parent, S0); s0 [Hv, Dk, Dv]
    -> o [n, Hv, Dv], states [n, Hv, Dk, Dv], all fp32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.utils import new_buffer

L2NORM_EPS = 1e-6  # HF's and fla's l2norm


@triton.jit
def tree_delta_rule_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, parents_ptr, s_ptr, o_ptr, N, HV, scale, eps,
                           stride_qn, stride_kn, stride_vn, GROUP: tl.constexpr, DK: tl.constexpr,
                           DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """s_ptr: [n + 1, Hv, Dk, Dv] with the committed state in slot 0 and node i's written to slot i + 1."""
    head = tl.program_id(0)
    key_head = head // GROUP
    o_k = tl.arange(0, BK)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_s = m_k[:, None] & m_v[None, :]
    state_offsets = head * DK * DV + o_k[:, None] * DV + o_v[None, :]  # [BK, BV] inside one slot's [Hv, Dk, Dv]
    slot = HV * DK * DV
    for i in range(N):
        parent_slot = tl.load(parents_ptr + i).to(tl.int64) + 1
        b_s = tl.load(s_ptr + parent_slot * slot + state_offsets, mask=m_s, other=0.0)
        b_k = tl.load(k_ptr + i * stride_kn + key_head * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_q = tl.load(q_ptr + i * stride_qn + key_head * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + eps)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + eps) * scale
        b_v = tl.load(v_ptr + i * stride_vn + head * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        row = i * HV + head
        b_g = tl.load(g_ptr + row).to(tl.float32)
        b_beta = tl.load(beta_ptr + row).to(tl.float32)
        b_s = b_s * tl.exp(b_g)
        delta = b_beta * (b_v - tl.sum(b_k[:, None] * b_s, 0))  # [BV]
        b_s = b_s + b_k[:, None] * delta[None, :]
        tl.store(s_ptr + (i + 1) * slot + state_offsets, b_s, mask=m_s)
        tl.store(o_ptr + row * DV + o_v, tl.sum(b_q[:, None] * b_s, 0), mask=m_v)
        tl.debug_barrier()  # node i's state is in memory before a child reads it


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [n, heads, D] with contiguous heads (any row stride, e.g. a slice of the conv output), else a copy."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def tree_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          parents: torch.Tensor, s0: torch.Tensor,
                          scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a tree (module docstring): -> (o [n, Hv, Dv], states [n, Hv, Dk, Dv]), fp32.

    q, k [n, Hk, Dk] as the projections give them (normalised here; q scaled by `scale`, default Dk^-0.5);
    parents [n] (int, on the device): node i's parent is an earlier node, or -1 for the committed state s0."""
    n, num_heads, head_v_dim = v.shape
    head_k_dim = k.shape[-1]
    if (q.shape != k.shape or k.shape[0] != n or num_heads % max(k.shape[1], 1)
            or g.shape != (n, num_heads) or beta.shape != g.shape):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, beta "
                         f"{tuple(beta.shape)}: expected q, k [n, Hk, Dk], v [n, Hv, Dv] with Hv a multiple of Hk, "
                         f"g, beta [n, Hv]")
    if parents.shape != (n,) or s0.shape != (num_heads, head_k_dim, head_v_dim):
        raise ValueError(f"parents {tuple(parents.shape)} must be [{n}] and s0 {tuple(s0.shape)} "
                         f"[{num_heads}, {head_k_dim}, {head_v_dim}]")
    q, k, v = _rows(q), _rows(k), _rows(v)
    g, beta, parents = g.contiguous(), beta.contiguous(), parents.contiguous()
    out = new_buffer((n, num_heads, head_v_dim), v, torch.float32)
    slots = new_buffer((n + 1, num_heads, head_k_dim, head_v_dim), v, torch.float32)
    slots[0] = s0
    if n:
        block_k = triton.next_power_of_2(head_k_dim)
        block_v = min(32, triton.next_power_of_2(head_v_dim))
        grid = (num_heads, triton.cdiv(head_v_dim, block_v))
        tree_delta_rule_kernel[grid](q, k, v, g, beta, parents, slots, out, n, num_heads,
                                     head_k_dim ** -0.5 if scale is None else scale, L2NORM_EPS, q.stride(0),
                                     k.stride(0), v.stride(0), GROUP=num_heads // k.shape[1], DK=head_k_dim,
                                     DV=head_v_dim, BK=block_k, BV=block_v, num_warps=4)
    return out, slots[1:]

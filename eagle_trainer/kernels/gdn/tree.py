"""The gated delta rule over a tree of tokens (speculative decoding's draft tree), in one launch per layer.

Each node advances its parent's state by its own token (the root's parent is the committed state S0), so every
root-to-node path sees exactly the states plain decoding along it would. Every node's state is written out: after
verification, the accepted path's last node's state becomes the committed one without running its tokens again.

    S_i = exp(g_i) * S_parent(i);   S_i = S_i + k_i^T (beta_i * (v_i - k_i S_i));   o_i = q_i S_i

q and k come in l2-normalised, q already scaled and both expanded to the value heads (the caller does this once
for the few nodes of a tree). One program per (value head, BV columns of Dv) walks the nodes in order, parents
first; a node's parent state is read back from the states buffer (the same program wrote it: same layout, so the
same threads), whose slot 0 holds S0.

Shapes: n nodes, Hv value heads, Dk/Dv head dims.
    q, k [n, Hv, Dk]; v [n, Hv, Dv]; g, beta [n, Hv]; parents [n] int (-1: the root's parent, S0); s0 [Hv, Dk, Dv]
    -> o [n, Hv, Dv], states [n, Hv, Dk, Dv], all fp32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.utils import new_buffer


@triton.jit
def tree_delta_rule_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, parents_ptr, s_ptr, o_ptr, N, HV,
                           DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """s_ptr: [n + 1, Hv, Dk, Dv] with the committed state in slot 0 and node i's written to slot i + 1."""
    head = tl.program_id(0)
    o_k = tl.arange(0, BK)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_s = m_k[:, None] & m_v[None, :]
    state_offsets = head * DK * DV + o_k[:, None] * DV + o_v[None, :]  # [BK, BV] inside one slot's [Hv, Dk, Dv]
    slot = HV * DK * DV
    for i in range(N):
        parent_slot = tl.load(parents_ptr + i).to(tl.int64) + 1
        b_s = tl.load(s_ptr + parent_slot * slot + state_offsets, mask=m_s, other=0.0)
        row = i * HV + head
        b_k = tl.load(k_ptr + row * DK + o_k, mask=m_k, other=0.0)
        b_q = tl.load(q_ptr + row * DK + o_k, mask=m_k, other=0.0)
        b_v = tl.load(v_ptr + row * DV + o_v, mask=m_v, other=0.0)
        b_g = tl.load(g_ptr + row)
        b_beta = tl.load(beta_ptr + row)
        b_s = b_s * tl.exp(b_g)
        delta = b_beta * (b_v - tl.sum(b_k[:, None] * b_s, 0))  # [BV]
        b_s = b_s + b_k[:, None] * delta[None, :]
        tl.store(s_ptr + (i + 1) * slot + state_offsets, b_s, mask=m_s)
        tl.store(o_ptr + row * DV + o_v, tl.sum(b_q[:, None] * b_s, 0), mask=m_v)
        tl.debug_barrier()  # node i's state is in memory before a child reads it


def tree_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          parents: torch.Tensor, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a tree (module docstring): -> (o [n, Hv, Dv], states [n, Hv, Dk, Dv]), fp32.

    parents [n] (int, on the device): node i's parent is an earlier node, or -1 for the committed state s0."""
    n, num_heads, head_k_dim = k.shape
    head_v_dim = v.shape[-1]
    if q.shape != k.shape or v.shape[:2] != (n, num_heads) or g.shape != (n, num_heads) or beta.shape != g.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, beta "
                         f"{tuple(beta.shape)}: expected q, k [n, Hv, Dk], v [n, Hv, Dv], g, beta [n, Hv]")
    if parents.shape != (n,) or s0.shape != (num_heads, head_k_dim, head_v_dim):
        raise ValueError(f"parents {tuple(parents.shape)} must be [{n}] and s0 {tuple(s0.shape)} "
                         f"[{num_heads}, {head_k_dim}, {head_v_dim}]")
    q, k, v, g, beta, s0 = (x.float().contiguous() for x in (q, k, v, g, beta, s0))
    parents = parents.to(torch.int32).contiguous()
    out = new_buffer((n, num_heads, head_v_dim), v)
    slots = new_buffer((n + 1, num_heads, head_k_dim, head_v_dim), v)
    slots[0] = s0
    if n:
        block_k = triton.next_power_of_2(head_k_dim)
        block_v = min(32, triton.next_power_of_2(head_v_dim))
        grid = (num_heads, triton.cdiv(head_v_dim, block_v))
        tree_delta_rule_kernel[grid](q, k, v, g, beta, parents, slots, out, n, num_heads, DK=head_k_dim,
                                     DV=head_v_dim, BK=block_k, BV=block_v, num_warps=4)
    return out, slots[1:]

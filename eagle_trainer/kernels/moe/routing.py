"""MoE routing: the fused router kernel and the host-sync-free counting sort of (token, expert) pairs.

`moe_route`: router logits (x @ W_r^T, fp32 accumulation, rounded to the model dtype as HF's F.linear does)
-> fp32 softmax -> top-k (lowest expert id wins ties) -> renormalise when `norm_topk_prob` (a division by the
fp32 sum of the k probabilities, as HF's Qwen3-MoE / Qwen3-Next *TopKRouter does). One program owns BT whole
tokens and every expert, so a token's result never depends on the other tokens in the batch. The expert count
and k are compile-time constants with no other limit than k <= E; a program holds a [BT, next_pow2(E)] fp32
tile (BT = 16 from 256 experts up), sized for Qwen3-Next-80B-A3B's E = 512, k = 10.

`align_pairs`: the T*k (token, expert) pairs, numbered p = t*k + j, sorted by expert (stable, so by p within
an expert) and laid out in blocks of BM rows that each hold one expert's pairs only; a block's tail is padded
with the sentinel S = T*k. Everything stays on the device: the number of blocks is bounded statically by
min(S, ceil(S/BM) + E), and blocks past the real count carry expert id E so the GEMMs skip them.

    ids            [T, k]   int32 expert ids
    sorted_pairs   [NB*BM]  int32 pair index p, or S for padding
    block_expert   [NB]     int32 expert of each block, E past the last real block
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.utils import dot_precision, interpreting


@triton.jit
def moe_route_fwd_kernel(x_ptr, w_ptr, logits_ptr, weights_ptr, ids_ptr, T, H, stride_xt, stride_we,
                         E: tl.constexpr, BE: tl.constexpr, TOPK: tl.constexpr, NORM: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    i_t = tl.program_id(0)
    o_t = i_t * BT + tl.arange(0, BT)
    o_e = tl.arange(0, BE)
    m_t = o_t < T
    m_e = o_e < E
    b_acc = tl.zeros([BT, BE], dtype=tl.float32)
    for k0 in range(0, H, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < H
        b_x = tl.load(x_ptr + o_t[:, None] * stride_xt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_e[:, None] * stride_we + o_k[None, :], mask=m_e[:, None] & m_k[None, :], other=0.0)
        b_acc = tl.dot(b_x, tl.trans(b_w), b_acc, input_precision=PREC)
    b_logits = b_acc.to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + o_t[:, None] * E + o_e[None, :], b_logits, mask=m_t[:, None] & m_e[None, :])
    b_l = tl.where(m_e[None, :], b_logits.to(tl.float32), float("-inf"))
    b_p = tl.exp(b_l - tl.max(b_l, axis=1)[:, None])
    b_p = b_p / tl.sum(b_p, axis=1)[:, None]
    b_p = tl.where(m_e[None, :], b_p, -1.0)
    # Top-k by repeated max; among equal maxima the lowest expert id is taken. Padding experts hold -1.
    b_total = tl.zeros([BT], dtype=tl.float32)
    b_q = b_p
    for j in tl.static_range(TOPK):
        b_best = tl.max(b_q, axis=1)
        b_idx = tl.min(tl.where(b_q == b_best[:, None], o_e[None, :], BE), axis=1)
        b_total += b_best
        b_q = tl.where(o_e[None, :] == b_idx[:, None], -1.0, b_q)
    b_q = b_p
    for j in tl.static_range(TOPK):
        b_best = tl.max(b_q, axis=1)
        b_idx = tl.min(tl.where(b_q == b_best[:, None], o_e[None, :], BE), axis=1)
        b_w = b_best
        if NORM:  # a division, as HF's `router_top_value /= sum` (not a multiply by the reciprocal)
            b_w = b_best / b_total
        tl.store(weights_ptr + o_t * TOPK + j, b_w, mask=m_t)
        tl.store(ids_ptr + o_t * TOPK + j, b_idx, mask=m_t)
        b_q = tl.where(o_e[None, :] == b_idx[:, None], -1.0, b_q)


def moe_route(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """hidden [T,H], router_weight [E,H] -> (router_logits [T,E] hidden.dtype, weights [T,k] fp32, ids [T,k] int32)."""
    num_tokens, hidden_size = hidden.shape
    num_experts = router_weight.shape[0]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    hidden = hidden.contiguous()
    router_weight = router_weight.contiguous().to(hidden.dtype)
    logits = torch.empty(num_tokens, num_experts, device=hidden.device, dtype=hidden.dtype)
    weights = torch.empty(num_tokens, top_k, device=hidden.device, dtype=torch.float32)
    ids = torch.empty(num_tokens, top_k, device=hidden.device, dtype=torch.int32)
    block_e = max(16, triton.next_power_of_2(num_experts))
    # A [BT, BE] fp32 tile of logits stays in registers: fewer tokens per program for many experts.
    block_t = 16 if interpreting() or block_e >= 256 else 32
    block_k = 32 if interpreting() else (64 if block_e <= 128 else 32)
    moe_route_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        hidden, router_weight, logits, weights, ids, num_tokens, hidden_size, hidden.stride(0),
        router_weight.stride(0), E=num_experts, BE=block_e, TOPK=top_k, NORM=norm_topk_prob, BT=block_t,
        BK=block_k, PREC=dot_precision(hidden.dtype), num_warps=1 if interpreting() else 4,
        num_stages=1 if interpreting() else 2)
    return logits, weights, ids


@triton.jit
def moe_count_fwd_kernel(ids_ptr, hist_ptr, S, E: tl.constexpr, BE: tl.constexpr, BS: tl.constexpr,
                         SUB: tl.constexpr):
    """hist[c, e] = number of pairs with expert e among pairs [c*BS, (c+1)*BS)."""
    i_c = tl.program_id(0)
    o_e = tl.arange(0, BE)
    b_hist = tl.zeros([BE], dtype=tl.int32)
    for s0 in range(0, BS, SUB):
        o_p = i_c * BS + s0 + tl.arange(0, SUB)
        b_ids = tl.load(ids_ptr + o_p, mask=o_p < S, other=-1)
        b_hist += tl.sum((b_ids[:, None] == o_e[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + i_c * E + o_e, b_hist, mask=o_e < E)


@triton.jit
def moe_align_fwd_kernel(ids_ptr, hist_ptr, pairs_ptr, block_expert_ptr, S, num_chunks, num_blocks,
                         E: tl.constexpr, BE: tl.constexpr, BS: tl.constexpr, SUB: tl.constexpr,
                         BC: tl.constexpr, BM: tl.constexpr, BB: tl.constexpr):
    """Scatter chunk i_c's pairs to their slots: expert e's padded start + pairs of e in earlier chunks + rank."""
    i_c = tl.program_id(0)
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_count = tl.zeros([BE], dtype=tl.int32)  # pairs per expert, all chunks
    b_before = tl.zeros([BE], dtype=tl.int32)  # pairs per expert in chunks before i_c
    for c0 in range(0, num_chunks, BC):
        o_c = c0 + tl.arange(0, BC)
        b_h = tl.load(hist_ptr + o_c[:, None] * E + o_e[None, :], mask=(o_c < num_chunks)[:, None] & m_e[None, :],
                      other=0)
        b_count += tl.sum(b_h, axis=0)
        b_before += tl.sum(tl.where((o_c < i_c)[:, None], b_h, 0), axis=0)
    b_pad = (b_count + BM - 1) // BM * BM
    b_pad_end = tl.cumsum(b_pad, axis=0)
    b_next = b_pad_end - b_pad + b_before  # slot of the next pair of each expert from this chunk
    for s0 in range(0, BS, SUB):
        o_p = i_c * BS + s0 + tl.arange(0, SUB)
        m_p = o_p < S
        b_ids = tl.load(ids_ptr + o_p, mask=m_p, other=-1)
        b_hot = (b_ids[:, None] == o_e[None, :]).to(tl.int32)  # [SUB, BE]
        b_rank = tl.sum((tl.cumsum(b_hot, axis=0) - b_hot) * b_hot, axis=1)  # earlier same-expert pairs in SUB
        b_dest = tl.sum(b_hot * b_next[None, :], axis=1) + b_rank
        tl.store(pairs_ptr + b_dest, o_p, mask=m_p)
        b_next += tl.sum(b_hot, axis=0)
    if i_c == 0:  # the expert of every block: how many experts' padded ranges end at or before its start
        for b0 in range(0, num_blocks, BB):
            o_b = b0 + tl.arange(0, BB)
            b_done = (b_pad_end[None, :] <= (o_b * BM)[:, None]) & m_e[None, :]
            tl.store(block_expert_ptr + o_b, tl.sum(b_done.to(tl.int32), axis=1), mask=o_b < num_blocks)


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int):
    """ids [T,k] -> (sorted_pairs [NB*BM] int32, block_expert [NB] int32); see the module docstring.

    A counting sort in two launches: per-chunk expert histograms, then each chunk scatters its pairs (no
    atomics: a pair's slot follows from the histograms of the chunks before it). Same order as a stable sort.
    """
    flat = ids.reshape(-1).to(torch.int32).contiguous()
    num_pairs = flat.numel()
    num_blocks = min(num_pairs, triton.cdiv(num_pairs, block_m) + num_experts)
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, device=flat.device, dtype=torch.int32)
    block_expert = torch.empty(num_blocks, device=flat.device, dtype=torch.int32)
    if num_pairs == 0:
        return sorted_pairs, block_expert
    block_e = max(16, triton.next_power_of_2(num_experts))
    sub = max(1, 4096 // block_e)  # a [SUB, BE] one-hot tile of about 4096 elements
    # about 256 chunks of 128 to 1024 pairs: 40,960 pairs (4096 tokens, top-10) in 1024-pair chunks kept only 40
    # programs busy, for 50 us a launch on an H100; the sort is the same whatever the chunk
    chunk = max(sub, min(1024, max(128, triton.next_power_of_2(triton.cdiv(num_pairs, 256)))))
    num_chunks = triton.cdiv(num_pairs, chunk)
    hist = torch.empty(num_chunks, num_experts, device=flat.device, dtype=torch.int32)
    moe_count_fwd_kernel[(num_chunks,)](flat, hist, num_pairs, E=num_experts, BE=block_e, BS=chunk, SUB=sub)
    moe_align_fwd_kernel[(num_chunks,)](
        flat, hist, sorted_pairs, block_expert, num_pairs, num_chunks, num_blocks, E=num_experts, BE=block_e,
        BS=chunk, SUB=sub, BC=max(1, 4096 // block_e), BM=block_m, BB=max(1, 4096 // block_e))
    return sorted_pairs, block_expert

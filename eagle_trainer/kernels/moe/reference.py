"""Plain-torch reference of the MoE forward (routing, routed experts, the gated shared expert, the whole block), the
ground truth for the kernels.

Shapes: T tokens, H hidden, E experts, I expert intermediate size, k experts per token, Is shared intermediate size.
    hidden         [T, H]
    router_weight  [E, H]
    gate_up        [E, 2I, H]  (gate rows, then up rows: HF's fused `mlp.experts.gate_up_proj`)
    down           [E, H, I]   (HF's `mlp.experts.down_proj`)
    shared         (gate_proj [Is, H], up_proj [Is, H], down_proj [H, Is], gate [1, H]): a shared.SharedExpert,
                   HF's `mlp.shared_expert.{gate,up,down}_proj.weight` and `mlp.shared_expert_gate.weight`
Computed in fp64 by default so kernel results can be compared at any precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_route_reference(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """-> (router_logits [T,E] in hidden's dtype, weights [T,k] fp32, ids [T,k] int32).

    Logits are rounded to the model dtype (what HF's F.linear returns), softmax runs in fp32, and among equal
    probabilities the lowest expert id wins (a stable descending sort).
    """
    logits = (hidden.double() @ router_weight.double().T).to(hidden.dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, order)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights, order.to(torch.int32)


def moe_experts_reference(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                          down: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """sum_j weights[t,j] * down[e] @ (silu(gate[e] @ x) * (up[e] @ x)), e = ids[t,j]; -> [T,H] in `dtype`."""
    num_experts, two_i, _ = gate_up.shape
    x = hidden.to(dtype)
    out = torch.zeros_like(x)
    for e in range(num_experts):
        token, slot = torch.where(ids == e)
        if token.numel() == 0:
            continue
        gate, up = (x[token] @ gate_up[e].to(dtype).T).split(two_i // 2, dim=-1)
        y = (F.silu(gate) * up) @ down[e].to(dtype).T  # [n, H]
        out.index_add_(0, token, y * weights[token, slot].to(dtype)[:, None])
    return out


def moe_shared_expert_reference(hidden: torch.Tensor, shared, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """sigmoid(x @ gate^T) * down_proj @ (silu(gate_proj @ x) * (up_proj @ x)); -> [T,H] in `dtype`."""
    x = hidden.to(dtype)
    gate_proj, up_proj, down_proj, gate = (w.to(dtype) for w in shared)
    return torch.sigmoid(x @ gate.T) * ((F.silu(x @ gate_proj.T) * (x @ up_proj.T)) @ down_proj.T)


def moe_block_reference(hidden: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                        top_k: int, norm_topk_prob: bool, shared=None, dtype: torch.dtype = torch.float64):
    """A whole sparse MoE block (HF's Qwen3NextSparseMoeBlock with `shared`, Qwen3MoeSparseMoeBlock without):
    routing (experts chosen from model-dtype logits), the routed experts and the gated shared expert; -> [T,H]."""
    _, weights, ids = moe_route_reference(hidden, router_weight, top_k, norm_topk_prob)
    out = moe_experts_reference(hidden, ids, weights, gate_up, down, dtype)
    if shared is not None:
        out = out + moe_shared_expert_reference(hidden, shared, dtype)
    return out


def align_pairs_reference(ids: torch.Tensor, num_experts: int, block_m: int):
    """routing.align_pairs with torch ops: a stable sort of the expert ids, padded per expert to block_m rows."""
    flat = ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    device = flat.device
    sorted_ids, order = torch.sort(flat, stable=True)
    experts = torch.arange(num_experts, device=device)
    starts = torch.searchsorted(sorted_ids, experts, right=False)
    counts = torch.searchsorted(sorted_ids, experts, right=True) - starts
    padded = (counts + block_m - 1) // block_m * block_m
    pad_ends = torch.cumsum(padded, dim=0)
    num_blocks = min(num_pairs, -(-num_pairs // block_m) + num_experts)
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, device=device, dtype=torch.int32)
    rank = torch.arange(num_pairs, device=device) - starts[sorted_ids]
    sorted_pairs[(pad_ends - padded)[sorted_ids] + rank] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(pad_ends, block_starts, right=True).to(torch.int32)  # E past the end
    return sorted_pairs, block_expert

"""Triton MoE core for frozen Qwen3-MoE / Qwen3-Next targets (forward only, deterministic).

    moe_route(hidden [T,H], router_weight [E,H], top_k, norm_topk_prob)
        -> router_logits [T,E], weights [T,k] fp32, ids [T,k] int32
    moe_experts(hidden [T,H], ids, weights, gate_up [E,2I,H], down [E,H,I], batch_invariant=True) -> [T,H]
    moe_forward(hidden, router_weight, gate_up, down, top_k, norm_topk_prob) -> [T,H]  (both in turn)

routing.py: router kernel and the host-sync-free counting sort; experts.py: the GEMMs and the top-k sum;
configs.py: tile configs; reference.py: plain torch; tune.py: writes configs/<device>.json.
Same input -> same bits; with batch_invariant=True a token's output does not depend on the rest of the batch.
"""

from __future__ import annotations

import torch

from eagle_trainer.kernels.moe.experts import moe_experts
from eagle_trainer.kernels.moe.routing import align_pairs, moe_route


def moe_forward(hidden: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                top_k: int, norm_topk_prob: bool, batch_invariant: bool = True) -> torch.Tensor:
    """Routing then routed experts of one MoE layer: hidden [T,H] -> [T,H]."""
    _, weights, ids = moe_route(hidden, router_weight, top_k, norm_topk_prob)
    return moe_experts(hidden, ids, weights, gate_up, down, batch_invariant=batch_invariant)


__all__ = ["align_pairs", "moe_experts", "moe_forward", "moe_route"]

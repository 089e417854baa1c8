"""One MoE layer's routed part: the router kernel, then the routed experts.

    moe_forward(hidden [T,H], router_weight [E,H], gate_up [E,2I,H], down [E,H,I], top_k, norm_topk_prob) -> [T,H]
"""

from __future__ import annotations

import torch

from eagle_trainer.kernels.moe.experts import moe_experts
from eagle_trainer.kernels.moe.routing import moe_route


def moe_forward(hidden: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                top_k: int, norm_topk_prob: bool, batch_invariant: bool = True) -> torch.Tensor:
    """Routing then routed experts of one MoE layer: hidden [T,H] -> [T,H]."""
    _, weights, ids = moe_route(hidden, router_weight, top_k, norm_topk_prob)
    return moe_experts(hidden, ids, weights, gate_up, down, batch_invariant=batch_invariant)

"""One sparse MoE block: the router kernel, the gated shared expert (if the block has one), then the routed experts.

    moe_forward(hidden [T,H], router_weight [E,H], gate_up [E,2I,H], down [E,H,I], top_k, norm_topk_prob,
                shared=None) -> [T,H]
"""

from __future__ import annotations

import torch

from eagle_trainer.kernels.moe.experts import moe_experts
from eagle_trainer.kernels.moe.routing import moe_route
from eagle_trainer.kernels.moe.shared import SharedExpert, moe_shared_expert


def moe_forward(hidden: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                top_k: int, norm_topk_prob: bool, batch_invariant: bool = True,
                shared: SharedExpert | None = None) -> torch.Tensor:
    """Routing then routed experts of one MoE layer: hidden [T,H] -> [T,H]. With `shared`, the gated shared expert's
    output is the last term of each token's fixed-order sum."""
    _, weights, ids = moe_route(hidden, router_weight, top_k, norm_topk_prob)
    shared_out = None if shared is None else moe_shared_expert(hidden, shared, batch_invariant=batch_invariant)
    return moe_experts(hidden, ids, weights, gate_up, down, batch_invariant=batch_invariant, shared_out=shared_out)

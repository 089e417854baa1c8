"""Triton MoE core for frozen Qwen3-MoE / Qwen3-Next targets (forward only, deterministic).

    moe_route(hidden [T,H], router_weight [E,H], top_k, norm_topk_prob)
        -> router_logits [T,E], weights [T,k] fp32, ids [T,k] int32
    moe_experts(hidden [T,H], ids, weights, gate_up [E,2I,H], down [E,H,I], batch_invariant=True) -> [T,H]
    moe_forward(hidden, router_weight, gate_up, down, top_k, norm_topk_prob) -> [T,H]  (both in turn)

    routing.py     router kernel and the host-sync-free counting sort of (token, expert) pairs
    experts.py     the grouped GEMMs and the top-k sum
    layer.py       moe_forward: routing, then experts
    configs.py     tile configs per (device, shape, M bucket); tune.py writes configs/<device>.json
    reference.py   plain torch (fp64)

Same input -> same bits; with batch_invariant=True a token's output does not depend on the rest of the batch.
"""

from eagle_trainer.kernels.moe.experts import moe_experts
from eagle_trainer.kernels.moe.layer import moe_forward
from eagle_trainer.kernels.moe.routing import align_pairs, moe_route

__all__ = ["align_pairs", "moe_experts", "moe_forward", "moe_route"]

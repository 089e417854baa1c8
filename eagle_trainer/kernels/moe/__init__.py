"""Triton MoE core for frozen Qwen3-MoE / Qwen3-Next targets (forward only, deterministic).

    moe_route(hidden [T,H], router_weight [E,H], top_k, norm_topk_prob)
        -> router_logits [T,E], weights [T,k] fp32, ids [T,k] int32
    moe_shared_expert(hidden [T,H], SharedExpert(gate_proj [Is,H], up_proj [Is,H], down_proj [H,Is], gate [1,H]))
        -> sigmoid(x @ gate^T) * down_proj(silu(gate_proj(x)) * up_proj(x))  [T,H]
    moe_experts(hidden [T,H], ids, weights, gate_up [E,2I,H], down [E,H,I], batch_invariant=True, shared_out=None)
        -> [T,H]: the k routed terms, then shared_out, summed in fp32
    moe_forward(hidden, router_weight, gate_up, down, top_k, norm_topk_prob, shared=None) -> [T,H]  (all in turn)

    routing.py     router kernel and the host-sync-free counting sort of (token, expert) pairs
    experts.py     the grouped GEMMs and the top-k sum
    shared.py      the shared expert through the same GEMMs (one expert every token visits) and its sigmoid gate
    layer.py       moe_forward: routing, shared expert, routed experts
    configs.py     tile configs per (device, shape, M bucket); tune.py writes configs/<device>.json
    reference.py   plain torch (fp64)

Same input -> same bits; with batch_invariant=True a token's output does not depend on the rest of the batch.
"""

from eagle_trainer.kernels.moe.experts import moe_experts
from eagle_trainer.kernels.moe.layer import moe_forward
from eagle_trainer.kernels.moe.routing import align_pairs, moe_route
from eagle_trainer.kernels.moe.shared import SharedExpert, moe_shared_expert

__all__ = ["SharedExpert", "align_pairs", "moe_experts", "moe_forward", "moe_route", "moe_shared_expert"]

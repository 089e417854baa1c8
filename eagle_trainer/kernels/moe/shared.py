"""The shared expert: one dense SwiGLU expert every token visits, scaled per token by a sigmoid gate (Qwen3-Next).

    gate   s[t]   = sigmoid(x[t] . w_gate)                            fp32 products and sums, fixed order per token
    GEMM1  y[t]   = silu(x[t] @ gate_proj^T) * (x[t] @ up_proj^T)
    GEMM2  o_s[t] = s[t] * (y[t] @ down_proj^T)                        rounded to the model dtype

GEMM1 and GEMM2 are the routed experts' kernels (experts.py) run as one expert (E = 1, k = 1) over blocks of BM
consecutive tokens, on HF's separate gate_proj / up_proj / down_proj weights where they lie (no copy, nothing
cached: a sharded target's gathered weights are read afresh each forward). o_s joins the routed terms as the last
term of the core's fixed-order fp32 sum: moe_experts(..., shared_out=o_s).

Shapes: x [T,H]; gate_proj, up_proj [Is,H]; down_proj [H,Is]; gate [1,H]; s [T]; y [NB*BM, Is]; o_s [T,H].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.moe.configs import get_config
from eagle_trainer.kernels.moe.experts import expert_gemms
from eagle_trainer.kernels.utils import new_buffer


class SharedExpert(NamedTuple):
    """A shared expert's weights as HF's Linear layers hold them (Qwen3NextMLP and `shared_expert_gate`)."""
    gate_proj: torch.Tensor  # [Is, H]
    up_proj: torch.Tensor  # [Is, H]
    down_proj: torch.Tensor  # [H, Is]
    gate: torch.Tensor  # [1, H], the sigmoid gate's row


@triton.jit
def moe_shared_gate_fwd_kernel(x_ptr, w_ptr, s_ptr, T, H, BT: tl.constexpr, BK: tl.constexpr):
    """s[t] = sigmoid(x[t] . w) in fp32; each program owns BT whole tokens."""
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_k = tl.arange(0, BK)
    p_x = x_ptr + o_t.to(tl.int64)[:, None] * H + o_k[None, :]
    b_acc = tl.zeros([BT, BK], dtype=tl.float32)
    for k0 in range(0, H, BK):
        m_k = k0 + o_k < H
        b_x = tl.load(p_x + k0, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_w = tl.load(w_ptr + k0 + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_acc += b_x * b_w[None, :]
    tl.store(s_ptr + o_t, tl.sigmoid(tl.sum(b_acc, axis=1)), mask=m_t)


def moe_shared_expert_fwd(hidden: torch.Tensor, shared: SharedExpert, config: dict) -> torch.Tensor:
    num_tokens, hidden_size = hidden.shape
    block_m = config["BM"]
    num_blocks = triton.cdiv(num_tokens, block_m)
    block_t, block_k = 16, min(256, triton.next_power_of_2(hidden_size))  # constant in T: batch invariant
    s = new_buffer((num_tokens,), hidden, torch.float32)
    moe_shared_gate_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](hidden, shared.gate, s, num_tokens, hidden_size,
                                                                    BT=block_t, BK=block_k, num_warps=4)
    # one expert, k = 1: pair p is token p; block b holds tokens [b*BM, (b+1)*BM), the last padded with T
    rows = torch.arange(num_blocks * block_m, device=hidden.device, dtype=torch.int32).clamp_(max=num_tokens)
    block_expert = torch.zeros(num_blocks, device=hidden.device, dtype=torch.int32)
    return expert_gemms(hidden, shared.gate_proj, shared.up_proj, 0, shared.down_proj[None], rows, block_expert, s,
                        1, config)


def moe_shared_expert(hidden: torch.Tensor, shared: SharedExpert, batch_invariant: bool = True,
                      config: dict | None = None) -> torch.Tensor:
    """The gated shared expert: hidden [T,H] -> sigmoid(x @ gate^T) * down_proj(silu(gate_proj(x)) * up_proj(x)),
    [T,H] in hidden's dtype (the gate in fp32). `config` overrides the tile config; otherwise configs.get_config
    picks the one of a single expert of this shape (E = 1)."""
    num_tokens, hidden_size = hidden.shape
    inter = shared.gate_proj.shape[0]
    expected = ((inter, hidden_size), (inter, hidden_size), (hidden_size, inter), (1, hidden_size))
    if tuple(tuple(w.shape) for w in shared) != expected:
        raise ValueError(f"shared expert weights {[tuple(w.shape) for w in shared]} do not fit hidden [T, "
                         f"{hidden_size}]: expected gate_proj, up_proj [Is, H], down_proj [H, Is], gate [1, H]")
    if num_tokens == 0:
        return torch.empty_like(hidden)
    if config is None:
        config = get_config(hidden.device, 1, inter, hidden_size, num_tokens, batch_invariant)
    weights = SharedExpert(*(w.to(hidden.dtype).contiguous() for w in shared))
    return moe_shared_expert_fwd(hidden.contiguous(), weights, config)

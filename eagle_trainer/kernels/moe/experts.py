"""Routed experts forward: two grouped GEMMs over expert-contiguous blocks and a fixed-order top-k sum.

    GEMM1  y[r]  = silu(x[t] @ gate[e]^T) * (x[t] @ up[e]^T)      rows r in sorted, padded pair order
    GEMM2  o[p]  = w[p] * (y[r] @ down[e]^T)                       written at pair p = t*k + j
    sum    out[t] = sum_{j=0..k-1} o[t*k + j] (+ o_s[t])             fp32, j ascending, o_s last: no atomics

Shapes: x [T,H]; gate_up [E,2I,H]; down [E,H,I]; y [NB*BM, I]; o [T*k, H]; o_s [T,H]; out [T,H].
Each GEMM program owns one block of BM rows (one expert, see routing.align_pairs) and one BN-wide column
tile; programs are launched in groups of GM row blocks per column sweep so that neighbours in time share
an expert's weight tiles in L2. The grid is sized from the static bound on blocks: no host sync.
GEMM1 reads an expert's gate and up rows through two pointers and one expert stride, so the shared expert
(shared.py) runs through the same kernels on HF's separate gate_proj / up_proj weights, uncopied. o_s, the
shared expert's gated output, is an optional last term of the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.moe.configs import get_config
from eagle_trainer.kernels.moe.routing import align_pairs
from eagle_trainer.kernels.utils import dot_precision, new_buffer


@triton.jit
def _tile_ids(pid, num_blocks, num_n, GM: tl.constexpr):
    """Grouped launch order: GM consecutive row blocks per column tile."""
    width = GM * num_n
    first_m = (pid // width) * GM
    size_m = tl.minimum(num_blocks - first_m, GM)
    i_m = first_m + (pid % width) % size_m
    i_n = (pid % width) // size_m
    return i_m, i_n


@triton.jit
def _block_rows(i_m, pairs_ptr, num_pairs, BM: tl.constexpr):
    """Rows of block i_m: their positions in the sorted layout, pair ids, and which are real (not padding)."""
    o_r = i_m * BM + tl.arange(0, BM)
    b_pair = tl.load(pairs_ptr + o_r)
    return o_r, b_pair, b_pair < num_pairs


@triton.jit
def moe_gate_up_fwd_kernel(x_ptr, g_ptr, u_ptr, y_ptr, pairs_ptr, block_expert_ptr, num_pairs, num_blocks, H, I,
                           stride_we, E: tl.constexpr, TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, GM: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
                           TMA: tl.constexpr, WS: tl.constexpr):
    i_m, i_n = _tile_ids(tl.program_id(0), num_blocks, tl.cdiv(I, BN), GM)
    i_e = tl.load(block_expert_ptr + i_m)
    if i_e >= E:
        return
    o_r, b_pair, m_r = _block_rows(i_m, pairs_ptr, num_pairs, BM)
    o_tok = (b_pair // TOPK).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < I
    o_k = tl.arange(0, BK)
    p_x = x_ptr + o_tok[:, None] * H + o_k[None, :]
    o_we = i_e.to(tl.int64) * stride_we  # expert i_e's gate rows at g_ptr + o_we, its up rows at u_ptr + o_we
    p_g = g_ptr + o_we + o_n[None, :] * H + o_k[:, None]  # [BK, BN] of gate^T
    p_u = u_ptr + o_we + o_n[None, :] * H + o_k[:, None]
    if TMA:  # weight tiles through the copy engine; rows past I and columns past H read as zero
        d_g = tl.make_tensor_descriptor(g_ptr + o_we, shape=[I, H], strides=[H, 1], block_shape=[BN, BK])
        d_u = tl.make_tensor_descriptor(u_ptr + o_we, shape=[I, H], strides=[H, 1], block_shape=[BN, BK])
    b_g = tl.zeros([BM, BN], dtype=tl.float32)
    b_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, H, BK, warp_specialize=WS):
        if TMA:
            b_x = tl.load(p_x, mask=m_r[:, None] & (k0 + o_k < H)[None, :], other=0.0)
            b_wg = tl.trans(d_g.load([i_n * BN, k0]))
            b_wu = tl.trans(d_u.load([i_n * BN, k0]))
        elif EVEN_K:
            b_x = tl.load(p_x, mask=m_r[:, None], other=0.0)
            b_wg = tl.load(p_g, mask=m_n[None, :], other=0.0)
            b_wu = tl.load(p_u, mask=m_n[None, :], other=0.0)
        else:
            m_k = k0 + o_k < H
            b_x = tl.load(p_x, mask=m_r[:, None] & m_k[None, :], other=0.0)
            b_wg = tl.load(p_g, mask=m_k[:, None] & m_n[None, :], other=0.0)
            b_wu = tl.load(p_u, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_g = tl.dot(b_x, b_wg, b_g, input_precision=PREC)
        b_u = tl.dot(b_x, b_wu, b_u, input_precision=PREC)
        p_x += BK
        p_g += BK
        p_u += BK
    b_y = b_g * tl.sigmoid(b_g) * b_u
    p_y = y_ptr + o_r.to(tl.int64)[:, None] * I + o_n[None, :]
    tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_n[None, :])


@triton.jit
def moe_down_fwd_kernel(y_ptr, w_ptr, o_ptr, pairs_ptr, block_expert_ptr, weights_ptr, num_pairs, num_blocks, H,
                        I, E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GM: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                        WS: tl.constexpr):
    i_m, i_n = _tile_ids(tl.program_id(0), num_blocks, tl.cdiv(H, BN), GM)
    i_e = tl.load(block_expert_ptr + i_m)
    if i_e >= E:
        return
    o_r, b_pair, m_r = _block_rows(i_m, pairs_ptr, num_pairs, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < H
    o_k = tl.arange(0, BK)
    p_y = y_ptr + o_r.to(tl.int64)[:, None] * I + o_k[None, :]
    p_w = w_ptr + i_e.to(tl.int64) * H * I + o_n[None, :] * I + o_k[:, None]  # [BK, BN] of down^T
    if TMA:
        d_w = tl.make_tensor_descriptor(w_ptr + i_e.to(tl.int64) * H * I, shape=[H, I], strides=[I, 1],
                                        block_shape=[BN, BK])
    b_o = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, I, BK, warp_specialize=WS):
        if TMA:
            b_y = tl.load(p_y, mask=(k0 + o_k < I)[None, :], other=0.0)
            b_w = tl.trans(d_w.load([i_n * BN, k0]))
        elif EVEN_K:
            b_y = tl.load(p_y)
            b_w = tl.load(p_w, mask=m_n[None, :], other=0.0)
        else:
            m_k = k0 + o_k < I
            b_y = tl.load(p_y, mask=m_k[None, :], other=0.0)
            b_w = tl.load(p_w, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_o = tl.dot(b_y, b_w, b_o, input_precision=PREC)
        p_y += BK
        p_w += BK
    b_rw = tl.load(weights_ptr + b_pair, mask=m_r, other=0.0)
    b_o = b_o * b_rw[:, None]
    p_o = o_ptr + b_pair.to(tl.int64)[:, None] * H + o_n[None, :]
    tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_r[:, None] & m_n[None, :])


@triton.jit
def moe_sum_fwd_kernel(o_ptr, s_ptr, out_ptr, T, H, TOPK: tl.constexpr, SHARED: tl.constexpr, BT: tl.constexpr,
                       BH: tl.constexpr):
    o_t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    o_h = tl.program_id(1) * BH + tl.arange(0, BH)
    m = (o_t < T)[:, None] & (o_h < H)[None, :]
    b_acc = tl.zeros([BT, BH], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        b_acc += tl.load(o_ptr + (o_t * TOPK + j)[:, None] * H + o_h[None, :], mask=m, other=0.0).to(tl.float32)
    if SHARED:  # the shared expert's gated output, the last term
        b_acc += tl.load(s_ptr + o_t[:, None] * H + o_h[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + o_t[:, None] * H + o_h[None, :], b_acc.to(out_ptr.dtype.element_ty), mask=m)


def use_scratch_allocator() -> None:
    """Device-side tensor descriptors (TMA) need global scratch memory from the launcher."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def expert_gemms(hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, expert_stride: int,
                 down: torch.Tensor, sorted_pairs: torch.Tensor, block_expert: torch.Tensor, weights: torch.Tensor,
                 top_k: int, config: dict) -> torch.Tensor:
    """GEMM1 (gate/up + SwiGLU) then GEMM2 (down, times the pair's weight) over expert-contiguous blocks of pairs.

    gate, up: expert e's [I, H] rows start at gate/up's first element + e * expert_stride; down [E, H, I];
    weights [S] fp32, S = T*k pairs; sorted_pairs, block_expert as routing.align_pairs lays them out.
    -> o [S, H] in hidden's dtype, row p = t*k + j.
    """
    hidden_size = hidden.shape[1]
    num_experts, _, inter = down.shape
    num_pairs = weights.numel()
    block_m = config["BM"]
    prec = dot_precision(hidden.dtype)
    tma, ws = bool(config.get("TMA", 0)), bool(config.get("WS", 0))
    if tma:
        use_scratch_allocator()
    num_blocks = block_expert.numel()
    y = new_buffer((num_blocks * block_m, inter), hidden)
    o = new_buffer((num_pairs, hidden_size), hidden)
    bn, bk = config["BN1"], config["BK1"]
    moe_gate_up_fwd_kernel[(num_blocks * triton.cdiv(inter, bn),)](
        hidden, gate, up, y, sorted_pairs, block_expert, num_pairs, num_blocks, hidden_size, inter, expert_stride,
        E=num_experts, TOPK=top_k, BM=block_m, BN=bn, BK=bk, GM=config["GM"], EVEN_K=hidden_size % bk == 0,
        PREC=prec, TMA=tma, WS=ws, num_warps=config["W1"], num_stages=config["S1"])
    bn, bk = config["BN2"], config["BK2"]
    moe_down_fwd_kernel[(num_blocks * triton.cdiv(hidden_size, bn),)](
        y, down, o, sorted_pairs, block_expert, weights, num_pairs, num_blocks, hidden_size, inter,
        E=num_experts, BM=block_m, BN=bn, BK=bk, GM=config["GM"], EVEN_K=inter % bk == 0,
        PREC=prec, TMA=tma, WS=ws, num_warps=config["W2"], num_stages=config["S2"])
    return o


def moe_experts_fwd(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, config: dict, shared_out: torch.Tensor | None = None) -> torch.Tensor:
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    top_k = ids.shape[1]
    sorted_pairs, block_expert = align_pairs(ids, num_experts, config["BM"])
    o = expert_gemms(hidden, gate_up, gate_up[:, inter:], two_i * hidden_size, down, sorted_pairs, block_expert,
                     weights, top_k, config)
    out = new_buffer((num_tokens, hidden_size), hidden)
    block_t, block_h = config.get("ST", 1), min(config.get("SH", 1024), triton.next_power_of_2(hidden_size))
    moe_sum_fwd_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden_size, block_h))](
        o, o if shared_out is None else shared_out, out, num_tokens, hidden_size, TOPK=top_k,
        SHARED=shared_out is not None, BT=block_t, BH=block_h, num_warps=config.get("SW", 4))
    return out


def moe_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, batch_invariant: bool = True, config: dict | None = None,
                shared_out: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts of one MoE layer.

    hidden [T,H]; ids [T,k] expert ids; weights [T,k] routing weights (any float dtype, applied in fp32);
    gate_up [E,2I,H] (gate rows then up rows); down [E,H,I]. -> [T,H] in hidden's dtype.
    `shared_out` [T,H]: the shared expert's gated output (shared.moe_shared_expert), added as the last term of each
    token's fp32 sum, so the block's output is rounded to the model dtype once.
    `config` overrides the tile config (tuning); otherwise configs.get_config picks it.
    """
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, h_w = gate_up.shape
    if h_w != hidden_size or down.shape != (num_experts, hidden_size, two_i // 2):
        raise ValueError(f"expert weights gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit "
                         f"hidden [T, {hidden_size}]: expected [E, 2I, H] and [E, H, I]")
    if ids.shape != weights.shape or ids.shape[0] != num_tokens:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be [T={num_tokens}, k]")
    if shared_out is not None and shared_out.shape != hidden.shape:
        raise ValueError(f"shared_out {tuple(shared_out.shape)} must be hidden's shape {tuple(hidden.shape)}")
    if num_tokens == 0:
        return torch.empty_like(hidden)
    if config is None:
        config = get_config(hidden.device, num_experts, two_i // 2, hidden_size, ids.numel(), batch_invariant)
    if shared_out is not None:
        shared_out = shared_out.to(hidden.dtype).contiguous()
    return moe_experts_fwd(hidden.contiguous(), ids.to(torch.int32).contiguous(),
                           weights.to(torch.float32).contiguous(), gate_up.to(hidden.dtype).contiguous(),
                           down.to(hidden.dtype).contiguous(), config, shared_out)

"""Chunked gated delta rule forward (Qwen3-Next linear attention core): one Triton kernel, output only.

Shapes (packed: all documents back to back, cu_seqlens [N+1] int32 gives their starts):
    q, k [1, T, Hk, Dk];  v [1, T, Hv, Dv];  g, beta [1, T, Hv];  o [1, T, Hv, Dv]   (Hv = G * Hk)
A [B, T, ...] batch without cu_seqlens is run as B documents of T tokens.

Within a chunk of BT tokens (positions i, j; gc = cumsum of g within the chunk, b = beta; scaled q):
    A    = strictly_lower(b_i k_i.k_j exp(gc_i - gc_j))                [BT, BT]
    T    = (I + A)^-1                                                    forward substitution, row by row
    w    = T (b k exp(gc));   u = T (b v)                                WY form of the chunk's delta updates
    vn   = u - w S                                                       what the old state S does not predict
    o    = (q exp(gc)) S + lower_incl_diag(q_i.k_j exp(gc_i - gc_j)) vn
    S    = exp(gc_last) S + (k exp(gc_last - gc))^T vn
One program owns one (document, value head, BV columns of Dv) and walks the document's chunks in order,
carrying S [Dk, BV] in fp32 registers: the per-chunk state never goes to memory (the target is frozen, only o
is needed). Chunks start at each document's first token, so none crosses a boundary; the ragged last chunk
reads its missing rows as k = v = q = 0, g = beta = 0, which adds nothing to the state or the output.
The cumulative sum of g and the l2 norm of q and k are done in the kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# One config; BT = 64 is the chunk (the WY algebra's block), BV splits Dv across programs. The GPU one is chosen
# from a compile for sm_90 only (least register spill; Hv * Dv / BV = 128 programs fill an H100 for one
# sequence at Qwen3-Next's shape): it has not been timed.
CONFIG_GPU = {"BT": 64, "BV": 32, "num_warps": 8, "num_stages": 1}
CONFIG_INTERPRET = {"BT": 64, "BV": 32, "num_warps": 1, "num_stages": 1}


@triton.jit
def gated_delta_rule_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, cu_seqlens_ptr, scale,
                                HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr,
                                PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // HK)  # grouped value heads: G consecutive value heads share a key head
    bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int64) - bos

    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_strict = o_i[:, None] > o_i[None, :]
    m_causal = o_i[:, None] >= o_i[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    for i_c in range(tl.cdiv(seq_len, BT)):
        o_t = i_c * BT + o_i
        m_t = o_t < seq_len
        o_row = bos + o_t  # token index in the packed layout
        m_qk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # Loads are placed where first needed: fewer [BT, BK] fp32 tiles live through the substitution loop.
        p_k = k_ptr + (o_row * HK + i_hk)[:, None] * K + o_k[None, :]
        b_k = tl.load(p_k, mask=m_qk, other=0.0).to(tl.float32)  # [BT, BK]
        b_g = tl.load(g_ptr + o_row * HV + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        b_beta = tl.load(beta_ptr + o_row * HV + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        if L2NORM:
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)[:, None]
        b_gc = tl.cumsum(b_g, axis=0)  # log decay from the chunk start to (and including) row i
        b_gl = tl.sum(b_g, axis=0)  # ... to the chunk's last row (padding rows add 0)
        # exp(gc_i - gc_j) for j <= i; above the diagonal the difference is positive and is masked before exp
        b_decay = tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], float("-inf")))  # [BT, BT]

        # T = (I + A)^-1 by forward substitution on X = T - I (strictly lower):
        #   X_i = -A_i - sum_{j<i} A_ij X_j, one row per step, rows past i still hold -A.
        b_A = tl.dot(b_k * b_beta[:, None], tl.trans(b_k), input_precision=PREC) * b_decay
        b_A = -tl.where(m_strict, b_A, 0.0)
        for i in range(1, BT):
            m_row = o_i == i
            b_a = tl.sum(tl.where(m_row[:, None], b_A, 0.0), axis=0)  # -A_i  [BT]
            b_a = b_a + tl.sum(b_a[:, None] * b_A, axis=0) * (o_i < i)
            b_A = tl.where(m_row[:, None], b_a[None, :], b_A)
        b_T = b_A + (o_i[:, None] == o_i[None, :]).to(tl.float32)

        p_v = v_ptr + (o_row * HV + i_h)[:, None] * V + o_v[None, :]
        b_v = tl.load(p_v, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_w = tl.dot(b_T, b_k * (b_beta * tl.exp(b_gc))[:, None], input_precision=PREC)  # [BT, BK]
        b_u = tl.dot(b_T, b_v * b_beta[:, None], input_precision=PREC)  # [BT, BV]
        b_vn = b_u - tl.dot(b_w, b_S, input_precision=PREC)  # [BT, BV]

        p_q = q_ptr + (o_row * HK + i_hk)[:, None] * K + o_k[None, :]
        b_q = tl.load(p_q, mask=m_qk, other=0.0).to(tl.float32)  # [BT, BK]
        if L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, axis=1) + 1e-6)[:, None]
        b_q = b_q * scale
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * b_decay  # zero above the diagonal
        b_o = tl.dot(b_q * tl.exp(b_gc)[:, None], b_S, input_precision=PREC)
        b_o = tl.dot(b_qk, b_vn, b_o, input_precision=PREC)
        p_o = o_ptr + (o_row * HV + i_h)[:, None] * V + o_v[None, :]
        tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_tv)

        b_kd = b_k * tl.exp(b_gl - b_gc)[:, None]  # [BT, BK]
        b_S = b_S * tl.exp(b_gl)
        b_S = tl.dot(tl.trans(b_kd), b_vn, b_S, input_precision=PREC)


def new_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uninitialised output memory (tests swap this for NaN-filled buffers)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def gated_delta_rule_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         cu_seqlens: torch.Tensor, scale: float, l2norm_qk: bool) -> torch.Tensor:
    """Packed, contiguous inputs: q, k [T, Hk, Dk]; v [T, Hv, Dv]; g, beta [T, Hv]; cu_seqlens [N+1] int32."""
    _, num_k_heads, head_k_dim = k.shape
    total, num_v_heads, head_v_dim = v.shape
    num_seqs = cu_seqlens.numel() - 1
    config = CONFIG_INTERPRET if os.environ.get("TRITON_INTERPRET") == "1" else CONFIG_GPU
    # tl.dot needs every dimension >= 16
    block_k = max(16, triton.next_power_of_2(head_k_dim))
    block_v = max(16, min(config["BV"], triton.next_power_of_2(head_v_dim)))
    o = new_buffer((total, num_v_heads, head_v_dim), v)
    # fp32 operands multiply in full fp32 (Triton's default would be tf32); 16-bit inputs are upcast to fp32
    # in the kernel (l2 norm, decays) and multiply as tf32, finer than the bf16 inputs.
    prec = "ieee" if v.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(head_v_dim, block_v), num_seqs * num_v_heads)
    gated_delta_rule_fwd_kernel[grid](
        q, k, v, g, beta, o, cu_seqlens, scale, HK=num_k_heads, HV=num_v_heads, K=head_k_dim, V=head_v_dim,
        BT=config["BT"], BK=block_k, BV=block_v, L2NORM=l2norm_qk, PREC=prec,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return o


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
                           l2norm_qk: bool = True) -> torch.Tensor:
    """Gated delta rule forward, chunked (no state in or out: every sequence starts from a zero state).

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv] with Hv a multiple of Hk (value head h reads key head h // (Hv//Hk));
    g [B, T, Hv] log decay (<= 0) and beta [B, T, Hv] in (0, 1), any float dtype (used in fp32).
    With cu_seqlens [N+1] int32 (B = 1) the T tokens are N packed documents, each starting from a zero state.
    l2norm_qk normalises q and k per head in fp32 (Qwen3-Next's use_qk_l2norm_in_kernel=True); scale defaults
    to Dk^-0.5. -> o [B, T, Hv, Dv] in v's dtype, the same as HF's torch_chunk_gated_delta_rule output.
    """
    batch, num_tokens, num_k_heads, head_k_dim = k.shape
    num_v_heads = v.shape[2]
    if q.shape != k.shape or v.shape[:2] != (batch, num_tokens) or num_v_heads % num_k_heads:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q, k [B, T, Hk, Dk] "
                         f"and v [B, T, Hv, Dv] with Hv a multiple of Hk")
    if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError(f"g {tuple(g.shape)} and beta {tuple(beta.shape)} must both be [B, T, Hv] = "
                         f"{tuple(v.shape[:3])}")
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"packed documents (cu_seqlens given) need batch 1, got q {tuple(q.shape)}: "
                         "concatenate the sequences along T")
    if batch * num_tokens == 0:
        return v.new_empty(v.shape)
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, batch + 1, device=v.device, dtype=torch.int32) * num_tokens
    scale = head_k_dim ** -0.5 if scale is None else scale
    flat = [x.reshape(batch * num_tokens, *x.shape[2:]).contiguous() for x in (q, k, v, g, beta)]
    o = gated_delta_rule_fwd(*flat, cu_seqlens.to(torch.int32).contiguous(), scale, l2norm_qk)
    return o.view(v.shape)

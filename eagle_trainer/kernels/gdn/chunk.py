"""Chunked gated delta rule forward (Qwen3-Next linear attention core): two Triton kernels, output only.

Shapes (packed: all documents back to back, cu_seqlens [N+1] int32 gives their starts):
    q, k [1, T, Hk, Dk];  v [1, T, Hv, Dv];  g, beta [1, T, Hv];  o [1, T, Hv, Dv]   (Hv = G * Hk)
A [B, T, ...] batch without cu_seqlens is run as B documents of T tokens.

Within a chunk of BT = 64 tokens (positions i, j; gc = cumsum of g within the chunk, b = beta; q scaled and
q, k l2-normalised in fp32):
    A    = strictly_lower(b_i k_i.k_j exp(gc_i - gc_j))                 [BT, BT]
    T    = (I + A)^-1                                                     the WY form of the chunk's delta updates
    Aqk  = lower_incl_diag(q_i.k_j exp(gc_i - gc_j))                      [BT, BT]
    r    = b (v - (k exp(gc)) S)                                          what the old state S does not predict
    vn   = T r
    o    = (q exp(gc)) S + Aqk vn
    S    = exp(gc_last) S + (k exp(gc_last - gc))^T vn
1. `chunk_prepare_kernel`, one program per (chunk, value head), all chunks at once: T and Aqk, written as
   [T_total, Hv, BT] (row t holds its chunk-row). T is found by forward substitution in 16 x 16 blocks: each
   diagonal block row by row, then T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj (fla's scheme; the Neumann product
   (I - A)(I + A^2)(I + A^4)... is fewer lines but cancels huge terms when keys repeat without decay).
2. `chunk_recurrent_kernel`, one program per (document, value head, BV columns of Dv), walks the document's
   chunks in order carrying S [Dk, BV] in fp32 registers: the per-chunk state never goes to memory (the
   target is frozen, only o is needed). Per chunk: 5 matmuls, 3 of them on the S dependency chain.
Chunks start at each document's first token, so none crosses a boundary; a chunk's rows past its document's
end read as k = v = q = 0, g = beta = 0, which adds nothing to the state or the output. 16-bit inputs multiply
as bf16 with fp32 accumulation (T and Aqk are stored in bf16, S is rounded to bf16 for its matmuls, as fla
does); fp32 inputs multiply in full fp32 (ieee).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.gdn.conv import document_of
from eagle_trainer.kernels.utils import dot_precision, interpreting, new_buffer

BT = 64  # the chunk: the WY algebra's block
BS = 16  # the forward-substitution block inside a chunk
# BV splits Dv across the recurrent programs; it is chosen per call so that there are enough programs to fill
# the GPU (a single long sequence has only Hv * Dv / BV of them).
RECURRENT_GPU = {"BV": None, "HPP": 1, "num_warps": 4, "num_stages": None}  # None: `_recurrent_launch`
PREPARE_GPU = {"BK": 32, "num_warps": 1, "num_stages": 1}
INTERPRET = {"BK": 32, "BV": 32, "HPP": 2, "num_warps": 1, "num_stages": 1}


@triton.jit
def _substitute(a):
    """(I + A)^-1 of a [BS, BS] strictly lower A, row by row: X = T - I satisfies X_i = -A_i - sum_{j<i} A_ij X_j
    (rows past i still hold -A while row i is solved; row 1 is already -A_1)."""
    o_s = tl.arange(0, a.shape[0])
    x = -a
    for i in range(2, a.shape[0]):
        m_row = o_s == i
        b_x = tl.sum(tl.where(m_row[:, None], x, 0.0), axis=0)  # -A_i
        b_x = b_x + tl.sum(b_x[:, None] * x, axis=0) * (o_s < i)
        x = tl.where(m_row[:, None], b_x[None, :], x)
    return x + (o_s[:, None] == o_s[None, :]).to(tl.float32)


@triton.jit
def _decayed(x, gc_i, gc_j, scale_i, scale_j, MODE: tl.constexpr):
    """x_ij scale_i scale_j exp(gc_i - gc_j) on a [BS, BS] block: MODE 0 below the diagonal block (all of it),
    1 a diagonal block strictly below its diagonal, 2 a diagonal block on and below it."""
    o_s = tl.arange(0, x.shape[0])
    d = gc_i[:, None] - gc_j[None, :]
    if MODE == 1:
        keep = o_s[:, None] > o_s[None, :]
        d = tl.where(keep, d, float("-inf"))  # above the diagonal d > 0 could overflow before it is masked
    elif MODE == 2:
        keep = o_s[:, None] >= o_s[None, :]
        d = tl.where(keep, d, float("-inf"))
    return x * scale_i[:, None] * scale_j[None, :] * tl.exp(d)


@triton.jit
def _store_block_row(ptr, o_row, m_row, HV: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr,
                     b0, b1, b2, b3):
    """Row block [BS, BT] of a [T, Hv, BT] array (ptr already at this value head): its first NB [BS, BS] blocks
    (the ones on and below the diagonal; readers mask the rest, which is never written)."""
    o_b = tl.arange(0, BS)
    p = ptr + (o_row * (HV * BT))[:, None] + o_b[None, :]
    m = m_row[:, None]
    tl.store(p, b0.to(ptr.dtype.element_ty), mask=m)
    if NB > 1:
        tl.store(p + BS, b1.to(ptr.dtype.element_ty), mask=m)
    if NB > 2:
        tl.store(p + 2 * BS, b2.to(ptr.dtype.element_ty), mask=m)
    if NB > 3:
        tl.store(p + 3 * BS, b3.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _block_products(a_ptr, b_ptr, r0, r1, r2, r3, m0, m1, m2, m3, STRIDE: tl.constexpr, K: tl.constexpr,
                    BK: tl.constexpr, BS: tl.constexpr, SAME: tl.constexpr, L2NORM: tl.constexpr,
                    PREC: tl.constexpr):
    """a_i.b_j for the ten [BS, BS] blocks j <= i of a chunk's four row blocks (rows r0..r3, masks m0..m3, STRIDE
    elements apart), accumulated over Dk in BK slices, and 1 / |a_i| per row (1 without L2NORM; HF's l2norm:
    rsqrt(sum a^2 + 1e-6)). SAME: b is a (no second load)."""
    p00 = tl.zeros([BS, BS], dtype=tl.float32)
    p10 = tl.zeros([BS, BS], dtype=tl.float32)
    p11 = tl.zeros([BS, BS], dtype=tl.float32)
    p20 = tl.zeros([BS, BS], dtype=tl.float32)
    p21 = tl.zeros([BS, BS], dtype=tl.float32)
    p22 = tl.zeros([BS, BS], dtype=tl.float32)
    p30 = tl.zeros([BS, BS], dtype=tl.float32)
    p31 = tl.zeros([BS, BS], dtype=tl.float32)
    p32 = tl.zeros([BS, BS], dtype=tl.float32)
    p33 = tl.zeros([BS, BS], dtype=tl.float32)
    n0 = tl.zeros([BS], dtype=tl.float32)
    n1 = tl.zeros([BS], dtype=tl.float32)
    n2 = tl.zeros([BS], dtype=tl.float32)
    n3 = tl.zeros([BS], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        a0 = tl.load(a_ptr + (r0 * STRIDE)[:, None] + o_k[None, :], mask=m0[:, None] & m_k[None, :], other=0.0)
        a1 = tl.load(a_ptr + (r1 * STRIDE)[:, None] + o_k[None, :], mask=m1[:, None] & m_k[None, :], other=0.0)
        a2 = tl.load(a_ptr + (r2 * STRIDE)[:, None] + o_k[None, :], mask=m2[:, None] & m_k[None, :], other=0.0)
        a3 = tl.load(a_ptr + (r3 * STRIDE)[:, None] + o_k[None, :], mask=m3[:, None] & m_k[None, :], other=0.0)
        if SAME:
            b0, b1, b2, b3 = a0, a1, a2, a3
        else:
            b0 = tl.load(b_ptr + (r0 * STRIDE)[:, None] + o_k[None, :], mask=m0[:, None] & m_k[None, :], other=0.0)
            b1 = tl.load(b_ptr + (r1 * STRIDE)[:, None] + o_k[None, :], mask=m1[:, None] & m_k[None, :], other=0.0)
            b2 = tl.load(b_ptr + (r2 * STRIDE)[:, None] + o_k[None, :], mask=m2[:, None] & m_k[None, :], other=0.0)
            b3 = tl.load(b_ptr + (r3 * STRIDE)[:, None] + o_k[None, :], mask=m3[:, None] & m_k[None, :], other=0.0)
        if L2NORM:
            n0 += tl.sum(a0.to(tl.float32) * a0.to(tl.float32), axis=1)
            n1 += tl.sum(a1.to(tl.float32) * a1.to(tl.float32), axis=1)
            n2 += tl.sum(a2.to(tl.float32) * a2.to(tl.float32), axis=1)
            n3 += tl.sum(a3.to(tl.float32) * a3.to(tl.float32), axis=1)
        p00 = tl.dot(a0, tl.trans(b0), p00, input_precision=PREC)
        p10 = tl.dot(a1, tl.trans(b0), p10, input_precision=PREC)
        p11 = tl.dot(a1, tl.trans(b1), p11, input_precision=PREC)
        p20 = tl.dot(a2, tl.trans(b0), p20, input_precision=PREC)
        p21 = tl.dot(a2, tl.trans(b1), p21, input_precision=PREC)
        p22 = tl.dot(a2, tl.trans(b2), p22, input_precision=PREC)
        p30 = tl.dot(a3, tl.trans(b0), p30, input_precision=PREC)
        p31 = tl.dot(a3, tl.trans(b1), p31, input_precision=PREC)
        p32 = tl.dot(a3, tl.trans(b2), p32, input_precision=PREC)
        p33 = tl.dot(a3, tl.trans(b3), p33, input_precision=PREC)
    if L2NORM:
        n0, n1, n2, n3 = tl.rsqrt(n0 + 1e-6), tl.rsqrt(n1 + 1e-6), tl.rsqrt(n2 + 1e-6), tl.rsqrt(n3 + 1e-6)
    else:
        n0, n1, n2, n3 = n0 + 1.0, n1 + 1.0, n2 + 1.0, n3 + 1.0
    return p00, p10, p11, p20, p21, p22, p30, p31, p32, p33, n0, n1, n2, n3


@triton.jit
def chunk_prepare_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, rq_ptr, rk_ptr, t_ptr, aqk_ptr, cu_seqlens_ptr,
                         cu_chunks_ptr, scale, num_seqs, num_steps, stride_qk: tl.constexpr, HK: tl.constexpr,
                         HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                         L2NORM: tl.constexpr, PREC: tl.constexpr):
    """One (chunk, value head): T = (I + A)^-1 and Aqk in 16 x 16 blocks (rows i, columns j <= i), from raw q, k
    dot products over Dk in BK slices; the l2 norms are row scales applied afterwards (k^_i.k^_j =
    k_i.k_j / |k_i| |k_j|), and their reciprocals are stored for the recurrent kernel."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    if i_c >= tl.load(cu_chunks_ptr + num_seqs):
        return  # the grid is sized by an upper bound on the number of chunks
    i_n = document_of(cu_chunks_ptr, i_c, num_seqs, num_steps)  # cu_chunks[n] <= i_c < cu_chunks[n+1]
    bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + i_n + 1) - tl.load(cu_seqlens_ptr + i_n)).to(tl.int32)
    t0 = (i_c - tl.load(cu_chunks_ptr + i_n)).to(tl.int32) * BT  # chunk start within the document
    i_hk = i_h // (HV // HK)
    # scalar 64-bit bases at this document's first row; offsets inside the document stay 32-bit
    q_ptr += bos * stride_qk + i_hk * K
    k_ptr += bos * stride_qk + i_hk * K
    rq_ptr += bos * HK + i_hk
    rk_ptr += bos * HK + i_hk
    g_ptr += bos * HV + i_h
    beta_ptr += bos * HV + i_h
    t_ptr += (bos * HV + i_h) * BT
    aqk_ptr += (bos * HV + i_h) * BT
    o_b = tl.arange(0, BS)
    r0 = t0 + o_b
    r1 = r0 + BS
    r2 = r1 + BS
    r3 = r2 + BS
    m0 = r0 < seq_len
    m1 = r1 < seq_len
    m2 = r2 < seq_len
    m3 = r3 < seq_len

    g0 = tl.load(g_ptr + r0 * HV, mask=m0, other=0.0).to(tl.float32)
    g1 = tl.load(g_ptr + r1 * HV, mask=m1, other=0.0).to(tl.float32)
    g2 = tl.load(g_ptr + r2 * HV, mask=m2, other=0.0).to(tl.float32)
    g3 = tl.load(g_ptr + r3 * HV, mask=m3, other=0.0).to(tl.float32)
    gc0 = tl.cumsum(g0, axis=0)
    gc1 = tl.cumsum(g1, axis=0) + tl.sum(g0, axis=0)
    gc2 = tl.cumsum(g2, axis=0) + tl.sum(g0, axis=0) + tl.sum(g1, axis=0)
    gc3 = tl.cumsum(g3, axis=0) + tl.sum(g0, axis=0) + tl.sum(g1, axis=0) + tl.sum(g2, axis=0)
    zero = tl.zeros([BS, BS], dtype=tl.float32)

    # Pass 1 over Dk: k_i.k_j and 1 / |k_i|
    kk00, kk10, kk11, kk20, kk21, kk22, kk30, kk31, kk32, kk33, rk0, rk1, rk2, rk3 = _block_products(
        k_ptr, k_ptr, r0, r1, r2, r3, m0, m1, m2, m3, stride_qk, K, BK, BS, True, L2NORM, PREC)
    bk0 = rk0 * tl.load(beta_ptr + r0 * HV, mask=m0, other=0.0).to(tl.float32)
    bk1 = rk1 * tl.load(beta_ptr + r1 * HV, mask=m1, other=0.0).to(tl.float32)
    bk2 = rk2 * tl.load(beta_ptr + r2 * HV, mask=m2, other=0.0).to(tl.float32)
    bk3 = rk3 * tl.load(beta_ptr + r3 * HV, mask=m3, other=0.0).to(tl.float32)

    # A_ij = beta_i k^_i.k^_j exp(gc_i - gc_j) (strictly lower); T by blocks:
    # T_ii = (I + A_ii)^-1, T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj
    d0 = _substitute(_decayed(kk00, gc0, gc0, bk0, rk0, 1))
    d1 = _substitute(_decayed(kk11, gc1, gc1, bk1, rk1, 1))
    d2 = _substitute(_decayed(kk22, gc2, gc2, bk2, rk2, 1))
    d3 = _substitute(_decayed(kk33, gc3, gc3, bk3, rk3, 1))
    a10 = _decayed(kk10, gc1, gc0, bk1, rk0, 0)
    a20 = _decayed(kk20, gc2, gc0, bk2, rk0, 0)
    a21 = _decayed(kk21, gc2, gc1, bk2, rk1, 0)
    a30 = _decayed(kk30, gc3, gc0, bk3, rk0, 0)
    a31 = _decayed(kk31, gc3, gc1, bk3, rk1, 0)
    a32 = _decayed(kk32, gc3, gc2, bk3, rk2, 0)
    t10 = -tl.dot(d1, tl.dot(a10, d0, input_precision=PREC), input_precision=PREC)
    t21 = -tl.dot(d2, tl.dot(a21, d1, input_precision=PREC), input_precision=PREC)
    t32 = -tl.dot(d3, tl.dot(a32, d2, input_precision=PREC), input_precision=PREC)
    t20 = tl.dot(a21, t10, tl.dot(a20, d0, input_precision=PREC), input_precision=PREC)
    t20 = -tl.dot(d2, t20, input_precision=PREC)
    t31 = tl.dot(a32, t21, tl.dot(a31, d1, input_precision=PREC), input_precision=PREC)
    t31 = -tl.dot(d3, t31, input_precision=PREC)
    t30 = tl.dot(a31, t10, tl.dot(a30, d0, input_precision=PREC), input_precision=PREC)
    t30 = -tl.dot(d3, tl.dot(a32, t20, t30, input_precision=PREC), input_precision=PREC)
    _store_block_row(t_ptr, r0, m0, HV, BT, BS, 1, d0, zero, zero, zero)
    _store_block_row(t_ptr, r1, m1, HV, BT, BS, 2, t10, d1, zero, zero)
    _store_block_row(t_ptr, r2, m2, HV, BT, BS, 3, t20, t21, d2, zero)
    _store_block_row(t_ptr, r3, m3, HV, BT, BS, 4, t30, t31, t32, d3)

    # Pass 2 over Dk: q_i.k_j and 1 / |q_i| -> Aqk = q^_i.k^_j exp(gc_i - gc_j), j <= i, the scale on q
    qk00, qk10, qk11, qk20, qk21, qk22, qk30, qk31, qk32, qk33, rq0, rq1, rq2, rq3 = _block_products(
        q_ptr, k_ptr, r0, r1, r2, r3, m0, m1, m2, m3, stride_qk, K, BK, BS, False, L2NORM, PREC)
    if i_h % (HV // HK) == 0:  # the first value head of a group stores its key head's reciprocal norms
        tl.store(rk_ptr + r0 * HK, rk0, mask=m0)
        tl.store(rk_ptr + r1 * HK, rk1, mask=m1)
        tl.store(rk_ptr + r2 * HK, rk2, mask=m2)
        tl.store(rk_ptr + r3 * HK, rk3, mask=m3)
        tl.store(rq_ptr + r0 * HK, rq0, mask=m0)
        tl.store(rq_ptr + r1 * HK, rq1, mask=m1)
        tl.store(rq_ptr + r2 * HK, rq2, mask=m2)
        tl.store(rq_ptr + r3 * HK, rq3, mask=m3)
    sq0, sq1, sq2, sq3 = rq0 * scale, rq1 * scale, rq2 * scale, rq3 * scale
    _store_block_row(aqk_ptr, r0, m0, HV, BT, BS, 1, _decayed(qk00, gc0, gc0, sq0, rk0, 2), zero, zero, zero)
    _store_block_row(aqk_ptr, r1, m1, HV, BT, BS, 2, _decayed(qk10, gc1, gc0, sq1, rk0, 0),
                     _decayed(qk11, gc1, gc1, sq1, rk1, 2), zero, zero)
    _store_block_row(aqk_ptr, r2, m2, HV, BT, BS, 3, _decayed(qk20, gc2, gc0, sq2, rk0, 0),
                     _decayed(qk21, gc2, gc1, sq2, rk1, 0), _decayed(qk22, gc2, gc2, sq2, rk2, 2), zero)
    _store_block_row(aqk_ptr, r3, m3, HV, BT, BS, 4, _decayed(qk30, gc3, gc0, sq3, rk0, 0),
                     _decayed(qk31, gc3, gc1, sq3, rk1, 0), _decayed(qk32, gc3, gc2, sq3, rk2, 0),
                     _decayed(qk33, gc3, gc3, sq3, rk3, 2))


@triton.jit
def _head_step(b_S, b_q, b_k, b_rq, b_rk, g_ptr, beta_ptr, v_ptr, o_ptr, t_ptr, aqk_ptr, o_t, m_t, o_v, m_v, o_i,
               m_blocks, stride_v: tl.constexpr, HV: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
               PREC: tl.constexpr):
    """One chunk of one value head (pointers at the head's first row): writes o, returns the next state."""
    dot_ty = t_ptr.dtype.element_ty
    b_g = tl.load(g_ptr + o_t * HV, mask=m_t, other=0.0).to(tl.float32)
    b_beta = tl.load(beta_ptr + o_t * HV, mask=m_t, other=0.0).to(tl.float32)
    b_gc = tl.cumsum(b_g, axis=0)
    b_gl = tl.sum(b_g, axis=0)  # padding rows add 0
    m_tv = m_t[:, None] & m_v[None, :]
    o_tv = (o_t * (HV * V))[:, None] + o_v[None, :]
    o_vv = (o_t * stride_v)[:, None] + o_v[None, :]
    b_v = tl.load(v_ptr + o_vv, mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
    o_tt = (o_t * (HV * BT))[:, None] + o_i[None, :]
    m_tt = m_t[:, None] & m_blocks  # blocks above the diagonal are never written
    b_T = tl.load(t_ptr + o_tt, mask=m_tt, other=0.0)  # [BT, BT]
    b_aqk = tl.load(aqk_ptr + o_tt, mask=m_tt, other=0.0)

    b_Sd = b_S.to(dot_ty)
    b_eg = tl.exp(b_gc)
    b_y = tl.dot(b_k, b_Sd, input_precision=PREC) * (b_eg * b_rk)[:, None]  # [BT, BV]
    b_o = tl.dot(b_q, b_Sd, input_precision=PREC) * (b_eg * b_rq)[:, None]
    b_r = (b_v - b_y) * b_beta[:, None]
    b_vn = tl.dot(b_T, b_r.to(dot_ty), input_precision=PREC)  # [BT, BV]
    b_o = tl.dot(b_aqk, b_vn.to(dot_ty), b_o, input_precision=PREC)
    tl.store(o_ptr + o_tv, b_o.to(o_ptr.dtype.element_ty), mask=m_tv)
    b_vd = (b_vn * (tl.exp(b_gl - b_gc) * b_rk)[:, None]).to(dot_ty)
    return tl.dot(tl.trans(b_k), b_vd, b_S * tl.exp(b_gl), input_precision=PREC)


@triton.jit
def chunk_recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, rq_ptr, rk_ptr, t_ptr, aqk_ptr, o_ptr,
                           cu_seqlens_ptr, scale, stride_qk: tl.constexpr, stride_v: tl.constexpr,
                           HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HPP: tl.constexpr,
                           PREC: tl.constexpr):
    """Raw q, k rows are the matmul operands; their l2 norms (rq, rk: reciprocals from the prepare kernel), the
    scale and the decays scale rows of the [BT, BV] products instead: (exp(gc) k^) S = exp(gc) rk (k S),
    k^^T (exp(gl - gc) vn) = k^T (rk exp(gl - gc) vn). HPP (1 or 2) value heads of one key head per program:
    they share the q, k loads, and their two independent state chains give the GPU work to overlap."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // (HV // HPP), (i_nh % (HV // HPP)) * HPP
    i_hk = i_h // (HV // HK)  # grouped value heads: G consecutive value heads share a key head
    bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + i_n + 1) - tl.load(cu_seqlens_ptr + i_n)).to(tl.int32)
    dot_ty = t_ptr.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    # scalar 64-bit bases at this document's first row; offsets inside the document stay 32-bit
    k_ptr += bos * stride_qk + i_hk * K
    q_ptr += bos * stride_qk + i_hk * K
    rk_ptr += bos * HK + i_hk
    rq_ptr += bos * HK + i_hk
    v_ptr += bos * stride_v + i_h * V
    o_ptr += (bos * HV + i_h) * V
    t_ptr += (bos * HV + i_h) * BT
    aqk_ptr += (bos * HV + i_h) * BT
    g_ptr += bos * HV + i_h
    beta_ptr += bos * HV + i_h
    m_blocks = (o_i[None, :] // BS) <= (o_i[:, None] // BS)
    b_S0 = tl.zeros([BK, BV], dtype=tl.float32)
    b_S1 = tl.zeros([BK, BV], dtype=tl.float32)
    for i_c in range(tl.cdiv(seq_len, BT)):
        o_t = i_c * BT + o_i
        m_t = o_t < seq_len
        m_qk = m_t[:, None] & m_k[None, :]
        o_qk = (o_t * stride_qk)[:, None] + o_k[None, :]
        b_k = tl.load(k_ptr + o_qk, mask=m_qk, other=0.0).to(dot_ty)  # [BT, BK]
        b_q = tl.load(q_ptr + o_qk, mask=m_qk, other=0.0).to(dot_ty)
        b_rk = tl.load(rk_ptr + o_t * HK, mask=m_t, other=0.0)
        b_rq = tl.load(rq_ptr + o_t * HK, mask=m_t, other=0.0) * scale
        b_S0 = _head_step(b_S0, b_q, b_k, b_rq, b_rk, g_ptr, beta_ptr, v_ptr, o_ptr, t_ptr, aqk_ptr, o_t, m_t, o_v,
                          m_v, o_i, m_blocks, stride_v, HV, V, BT, PREC)
        if HPP == 2:
            b_S1 = _head_step(b_S1, b_q, b_k, b_rq, b_rk, g_ptr + 1, beta_ptr + 1, v_ptr + V, o_ptr + V,
                              t_ptr + BT, aqk_ptr + BT, o_t, m_t, o_v, m_v, o_i, m_blocks, stride_v, HV, V, BT,
                              PREC)


@triton.jit
def chunk_offsets_kernel(cu_seqlens_ptr, cu_chunks_ptr, num_seqs, BT: tl.constexpr, BN: tl.constexpr):
    """cu_chunks[n] = the number of BT-token chunks of the documents before n (n = 0..N), in one program."""
    o_n = tl.arange(0, BN)
    m_n = o_n < num_seqs
    b_len = tl.load(cu_seqlens_ptr + o_n + 1, mask=m_n, other=0) - tl.load(cu_seqlens_ptr + o_n, mask=m_n, other=0)
    tl.store(cu_chunks_ptr + 1 + o_n, tl.cumsum((b_len + BT - 1) // BT, axis=0), mask=m_n)
    tl.store(cu_chunks_ptr + o_n, tl.zeros_like(o_n), mask=o_n == 0)


def chunk_offsets(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N+1] int32 document starts -> [N+1] int32 chunk starts: one launch where torch's arithmetic took seven (a
    forward runs this once per gated-delta-net layer); torch's own ops past 8192 documents."""
    num_seqs = cu_seqlens.numel() - 1
    if num_seqs > 8192:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        cu_chunks = torch.zeros(num_seqs + 1, device=cu_seqlens.device, dtype=torch.int32)
        cu_chunks[1:] = torch.cumsum(torch.div(lengths + BT - 1, BT, rounding_mode="floor"), 0)
        return cu_chunks
    cu_chunks = new_buffer((num_seqs + 1,), cu_seqlens)
    chunk_offsets_kernel[(1,)](cu_seqlens, cu_chunks, num_seqs, BT=BT,
                               BN=max(16, triton.next_power_of_2(num_seqs)), num_warps=1 if interpreting() else 4)
    return cu_chunks


def _recurrent_launch(head_v_dim: int, programs_per_block: int, device: torch.device) -> tuple[int, int]:
    """(BV, num_stages) from the H100 sweep (benchmarks/gdn.py --sweep): BV = 32 unless that leaves fewer than
    two programs per SM with 64; a deeper load pipeline (3 stages) pays only when every program has an SM to
    itself (a long single sequence), and costs occupancy otherwise."""
    block = min(64, max(32, triton.next_power_of_2(head_v_dim)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    if block == 64 and programs_per_block * triton.cdiv(head_v_dim, block) < 2 * sms:
        block = 32
    programs = programs_per_block * triton.cdiv(head_v_dim, block)
    return block, 3 if programs <= sms else 2


def gated_delta_rule_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         cu_seqlens: torch.Tensor, scale: float, l2norm_qk: bool) -> torch.Tensor:
    """Packed inputs: q, k [T, Hk, Dk] and v [T, Hv, Dv], each row contiguous (q and k with one row stride, v with
    its own: views of the conv output are read where they lie); g, beta [T, Hv] and cu_seqlens [N+1] int32
    contiguous."""
    _, num_k_heads, head_k_dim = k.shape
    total, num_v_heads, head_v_dim = v.shape
    num_seqs = cu_seqlens.numel() - 1
    interpret = interpreting()
    # tl.dot needs every dimension >= 16
    block_k = max(16, triton.next_power_of_2(head_k_dim))
    recurrent = INTERPRET if interpret else RECURRENT_GPU
    heads_per_program = recurrent["HPP"] if (num_v_heads // num_k_heads) % recurrent["HPP"] == 0 else 1
    block_v, stages = _recurrent_launch(head_v_dim, num_seqs * num_v_heads // heads_per_program, v.device)
    block_v, stages = recurrent["BV"] or block_v, recurrent["num_stages"] or stages
    # 16-bit inputs multiply as bf16 (fp32 accumulation); fp32 inputs in full fp32
    dot_dtype = torch.float32 if v.dtype == torch.float32 else torch.bfloat16
    prec = dot_precision(dot_dtype)
    cu_chunks = chunk_offsets(cu_seqlens)
    recip_q = new_buffer(q.shape[:2], q, torch.float32)  # [T, Hk] 1 / |q|, 1 / |k| (1 without the l2 norm)
    recip_k = new_buffer(k.shape[:2], k, torch.float32)
    t_inv = new_buffer((total, num_v_heads, BT), v, dot_dtype)
    aqk = new_buffer((total, num_v_heads, BT), v, dot_dtype)
    launch = INTERPRET if interpret else PREPARE_GPU
    chunk_prepare_kernel[(triton.cdiv(total, BT) + num_seqs, num_v_heads)](
        q, k, g, beta, recip_q, recip_k, t_inv, aqk, cu_seqlens, cu_chunks, scale, num_seqs,
        max(num_seqs - 1, 0).bit_length(), k.stride(0), HK=num_k_heads, HV=num_v_heads, K=head_k_dim,
        BK=min(launch["BK"], block_k), BT=BT, BS=BS, L2NORM=l2norm_qk, PREC=prec,
        num_warps=launch["num_warps"], num_stages=launch["num_stages"])
    o = new_buffer((total, num_v_heads, head_v_dim), v)
    launch = recurrent
    chunk_recurrent_kernel[(triton.cdiv(head_v_dim, block_v), num_seqs * num_v_heads // heads_per_program)](
        q, k, v, g, beta, recip_q, recip_k, t_inv, aqk, o, cu_seqlens, scale, k.stride(0), v.stride(0),
        HK=num_k_heads, HV=num_v_heads, K=head_k_dim, V=head_v_dim, BT=BT, BS=BS, BK=block_k, BV=block_v,
        HPP=heads_per_program, PREC=prec,
        num_warps=launch["num_warps"], num_stages=stages)
    return o


def _token_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, T, H, D] -> [B*T, H, D] with contiguous rows: views where they already are (e.g. split out of
    the conv output's [B, T, C]), copies otherwise; q and k share one row stride; every row offset stays within
    32 bits (the kernels' row arithmetic)."""
    def rows(x):
        x = x.reshape(-1, *x.shape[2:])  # a view when B and T merge
        dense = x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.stride(0) >= x.shape[1] * x.shape[2]
        return x if dense and x.shape[0] * x.stride(0) < 2**31 else x.contiguous()
    q, k, v = rows(q), rows(k), rows(v)
    if q.stride(0) != k.stride(0):
        q, k = q.contiguous(), k.contiguous()
    return q, k, v


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
        cu_seqlens = torch.arange(0, (batch + 1) * num_tokens, num_tokens, device=v.device, dtype=torch.int32)
    scale = head_k_dim ** -0.5 if scale is None else scale
    shape = v.shape
    q, k, v = _token_rows(q, k, v)
    g, beta = (x.reshape(batch * num_tokens, -1).contiguous() for x in (g, beta))
    o = gated_delta_rule_fwd(q, k, v, g, beta, cu_seqlens.to(torch.int32).contiguous(), scale, l2norm_qk)
    return o.view(shape)

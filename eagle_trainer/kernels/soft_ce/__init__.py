"""Soft cross-entropy of draft logits against a teacher given by its logits, with the gradient, in one kernel.

    soft_ce_rows(z [C, V], teacher [C, V], weight [C] fp32) -> (dz [C, V], ce [C] fp32, hit [C] fp32)
    p     = softmax(teacher)                     (fp32; the teacher's logits, e.g. bf16, are read as they are)
    ce    = logsumexp(z) - sum_v p_v z_v          the soft cross-entropy of the row
    hit   = argmax(z) == argmax(teacher)         (lowest index wins ties, as torch.argmax)
    dz    = weight * (softmax(z) - p)             d(sum_rows weight * ce) / dz, in z's dtype

One program per row. A row that fits one block (BV >= V) is read once. Otherwise two passes over V in blocks: the
first keeps running maxima, sums and argmaxes of both rows (an online log-sum-exp; sum p z is rescaled with the
teacher's running max) and asks L2 to keep the blocks, the second reads them again and writes dz. At V = 32000 on an
H100 (benchmarks/soft_ce.py --sweep) two passes of 2048-wide blocks with 4 warps are fastest (1.64 TB/s, 54% of a
copy's); one 32768-wide block spills registers at every warp count.
dz may alias z (the draft logits are not needed after): the EAGLE-3 loss head (drafts/soft_ce.py) overwrites its
logits chunk with the gradient. Reads 2 x (z + teacher), writes dz: 10 bytes per bf16 element.
reference.py holds the same function in plain torch (the loss head's CPU path). Rows are independent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.moe.configs import interpreting
from eagle_trainer.kernels.soft_ce.reference import soft_ce_rows_reference


@triton.jit
def soft_ce_rows_kernel(z_ptr, t_ptr, w_ptr, dz_ptr, ce_ptr, hit_ptr, V, stride_z, stride_t, stride_dz,
                        BV: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row, t_row = z_ptr + row * stride_z, t_ptr + row * stride_t
    dz_row = dz_ptr + row * stride_dz
    w = tl.load(w_ptr + row)
    o = tl.arange(0, BV)
    if ONE_BLOCK:  # BV >= V: the whole row in one block, read once
        mask = o < V
        b_z = tl.load(z_row + o, mask=mask, other=float("-inf")).to(tl.float32)
        b_t = tl.load(t_row + o, mask=mask, other=float("-inf")).to(tl.float32)
        m_z = tl.max(b_z, 0)
        m_t = tl.max(b_t, 0)
        a_z = tl.argmax(b_z, 0, tie_break_left=True)
        a_t = tl.argmax(b_t, 0, tie_break_left=True)
        e_z = tl.exp(b_z - m_z)
        e_t = tl.exp(b_t - m_t)
        s_z = tl.sum(e_z, 0)
        s_t = tl.sum(e_t, 0)
        u_t = tl.sum(e_t * tl.where(mask, b_z, 0.0), 0)
        tl.store(ce_ptr + row, m_z + tl.log(s_z) - u_t / s_t)
        tl.store(hit_ptr + row, (a_z == a_t).to(tl.float32))
        tl.store(dz_row + o, (w * (e_z / s_z - e_t / s_t)).to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        # pass 1: online max / sum of exp / argmax of both rows, and sum exp(t - m_t) z; the blocks are kept in L2
        # for pass 2 where they fit
        m_z = tl.full((), float("-inf"), tl.float32)
        s_z = tl.zeros((), tl.float32)
        a_z = tl.zeros((), tl.int64)
        m_t = tl.full((), float("-inf"), tl.float32)
        s_t = tl.zeros((), tl.float32)
        u_t = tl.zeros((), tl.float32)
        a_t = tl.zeros((), tl.int64)
        for v0 in range(0, V, BV):
            mask = v0 + o < V
            b_z = tl.load(z_row + v0 + o, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            b_t = tl.load(t_row + v0 + o, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            bm_z = tl.max(b_z, 0)
            ba_z = tl.argmax(b_z, 0, tie_break_left=True).to(tl.int64) + v0
            a_z = tl.where(bm_z > m_z, ba_z, a_z)
            new_z = tl.maximum(m_z, bm_z)
            s_z = s_z * tl.exp(m_z - new_z) + tl.sum(tl.exp(b_z - new_z), 0)
            m_z = new_z
            bm_t = tl.max(b_t, 0)
            ba_t = tl.argmax(b_t, 0, tie_break_left=True).to(tl.int64) + v0
            a_t = tl.where(bm_t > m_t, ba_t, a_t)
            new_t = tl.maximum(m_t, bm_t)
            e_t = tl.exp(b_t - new_t)
            rescale = tl.exp(m_t - new_t)
            s_t = s_t * rescale + tl.sum(e_t, 0)
            u_t = u_t * rescale + tl.sum(e_t * tl.where(mask, b_z, 0.0), 0)
            m_t = new_t
        lse_z = m_z + tl.log(s_z)
        lse_t = m_t + tl.log(s_t)
        tl.store(ce_ptr + row, lse_z - u_t / s_t)
        tl.store(hit_ptr + row, (a_z == a_t).to(tl.float32))
        # pass 2: dz = w (softmax(z) - p)
        for v0 in range(0, V, BV):
            mask = v0 + o < V
            b_z = tl.load(z_row + v0 + o, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            b_t = tl.load(t_row + v0 + o, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            g = w * (tl.exp(b_z - lse_z) - tl.exp(b_t - lse_t))
            tl.store(dz_row + v0 + o, g.to(dz_ptr.dtype.element_ty), mask=mask)


def new_buffer(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised output memory (tests swap this for NaN-filled buffers)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def soft_ce_rows(z: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                 block: int = 2048, num_warps: int = 4):
    """See the module docstring. z, teacher: [C, V] with unit column stride; weight [C] fp32;
    out: where dz goes (default a new tensor like z; may be z itself)."""
    rows, vocab = z.shape
    if teacher.shape != z.shape or weight.shape != (rows,):
        raise ValueError(f"soft_ce_rows: z {tuple(z.shape)}, teacher {tuple(teacher.shape)} and weight "
                         f"{tuple(weight.shape)} must be [C, V], [C, V] and [C]")
    if z.device.type != "cuda" and not interpreting():
        raise ValueError(f"soft_ce_rows runs on a GPU (or the CPU with TRITON_INTERPRET=1), got {z.device} tensors; "
                         "use kernels.soft_ce.reference.soft_ce_rows_reference there")
    dz = new_buffer((rows, vocab), z, z.dtype) if out is None else out
    ce = new_buffer((rows,), z, torch.float32)
    hit = new_buffer((rows,), z, torch.float32)
    if rows:
        assert z.stride(1) == teacher.stride(1) == dz.stride(1) == 1, "soft_ce_rows wants unit column stride"
        bv = min(block, triton.next_power_of_2(vocab))
        soft_ce_rows_kernel[(rows,)](z, teacher, weight.float().contiguous(), dz, ce, hit, vocab, z.stride(0),
                                     teacher.stride(0), dz.stride(0), BV=bv, ONE_BLOCK=bv >= vocab, num_warps=num_warps)
    return dz, ce, hit


__all__ = ["soft_ce_rows", "soft_ce_rows_reference"]

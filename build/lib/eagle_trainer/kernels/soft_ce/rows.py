"""The soft cross-entropy row kernel and the row statistics kernel (teacher_stats, row_max).

    soft_ce_rows(z [C, V], teacher [C, V], weight [C] fp32[, stats]) -> (dz [C, V], ce [C] fp32, hit [C] fp32)
    p     = softmax(teacher)                     (fp32; the teacher's logits, e.g. bf16, are read as they are)
    ce    = logsumexp(z) - sum_v p_v z_v          the soft cross-entropy of the row
    hit   = argmax(z) == argmax(teacher)         (lowest index wins ties, as torch.argmax)
    dz    = weight * (softmax(z) - p)             d(sum_rows weight * ce) / dz, in z's dtype

The teacher enters through its per-row log-sum-exp and argmax (`teacher_stats`, one pass over it): the EAGLE-3 loss
head forms them once per batch, and each of its K steps reads teacher row t + 1 + k again, so they are not formed
K times. One program per row. A row that fits one block (BV >= V) is read once. Otherwise two passes over V in
blocks: the first reads z alone (running max, sum of exp and argmax: an online log-sum-exp) and asks L2 to keep the
blocks; the second reads z and the teacher, writes dz and sums p z. Reads z twice and the teacher once, writes dz:
8 bytes per bf16 element. At V = 32000 on an H100 (benchmarks/soft_ce.py --sweep, C=16384 rows) 8192-wide blocks
with 8 warps are fastest (1.78 ms against 1.89 ms for 2048/4): the defaults. One 32768-wide block spills registers
at every warp count, and programs walking several rows each (so pass 2 might find pass 1's blocks in L2) are
slower than one program per row. dz may alias z (the draft logits are not needed after): the EAGLE-3 loss head
(drafts/soft_ce.py) overwrites its logits chunk with the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eagle_trainer.kernels.utils import new_buffer, triton_runs_on


@triton.jit
def _online_row(x_row, V, BV: tl.constexpr, SUM: tl.constexpr, EVICT: tl.constexpr):
    """One pass over a row in BV-wide blocks -> (max, sum of exp(x - max) (with SUM; else 0), argmax) in fp32/int64
    (an online log-sum-exp; the lowest index wins ties)."""
    o = tl.arange(0, BV)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.int64)
    for v0 in range(0, V, BV):
        b = tl.load(x_row + v0 + o, mask=v0 + o < V, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
        bm = tl.max(b, 0)
        a = tl.where(bm > m, tl.argmax(b, 0, tie_break_left=True).to(tl.int64) + v0, a)
        new = tl.maximum(m, bm)
        if SUM:
            s = s * tl.exp(m - new) + tl.sum(tl.exp(b - new), 0)
        m = new
    return m, s, a


@triton.jit
def row_stats_kernel(t_ptr, lse_ptr, arg_ptr, V, stride_t, BV: tl.constexpr, LSE: tl.constexpr):
    """Per row: argmax (lowest index wins ties) and, with LSE, the log-sum-exp (else the maximum), one pass."""
    row = tl.program_id(0).to(tl.int64)
    m, s, a = _online_row(t_ptr + row * stride_t, V, BV, LSE, "evict_first")
    tl.store(lse_ptr + row, m + tl.log(s) if LSE else m)
    tl.store(arg_ptr + row, a)


@triton.jit
def soft_ce_rows_kernel(z_ptr, t_ptr, lse_t_ptr, arg_t_ptr, w_ptr, dz_ptr, ce_ptr, hit_ptr, V, stride_z, stride_t,
                        stride_dz, BV: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row, t_row = z_ptr + row * stride_z, t_ptr + row * stride_t
    dz_row = dz_ptr + row * stride_dz
    w = tl.load(w_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    a_t = tl.load(arg_t_ptr + row)
    o = tl.arange(0, BV)
    if ONE_BLOCK:  # BV >= V: the whole row in one block, read once
        mask = o < V
        b_z = tl.load(z_row + o, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(tl.load(t_row + o, mask=mask, other=float("-inf")).to(tl.float32) - lse_t)
        m_z = tl.max(b_z, 0)
        a_z = tl.argmax(b_z, 0, tie_break_left=True)
        e_z = tl.exp(b_z - m_z)
        s_z = tl.sum(e_z, 0)
        tl.store(ce_ptr + row, m_z + tl.log(s_z) - tl.sum(p * tl.where(mask, b_z, 0.0), 0))
        tl.store(hit_ptr + row, (a_z == a_t).to(tl.float32))
        tl.store(dz_row + o, (w * (e_z / s_z - p)).to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        # pass 1 (z only): online max / sum of exp / argmax; the blocks are kept in L2 for pass 2 where they fit
        m_z, s_z, a_z = _online_row(z_row, V, BV, True, "evict_last")
        lse_z = m_z + tl.log(s_z)
        # pass 2: dz = w (softmax(z) - p), and sum p z for the loss
        u = tl.zeros((), tl.float32)
        for v0 in range(0, V, BV):
            mask = v0 + o < V
            b_z = tl.load(z_row + v0 + o, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            p = tl.exp(tl.load(t_row + v0 + o, mask=mask, other=float("-inf"), eviction_policy="evict_first")
                       .to(tl.float32) - lse_t)
            u += tl.sum(p * b_z, 0)
            tl.store(dz_row + v0 + o, (w * (tl.exp(b_z - lse_z) - p)).to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(ce_ptr + row, lse_z - u)
        tl.store(hit_ptr + row, (a_z == a_t).to(tl.float32))


def _check_rows(z: torch.Tensor, what: str) -> None:
    if not triton_runs_on(z.device):
        raise ValueError(f"{what} runs on a GPU (or the CPU with TRITON_INTERPRET=1), got {z.device} tensors; "
                         "use kernels.soft_ce.reference there")


def _row_stats(x: torch.Tensor, lse: bool, block: int, num_warps: int):
    rows, vocab = x.shape
    value = new_buffer((rows,), x, torch.float32)
    arg = new_buffer((rows,), x, torch.int64)
    if rows:
        assert x.stride(1) == 1, "row statistics want unit column stride"
        row_stats_kernel[(rows,)](x, value, arg, vocab, x.stride(0), BV=min(block, triton.next_power_of_2(vocab)),
                                  LSE=lse, num_warps=num_warps)
    return value, arg


def teacher_stats(teacher: torch.Tensor, block: int = 2048, num_warps: int = 4):
    """teacher [C, V] logits with unit column stride -> (log-sum-exp [C] fp32, argmax [C] int64): what the row kernel
    needs of the teacher. The EAGLE-3 loss head forms them once per batch; each of the K steps reads them."""
    _check_rows(teacher, "teacher_stats")
    return _row_stats(teacher, True, block, num_warps)


def row_max(x: torch.Tensor, block: int = 2048, num_warps: int = 4):
    """x [C, V] with unit column stride -> (max [C] fp32, argmax [C] int64; the lowest index wins ties): the
    full-vocabulary scan of the teacher's argmax mask (targets/frozen.py), one read of each logits chunk (torch's
    max-with-indices reduction reads bf16 at about 1.6 TB/s on an H100)."""
    _check_rows(x, "row_max")
    return _row_stats(x, False, block, num_warps)


def soft_ce_rows(z: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = 8192, num_warps: int = 8):
    """See the module docstring. z, teacher: [C, V] with unit column stride; weight [C] fp32;
    out: where dz goes (default a new tensor like z; may be z itself); stats: `teacher_stats(teacher)` when the
    caller has them (else formed here, one more pass over the teacher)."""
    rows, vocab = z.shape
    if teacher.shape != z.shape or weight.shape != (rows,):
        raise ValueError(f"soft_ce_rows: z {tuple(z.shape)}, teacher {tuple(teacher.shape)} and weight "
                         f"{tuple(weight.shape)} must be [C, V], [C, V] and [C]")
    _check_rows(z, "soft_ce_rows")
    lse_t, arg_t = teacher_stats(teacher, block, num_warps) if stats is None else stats
    if lse_t.shape != (rows,) or arg_t.shape != (rows,):
        raise ValueError(f"soft_ce_rows: teacher stats {tuple(lse_t.shape)} and {tuple(arg_t.shape)} must be [{rows}]")
    dz = new_buffer((rows, vocab), z, z.dtype) if out is None else out
    ce = new_buffer((rows,), z, torch.float32)
    hit = new_buffer((rows,), z, torch.float32)
    if rows:
        assert z.stride(1) == teacher.stride(1) == dz.stride(1) == 1, "soft_ce_rows wants unit column stride"
        bv = min(block, triton.next_power_of_2(vocab))
        soft_ce_rows_kernel[(rows,)](z, teacher, lse_t.float().contiguous(), arg_t.contiguous(),
                                     weight.float().contiguous(), dz, ce, hit, vocab, z.stride(0), teacher.stride(0),
                                     dz.stride(0), BV=bv, ONE_BLOCK=bv >= vocab, num_warps=num_warps)
    return dz, ce, hit

"""The TTT loss head without per-step [T, Vd] logits kept for backward: lm_head + soft cross-entropy, fused.

The unfused head (`loss.ttt_loss` over `draft.logits`) keeps, for every one of the K steps, the bf16 logits, their
fp32 log-softmax and a shifted copy of the teacher [B, T, Vd] alive until backward: at Vd = 32000, K = 7 and
T = 16384 that is over 20 GiB. Here one autograd function takes the K normed hidden states and the lm_head
weight, and walks each step's positions in row chunks of at most `max_elems` logits:

    z = h W^T  (in the compute dtype: autocast's, else h's)     teacher logits at t + 1 + k (a view, no copy)
    ce, hit, dz = kernels.soft_ce.soft_ce_rows(z, teacher, w_row)   one Triton kernel (the reference on the CPU;
                                                                     the teacher's row statistics formed once):
        ce = lse(z) - softmax(teacher).z,  dz = w_row (softmax(z) - softmax(teacher)),  written over z
        w_row = step_weight^k valid / n_k   (what backward would get)
    dh = dz W,  dW += dz^T h                 (dW summed in fp32: cuBLAS with an fp32 output on the GPU)

so the gradients are formed in the forward pass (no logits recomputed) and held as [B, T, H] per step plus one
[Vd, H] fp32 buffer; backward scales them by the incoming gradient. Each step's dh is written over that step's
hidden states where their dtype is the compute dtype (the hidden states are read for the last time by then): the
caller's `normed` tensors hold the gradients afterwards, and the head adds no [B, T, H] of its own. Per-step loss,
accuracy (draft argmax == teacher argmax) and counts are the unfused head's, to rounding.

Shapes: B batch, T tokens, H draft hidden, Vd draft vocab, K steps, C rows per chunk.
"""

from __future__ import annotations

import torch

from eagle_trainer.drafts.loss import GlobalCounts, TTTLoss, step_counts, ttt_loss
from eagle_trainer.kernels.soft_ce import soft_ce_rows, soft_ce_rows_reference, teacher_stats

# logits per chunk at most: 2^28 bf16 = 512 MiB, one chunk alive at a time (`_chunk_rows`: two or more a large
# step). The head runs at the end of the unroll, when every step's activations are held, so the chunk adds to the
# step's peak; but each chunk also reads and writes the [Vd, H] fp32 dW once (262 MB at Vd 32000, H 2048; 0.17 ms on
# an H100): at T=8192, 2^26 cost 4% of the step. At Vd 32000: one chunk a step up to T=1024, two up to T=16384, then
# 8192-row chunks.
MAX_ELEMS = 1 << 28
# a step of at most this many logits is one chunk (64 MiB bf16: T <= 1024 at Vd 32000); larger steps at least two
SPLIT_FROM = 1 << 25


def _chunk_rows(rows: int, vocab: int, max_elems: int, split_from: int = SPLIT_FROM) -> int:
    """Rows per logits chunk: balanced chunks of at most `max_elems` logits, and at least two per step above
    `split_from` logits. The head runs at the step's peak, so its chunk adds to it: one chunk would be a whole
    step's logits (250 MiB at T=4096), and two halve that for one more read-modify-write of the fp32 dW per step.
    A small step is one chunk: a dozen host-side ops fewer per step, where a short batch is launch-bound."""
    chunks = max(2 if rows * vocab > split_from else 1, -(-rows * vocab // max_elems))
    return max(1, -(-rows // chunks))


def _accumulate(grad_w: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32) += dz^T h in place, the product summed in fp32 (one cuBLAS call with an fp32 output for bf16 on
    a GPU; written over grad_w, not into a second [Vd, H] fp32 buffer)."""
    if dz.is_cuda and dz.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(grad_w, dz.T, h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.addmm_(dz.T.to(grad_w.dtype), h.to(grad_w.dtype))


def _teacher_stats(teacher):
    """teacher [B, T, Vd] -> its rows' (log-sum-exp, argmax) [B, T] on a GPU, for every step's chunks; None elsewhere."""
    if not teacher.is_cuda:
        return None
    lse, arg = teacher_stats(teacher.view(-1, teacher.shape[-1]))
    return lse.view(teacher.shape[:2]), arg.view(teacher.shape[:2])


def _soft_ce_rows(z, teacher, weight, stats):
    """The kernel on a GPU (dz written over z), the plain-torch reference elsewhere."""
    if z.is_cuda:
        return soft_ce_rows(z, teacher, weight, out=z, stats=stats)
    return soft_ce_rows_reference(z, teacher, weight)


class _FusedTTTCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, teacher, valid, counts, norm, step_weight, max_elems, *hiddens):
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hiddens[0].dtype
        batch, num_tokens, _ = hiddens[0].shape
        rows = _chunk_rows(num_tokens - 1, weight.shape[0], max_elems)
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            acc = torch.promote_types(dtype, torch.float32)  # sums and dW: fp32 (fp64 for fp64 inputs)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            grad_h, stats = [], []
            total = torch.zeros((), dtype=acc, device=weight.device)
            stats_t = _teacher_stats(teacher)  # once: step k reads teacher row t + 1 + k again
            for k, h in enumerate(hiddens):
                scale = step_weight**k / norm[k].clamp_min(1)
                ce_sum, hits = torch.zeros_like(total), torch.zeros_like(total)
                if h.dtype == dtype and h.is_contiguous():  # dh is written over h, each chunk after its last read
                    dh = h
                    dh[:, max(num_tokens - 1 - k, 0):] = 0  # rows past T - 1 - k have no label and no gradient
                else:
                    dh = torch.zeros_like(h)
                for b in range(batch):
                    for t0 in range(0, num_tokens - 1 - k, rows):  # t + 1 + k past the end has no label
                        t1 = min(t0 + rows, num_tokens - 1 - k)
                        hc = h[b, t0:t1].to(dtype)  # [C, H]
                        m = valid[k, b, t0:t1].to(acc)
                        z = hc @ w.T  # [C, Vd]
                        rows_t = slice(t0 + 1 + k, t1 + 1 + k)
                        chunk_stats = None if stats_t is None else (stats_t[0][b, rows_t], stats_t[1][b, rows_t])
                        dz, ce, hit = _soft_ce_rows(z, teacher[b, rows_t], m * scale, chunk_stats)
                        ce_sum += (ce * m).sum()
                        hits += (hit * m).sum()
                        _accumulate(grad_w, dz, hc)  # hc's last read: dh may be written over it now
                        if dh.dtype == dz.dtype:
                            torch.mm(dz, w, out=dh[b, t0:t1])  # no [C, H] temporary
                        else:
                            dh[b, t0:t1] = dz @ w
                        del z, dz  # before the next chunk's logits are allocated
                step_loss = ce_sum / norm[k].clamp_min(1)
                total += step_weight**k * step_loss
                stats.append(torch.stack([step_loss, hits / norm[k].clamp_min(1), counts[k].to(step_loss.dtype)]))
                grad_h.append(dh)
        ctx.save_for_backward(grad_w, *grad_h)
        ctx.weight_dtype, ctx.consumed = weight.dtype, False
        return total, torch.stack(stats)

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        # the gradients formed in forward are scaled in place and handed on: no second copy of K [B, T, H] and
        # the [Vd, H] fp32 buffer at the start of backward (the step's peak is earlier, in this head's forward)
        if ctx.consumed:
            raise RuntimeError("backward through the fused TTT loss head ran twice (retain_graph): its gradients "
                               "were formed in forward and handed on by the first backward")
        ctx.consumed = True
        grad_w, *grad_h = ctx.saved_tensors
        grad_w = grad_w.mul_(grad_total).to(ctx.weight_dtype)
        return (grad_w, None, None, None, None, None, None, *(g.mul_(grad_total.to(g.dtype)) for g in grad_h))


def fused_ttt_loss(normed: list[torch.Tensor], lm_head: torch.Tensor, teacher_logits: torch.Tensor,
                   valid: list[torch.Tensor], step_weight: float, max_elems: int = MAX_ELEMS,
                   global_counts: GlobalCounts | None = None) -> TTTLoss:
    """`loss.ttt_loss` over `lm_head(normed[k])`, without keeping any step's [B, T, Vd] logits.

    normed: K tensors [B, T, H], the draft's final-normed hidden state per step, consumed (their memory holds the
    gradients afterwards; pass copies to keep them; autograd must not have saved them); lm_head [Vd, H];
    teacher_logits [B, T, Vd] (the teacher is their fp32 softmax); valid: K masks [B, T] (`loss.step_valid_mask`);
    global_counts: see `loss.step_counts`."""
    counts, norm = step_counts(valid, global_counts)
    total, stats = _FusedTTTCrossEntropy.apply(lm_head, teacher_logits.contiguous(), torch.stack(valid), counts, norm,
                                               step_weight, max_elems, *normed)
    return TTTLoss(total, stats)


def unfused_ttt_loss(normed: list[torch.Tensor], lm_head: torch.Tensor, teacher_logits: torch.Tensor,
                     valid: list[torch.Tensor], step_weight: float, global_counts: GlobalCounts | None = None) -> TTTLoss:
    """The reference: per-step logits through autograd (`loss.ttt_loss`)."""
    return ttt_loss([h @ lm_head.T for h in normed], teacher_logits.float().softmax(-1), valid, step_weight,
                    global_counts)


__all__ = ["fused_ttt_loss", "unfused_ttt_loss"]

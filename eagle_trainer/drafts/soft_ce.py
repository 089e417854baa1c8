"""The TTT loss head without per-step [T, Vd] logits kept for backward: lm_head + soft cross-entropy, fused.

The unfused head (`ttt.ttt_loss` over `draft.logits`) keeps, for every one of the K steps, the bf16 logits, their
fp32 log-softmax and a shifted copy of the teacher [B, T, Vd] alive until backward: at Vd = 32000, K = 7 and
T = 16384 that is over 20 GiB. Here one autograd function takes the K normed hidden states and the lm_head
weight, and walks each step's positions in row chunks of at most `max_elems` logits:

    z = h W^T (rounded to W's dtype, then fp32, as the unfused head)     p = teacher[t + 1 + k] (a view, no copy)
    ce = sum(p) lse(z) - p.z                                                 the soft cross-entropy per row
    dz = w_row (softmax(z) sum(p) - p),  w_row = step_weight^k valid / n_k   (what backward would get)
    dh = dz W,  dW += dz^T h                                                 (dz in W's dtype, dW summed in fp32)

so the gradients are formed in the forward pass (no logits recomputed) and held as [B, T, H] per step plus one
[Vd, H] fp32 buffer; backward scales them by the incoming gradient. Per-step loss, accuracy (draft argmax ==
teacher argmax) and counts are the unfused head's, to fp32 rounding.

Shapes: B batch, T tokens, H draft hidden, Vd draft vocab, K steps, C rows per chunk.
"""

from __future__ import annotations

import torch

from eagle_trainer.drafts.ttt import TTTLoss, ttt_loss

MAX_ELEMS = 1 << 26  # logits per chunk: 2^26 fp32 = 256 MiB, a few of them live at once


class _FusedTTTCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, teacher, valid, step_weight, max_elems, *hiddens):
        batch, num_tokens, _ = hiddens[0].shape
        rows = max(1, max_elems // weight.shape[0])
        teacher_top = teacher.argmax(-1)  # [B, T]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_h, stats = [], []
        total = teacher.new_zeros(())
        for k, h in enumerate(hiddens):
            count = valid[k].sum()
            scale = step_weight**k / count.clamp_min(1)
            ce_sum, hits = teacher.new_zeros(()), teacher.new_zeros(())
            dh = torch.zeros_like(h)
            for b in range(batch):
                for t0 in range(0, num_tokens - 1 - k, rows):  # t + 1 + k past the end has no label
                    t1 = min(t0 + rows, num_tokens - 1 - k)
                    hc = h[b, t0:t1]  # [C, H]
                    z = (hc @ weight.T).float()  # [C, Vd]
                    p = teacher[b, t0 + 1 + k:t1 + 1 + k]
                    m = valid[k, b, t0:t1].to(z.dtype)
                    lse = z.logsumexp(-1)
                    psum = p.sum(-1)
                    ce_sum = ce_sum + ((psum * lse - (p * z).sum(-1)) * m).sum()
                    hits = hits + ((z.argmax(-1) == teacher_top[b, t0 + 1 + k:t1 + 1 + k]).to(z.dtype) * m).sum()
                    dz = torch.exp(z - lse[:, None]).mul_(psum[:, None]).sub_(p).mul_((m * scale)[:, None])
                    dz = dz.to(weight.dtype)
                    dh[b, t0:t1] = dz @ weight
                    grad_w += (dz.T @ hc).float()
            step_loss = ce_sum / count.clamp_min(1)
            total = total + step_weight**k * step_loss
            stats.append(torch.stack([step_loss, hits / count.clamp_min(1), count.to(step_loss.dtype)]))
            grad_h.append(dh)
        ctx.save_for_backward(grad_w, *grad_h)
        ctx.weight_dtype = weight.dtype
        return total, torch.stack(stats)

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        grad_w, *grad_h = ctx.saved_tensors
        scaled_w = (grad_w * grad_total).to(ctx.weight_dtype)
        return (scaled_w, None, None, None, None, *(g * grad_total.to(g.dtype) for g in grad_h))


def fused_ttt_loss(normed: list[torch.Tensor], lm_head: torch.Tensor, teacher_probs: torch.Tensor,
                   valid: list[torch.Tensor], step_weight: float, max_elems: int = MAX_ELEMS) -> TTTLoss:
    """`ttt.ttt_loss` over `lm_head(normed[k])`, without keeping any step's [B, T, Vd] logits.

    normed: K tensors [B, T, H], the draft's final-normed hidden state per step; lm_head [Vd, H];
    teacher_probs [B, T, Vd] fp32; valid: K masks [B, T] (`ttt.step_valid_mask`)."""
    total, stats = _FusedTTTCrossEntropy.apply(lm_head, teacher_probs, torch.stack(valid), step_weight, max_elems,
                                               *normed)
    losses, accs, counts = stats.T.tolist()
    return TTTLoss(total, losses, accs, [int(c) for c in counts])


def unfused_ttt_loss(normed: list[torch.Tensor], lm_head: torch.Tensor, teacher_probs: torch.Tensor,
                     valid: list[torch.Tensor], step_weight: float) -> TTTLoss:
    """The reference: per-step logits through autograd (`ttt.ttt_loss`)."""
    return ttt_loss([h @ lm_head.T for h in normed], teacher_probs, valid, step_weight)


__all__ = ["fused_ttt_loss", "unfused_ttt_loss"]

"""Training-time test (TTT): the K-step unroll of the EAGLE-3 draft, as DESIGN section 4 fixes it.

At step k = 0..K-1, position t holds the chain that starts after target prefix t:
    input token x[t+1+k], hidden = step k-1 output at t (step 0: g0[t]), RoPE position t + k,
    label = target distribution at position t+1+k (it predicts token t+2+k).
Attention at step k, position t: the step-0 keys/values at positions <= t (causal) plus the step-j
keys/values at position t for j = 1..k. That is what a serving engine computes when it drafts k+1
tokens after prefix t with a KV cache; tests/drafts/test_ttt.py checks it against `DraftKVCache`.

Two attention paths compute the same function:
- `naive`: scores against all step-0 keys [B, nh, T, T] plus k diagonal scores; the reference.
- `flex`:  one flex_attention call over keys cat(K0, K1..Kk) with a block mask (causal block + k diagonal
           blocks); compiled on the GPU it never holds [T, T], so memory is O(T).

Shapes: B batch, T tokens, H hidden, nh/nkv heads, D head dim, Vd draft vocab, K steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eagle_trainer.drafts.eagle3 import Eagle3Draft


def shift_left(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x[:, t] <- x[:, t + n] along dim 1, padding the last n positions with `fill`."""
    if n == 0:
        return x
    kept = x[:, n:]
    pad = x.new_full((x.shape[0], x.shape[1] - kept.shape[1], *x.shape[2:]), fill)
    return torch.cat([kept, pad], dim=1)


def naive_ttt_attention(q, k0, v0, diag_k: list, diag_v: list) -> torch.Tensor:
    """q [B, nh, T, D]; k0/v0 [B, nkv, T, D]; diag_k/v: k tensors like k0. -> [B, nh, T, D]."""
    rep = q.shape[1] // k0.shape[1]
    k0, v0 = k0.repeat_interleave(rep, 1), v0.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5
    t = q.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k0.transpose(-1, -2)).to(acc) * scale  # [B, nh, T, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    diag = [((q * kj.repeat_interleave(rep, 1)).sum(-1, keepdim=True)).to(acc) * scale for kj in diag_k]
    probs = torch.cat([scores, *diag], dim=-1).softmax(-1).to(q.dtype)  # [B, nh, T, T + k]
    out = probs[..., :t] @ v0
    for j, vj in enumerate(diag_v):
        out = out + probs[..., t + j:t + j + 1] * vj.repeat_interleave(rep, 1)
    return out


@functools.lru_cache(maxsize=64)
def _ttt_block_mask(num_prev: int, t: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        block, pos = kv_idx // t, kv_idx % t
        return ((block == 0) & (pos <= q_idx)) | ((block > 0) & (pos == q_idx))

    return create_block_mask(mask_mod, None, None, t, (num_prev + 1) * t, device=device)


@functools.cache
def _flex(device_type: str):
    """flex_attention compiled for CUDA (the O(T) kernel); eager elsewhere (a reference, forward only)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def flex_ttt_attention(q, k0, v0, diag_k: list, diag_v: list) -> torch.Tensor:
    """Same function as `naive_ttt_attention`, with O(T) memory when compiled (GPU)."""
    t = q.shape[2]
    keys = torch.cat([k0, *diag_k], dim=2)  # [B, nkv, (k+1)T, D]
    values = torch.cat([v0, *diag_v], dim=2)
    mask = _ttt_block_mask(len(diag_k), t, str(q.device))
    return _flex(q.device.type)(q, keys, values, block_mask=mask, enable_gqa=True)


ATTENTION = {"naive": naive_ttt_attention, "flex": flex_ttt_attention}


def pick_attention(name: str, device: torch.device) -> str:
    if name == "auto":
        return "flex" if device.type == "cuda" else "naive"
    if name not in ATTENTION:
        raise ValueError(f"draft.attention={name!r} is not one of auto, {', '.join(ATTENTION)}")
    return name


def ttt_logits(draft: Eagle3Draft, input_ids: torch.Tensor, aux_hidden: torch.Tensor, num_steps: int,
               attention: str = "naive") -> list[torch.Tensor]:
    """Unroll the draft K steps over every position at once. Returns K tensors [B, T, Vd]."""
    attend = ATTENTION[attention]
    b, t = input_ids.shape
    base_pos = torch.arange(t, device=input_ids.device).expand(b, t)
    hidden = draft.project(aux_hidden)  # g0 [B, T, H]
    k0 = v0 = None
    diag_k, diag_v, out = [], [], []
    for k in range(num_steps):
        tokens = shift_left(input_ids, 1 + k)  # x[t+1+k]
        q, kk, vv = draft.step_qkv(tokens, hidden, base_pos + k)
        if k == 0:
            k0, v0 = kk, vv
        else:
            diag_k.append(kk)
            diag_v.append(vv)
        hidden = draft.step_out(hidden, attend(q, k0, v0, diag_k, diag_v))
        out.append(draft.logits(hidden))
    return out


@dataclass
class TTTLoss:
    loss: torch.Tensor  # scalar, weighted over steps
    step_loss: list[float]
    step_acc: list[float]
    step_count: list[int]


def step_valid_mask(loss_mask: torch.Tensor, attention_mask: torch.Tensor, teacher_valid: torch.Tensor,
                    num_steps: int) -> list[torch.Tensor]:
    """valid[k][b, t]: step k at t predicts token t+2+k, which must exist and be an assistant token,
    and the label position t+1+k must have a usable teacher. Positions past the end are masked."""
    predicts_loss_token = shift_left(loss_mask & attention_mask, 1, fill=False)  # at p: token p+1 is a loss token
    label_ok = predicts_loss_token & teacher_valid
    return [shift_left(label_ok, 1 + k, fill=False) for k in range(num_steps)]


def ttt_loss(step_logits: list[torch.Tensor], teacher_probs: torch.Tensor, valid: list[torch.Tensor],
             step_weight: float) -> TTTLoss:
    """Soft cross-entropy against the teacher per step; step k weighs step_weight**k; each step's loss is
    normalised over its valid tokens. Accuracy: draft argmax == teacher argmax."""
    total = teacher_probs.new_zeros(())
    losses, accs, counts = [], [], []
    teacher_top = teacher_probs.argmax(-1)
    for k, logits in enumerate(step_logits):
        labels = shift_left(teacher_probs, 1 + k)  # [B, T, Vd]: target distribution at t+1+k
        mask = valid[k].float()
        n = mask.sum()
        ce = -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # [B, T]
        step = (ce * mask).sum() / n.clamp_min(1)
        total = total + step_weight**k * step
        with torch.no_grad():
            hit = (logits.argmax(-1) == shift_left(teacher_top, 1 + k)).float()
            losses.append(step.item())
            accs.append(((hit * mask).sum() / n.clamp_min(1)).item())
            counts.append(int(n.item()))
    return TTTLoss(total, losses, accs, counts)


def simulated_acceptance(step_acc: list[float]) -> float:
    """Expected tokens per target forward with a K-token chain: 1 + sum_k prod_{j<=k} acc_j.

    acc_j is measured with ground-truth inputs, so this is the usual optimistic proxy; evaluate/ measures
    the real thing."""
    tau, run = 1.0, 1.0
    for acc in step_acc:
        run *= acc
        tau += run
    return tau

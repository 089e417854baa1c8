"""Training-time test (TTT): the K-step unroll of the EAGLE-3 draft, as DESIGN section 4 fixes it.

At step k = 0..K-1, position t holds the chain that starts after target prefix t:
    input token x[t+1+k], hidden = step k-1 output at t (step 0: g0[t]), RoPE position t + k,
    label = target distribution at position t+1+k (it predicts token t+2+k).
Attention at step k, position t: the step-0 keys/values at positions <= t (causal) plus the step-j
keys/values at position t for j = 1..k. That is what a serving engine computes when it drafts k+1
tokens after prefix t with a KV cache; tests/drafts/test_ttt.py checks it against `DraftKVCache`.

Two attention paths compute the same function:
- `naive`: scores against all step-0 keys [B, nh, T, T] plus k diagonal scores; the reference.
- `flex`:  a causal flex_attention over the step-0 block (compiled on the GPU: never holds [T, T]) that
           returns its log-sum-exp, merged with the k diagonal terms; memory is O(T).

Packed batches (data.pack: documents back to back in one row, `documents` [1, N] gives each token's document):
the RoPE position of t at step k is position_ids[t] + k (its place in its own document), the step-0 block is
causal AND same-document (both paths), and step k at t counts only if t+2+k, the token it predicts, is in t's
document (`step_valid_mask`), so no input token, key or label crosses a document boundary. The diagonal
step-j terms are per position and need nothing more.

Shapes: B batch, T tokens (N packed), H hidden, nh/nkv heads, D head dim, Vd draft vocab, K steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

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


def naive_ttt_attention(q, k0, v0, diag_k: list, diag_v: list, documents: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, nh, T, D]; k0/v0 [B, nkv, T, D]; diag_k/v: k tensors like k0; documents [B, T] (packed) or None.
    -> [B, nh, T, D]."""
    rep = q.shape[1] // k0.shape[1]
    k0, v0 = k0.repeat_interleave(rep, 1), v0.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5
    t = q.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k0.transpose(-1, -2)).to(acc) * scale  # [B, nh, T, T]
    allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()  # [T, T] causal
    if documents is not None:
        allowed = allowed & (documents[:, :, None] == documents[:, None, :])[:, None]  # [B, 1, T, T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    diag = [((q * kj.repeat_interleave(rep, 1)).sum(-1, keepdim=True)).to(acc) * scale for kj in diag_k]
    probs = torch.cat([scores, *diag], dim=-1).softmax(-1).to(q.dtype)  # [B, nh, T, T + k]
    out = probs[..., :t] @ v0
    for j, vj in enumerate(diag_v):
        out = out + probs[..., t + j:t + j + 1] * vj.repeat_interleave(rep, 1)
    return out


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@functools.lru_cache(maxsize=64)
def _causal_block_mask(t: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(_causal, None, None, t, t, device=device)


def _document_block_mask(documents: torch.Tensor):
    """Causal and same-document, for documents [B, T]: built per batch (compiled on the GPU, so the mask is
    evaluated block by block and never held as [T, T])."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (documents[b, q_idx] == documents[b, kv_idx])

    b, t = documents.shape
    return create_block_mask(causal_same_document, b, None, t, t, device=documents.device,
                             _compile=documents.device.type == "cuda")


@functools.cache
def _flex(device_type: str):
    """flex_attention compiled for CUDA (the fused O(T) kernel); eager elsewhere (a reference, forward only)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def flex_ttt_attention(q, k0, v0, diag_k: list, diag_v: list, documents: torch.Tensor | None = None,
                       block_mask=None) -> torch.Tensor:
    """Same function as `naive_ttt_attention` in O(T) memory: a causal (and, with `documents`, same-document)
    flex_attention over the step-0 block returns its output and log-sum-exp, and the k diagonal terms are merged
    in through the log-sum-exp. The flex call has the same shapes at every step, so it compiles once per
    sequence length. `block_mask`: the step-0 mask built once per batch by the caller (else built here)."""
    b, nh, t, d = q.shape
    nkv = k0.shape[1]
    if block_mask is None:
        block_mask = _causal_block_mask(t, str(q.device)) if documents is None else _document_block_mask(documents)
    out0, lse0 = _flex(q.device.type)(q, k0, v0, block_mask=block_mask, enable_gqa=True,
                                       return_lse=True)  # [B, nh, T, D], [B, nh, T]
    if not diag_k:
        return out0
    qg = q.view(b, nkv, nh // nkv, t, d)  # query heads grouped by their kv head
    scale = d**-0.5
    diag = [(qg * kj[:, :, None]).sum(-1).view(b, nh, t).float() * scale for kj in diag_k]  # k x [B, nh, T]
    lse = torch.logsumexp(torch.stack([lse0.float(), *diag]), dim=0)  # [B, nh, T]
    out = out0.float() * (lse0.float() - lse).exp()[..., None]
    for sj, vj in zip(diag, diag_v):
        wj = (sj - lse).exp().view(b, nkv, nh // nkv, t, 1)
        out = out + (wj * vj[:, :, None].float()).view(b, nh, t, d)
    return out.to(q.dtype)


ATTENTION = {"naive": naive_ttt_attention, "flex": flex_ttt_attention}


def pick_attention(name: str, device: torch.device) -> str:
    if name == "auto":
        return "flex" if device.type == "cuda" else "naive"
    if name not in ATTENTION:
        raise ValueError(f"draft.attention={name!r} is not one of auto, {', '.join(ATTENTION)}")
    return name


def step0_attention(attention: str, documents: torch.Tensor | None):
    """The attention function of one unroll: `ATTENTION[attention]` with the documents (and, for flex, the step-0
    block mask, built once for all K steps and every layer) bound."""
    attend = ATTENTION[attention]
    if documents is None:
        return attend
    if attention == "flex":
        return functools.partial(attend, documents=documents, block_mask=_document_block_mask(documents))
    return functools.partial(attend, documents=documents)


def ttt_logits(draft: Eagle3Draft, input_ids: torch.Tensor, aux_hidden: torch.Tensor, num_steps: int,
               attention: str = "naive", position_ids: torch.Tensor | None = None,
               documents: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Unroll the draft K steps over every position at once. Returns K tensors [B, T, Vd]."""
    normed = ttt_hidden(draft, input_ids, aux_hidden, num_steps, attention, position_ids, documents)
    return [draft.lm_head(h) for h in normed]


def ttt_hidden(draft: Eagle3Draft, input_ids: torch.Tensor, aux_hidden: torch.Tensor, num_steps: int,
               attention: str = "naive", position_ids: torch.Tensor | None = None,
               documents: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Unroll the draft K steps over every position at once. Returns K final-normed hidden states [B, T, H]
    (the lm_head's input; `soft_ce.fused_ttt_loss` takes them without forming the logits).
    Packed batches pass position_ids [B, T] (position in the document) and documents [B, T] (document ids)."""
    attend = step0_attention(attention, documents)
    b, t = input_ids.shape
    base_pos = torch.arange(t, device=input_ids.device).expand(b, t) if position_ids is None else position_ids
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
        out.append(draft.norm(hidden))
    return out


@dataclass
class TTTLoss:
    loss: torch.Tensor  # scalar, weighted over steps
    step_loss: list[float]
    step_acc: list[float]
    step_count: list[int]
    extra: dict = field(default_factory=dict)  # further per-step metrics to log (e.g. EAGLE-1 feature_loss)


def step_valid_mask(loss_mask: torch.Tensor, attention_mask: torch.Tensor, teacher_valid: torch.Tensor,
                    num_steps: int, documents: torch.Tensor | None = None) -> list[torch.Tensor]:
    """valid[k][b, t]: step k at t predicts token t+2+k, which must exist and be an assistant token,
    and the label position t+1+k must have a usable teacher. Positions past the end are masked.
    Packed (documents [B, T]): token t+2+k must also be in t's document (so are its input tokens and label)."""
    predicts_loss_token = shift_left(loss_mask & attention_mask, 1, fill=False)  # at p: token p+1 is a loss token
    label_ok = predicts_loss_token & teacher_valid
    valid = [shift_left(label_ok, 1 + k, fill=False) for k in range(num_steps)]
    if documents is not None:
        valid = [v & (documents == shift_left(documents, 2 + k, fill=-1)) for k, v in enumerate(valid)]
    return valid


def ttt_loss(step_logits: list[torch.Tensor], teacher_probs: torch.Tensor, valid: list[torch.Tensor],
             step_weight: float) -> TTTLoss:
    """Soft cross-entropy against the teacher per step; step k weighs step_weight**k; each step's loss is
    normalised over its valid tokens. Accuracy: draft argmax == teacher argmax."""
    total = teacher_probs.new_zeros(())
    stats = []  # per step: loss, accuracy, count (kept on device; one host sync at the end)
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
            stats.append(torch.stack([step.detach(), (hit * mask).sum() / n.clamp_min(1), n]))
    losses, accs, counts = torch.stack(stats).T.tolist()
    return TTTLoss(total, losses, accs, [int(c) for c in counts])


def simulated_acceptance(step_acc: list[float]) -> float:
    """Expected tokens per target forward with a K-token chain: 1 + sum_k prod_{j<=k} acc_j.

    acc_j is measured with ground-truth inputs, so this is the usual optimistic proxy; evaluate/ measures
    the real thing."""
    tau, run = 1.0, 1.0
    for acc in step_acc:
        run *= acc
        tau += run
    return tau

"""Training-time test (TTT): the K-step unroll of the EAGLE-3 draft, as DESIGN section 4 fixes it.

At step k = 0..K-1, position t holds the chain that starts after target prefix t:
    input token x[t+1+k], hidden = step k-1 output at t (step 0: g0[t]), RoPE position t + k,
    label = target distribution at position t+1+k (it predicts token t+2+k).
Attention at step k, position t: the step-0 keys/values at positions <= t (causal) plus the step-j
keys/values at position t for j = 1..k. That is what a serving engine computes when it drafts k+1
tokens after prefix t with a KV cache; tests/drafts/test_ttt.py checks it against `DraftKVCache`.

Three attention paths compute the same function:
- `naive`: scores against all step-0 keys [B, nh, T, T] plus k diagonal scores; the reference.
- `flex`:  a causal flex_attention over the step-0 block (compiled on the GPU: never holds [T, T]) that
           returns its log-sum-exp, merged with the k diagonal terms in torch; memory is O(T).
- `fused`: the step-0 block through cuDNN's attention (FlashAttention-2 varlen for packed rows) with its
           log-sum-exp, the diagonal terms merged by Triton kernels, and a backward that hands the library the
           merged output and log-sum-exp (kernels/ttt_attention); O(T) memory, the default on a GPU.

Packed batches (data.pack: documents back to back in one row, `documents` [1, N] gives each token's document):
the RoPE position of t at step k is position_ids[t] + k (its place in its own document), the step-0 block is
causal AND same-document (both paths), and step k at t counts only if t+2+k, the token it predicts, is in t's
document (`step_valid_mask`), so no input token, key or label crosses a document boundary. The diagonal
step-j terms are per position and need nothing more.

Shapes: B batch, T tokens (N packed), H hidden, nh/nkv heads, D head dim, Vd draft vocab, K steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from eagle_trainer.drafts.eagle3 import Eagle3Draft
from eagle_trainer.drafts.layers import rms_norm, rotary_cos_sin, rotate
from eagle_trainer.kernels.ttt_attention import DiagonalStore, step0_kernel, ttt_attention
from eagle_trainer.types import HostCopy


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


def fused_ttt_attention(q, k0, v0, diag_k: list, diag_v: list, documents: torch.Tensor | None = None,
                        step0=None, store: DiagonalStore | None = None) -> torch.Tensor:
    """Same function again, with a library attention kernel for the step-0 block (cuDNN, or FlashAttention-2 varlen
    for packed rows; kernels/ttt_attention) and Triton kernels merging the diagonal terms, forward and backward.
    `step0`: `step0_kernel(device, documents)` and `store`: a `DiagonalStore`, both built once per unroll. fp32 on a
    GPU (no library kernel takes it) goes to the flex path."""
    if q.device.type == "cuda" and q.dtype == torch.float32:
        return flex_ttt_attention(q, k0, v0, diag_k, diag_v, documents)
    return ttt_attention(q, k0, v0, diag_k, diag_v, step0=step0 or step0_kernel(q.device, documents), store=store)


ATTENTION = {"naive": naive_ttt_attention, "flex": flex_ttt_attention, "fused": fused_ttt_attention}


def pick_attention(name: str, device: torch.device) -> str:
    if name == "auto":
        return "fused" if device.type == "cuda" else "naive"
    if name not in ATTENTION:
        raise ValueError(f"draft.attention={name!r} is not one of auto, {', '.join(ATTENTION)}")
    return name


def step0_attention(attention: str, documents: torch.Tensor | None, device: torch.device, num_steps: int = 0):
    """The attention function of one unroll: `ATTENTION[attention]` with what its step-0 block needs built once for
    all K steps and bound: the documents; flex's block mask; the fused path's step-0 kernel and, given the unroll's
    `num_steps`, the store its diagonal keys/values go into."""
    attend = ATTENTION[attention]
    if attention == "fused":
        store = DiagonalStore(num_steps - 1) if num_steps > 1 else None
        return functools.partial(attend, documents=documents, step0=step0_kernel(device, documents), store=store)
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
               documents: torch.Tensor | None = None, recompute: bool = True) -> list[torch.Tensor]:
    """Unroll the draft K steps over every position at once. Returns K final-normed hidden states [B, T, H]
    (the lm_head's input; `soft_ce.fused_ttt_loss` takes them without forming the logits).
    Packed batches pass position_ids [B, T] (position in the document) and documents [B, T] (document ids).

    The same function as K calls of `draft.step_qkv` / `step_out` (tests/drafts/test_ttt.py checks it against the
    KV-cached decoder), arranged for training: the weights are cast once (`draft.unroll_weights`); the q/k/v rows
    over the token half of the layer input, input_layernorm(embed(x[t+1+k])) W^T, are computed once for x[t+1] and
    read k rows on at step k (K-1 fewer products over that half, forward and backward); on a GPU the step's pieces
    around the attention and the matrix products are compiled (fused norms, rotary, SwiGLU, residuals); with
    `recompute` (draft.recompute) they run under `keep_products`, backward forming their elementwise work again."""
    attend = step0_attention(attention, documents, input_ids.device, num_steps)
    cfg, device = draft.config, input_ids.device.type
    b, t = input_ids.shape
    base_pos = torch.arange(t, device=input_ids.device).expand(b, t) if position_ids is None else position_ids
    w = draft.unroll_weights()
    eps, inv_freq = cfg.rms_norm_eps, draft.rotary.inv_freq
    hidden = draft.project(aux_hidden).to(w.dtype)  # g0 [B, T, H]
    # x[t+1] for t < T + K - 1 (token 0 past the end, as shift_left pads): step k reads rows k .. k + T - 1
    ids = torch.cat([input_ids[:, 1:], input_ids.new_zeros(b, num_steps)], dim=1)
    tokens = draft.embed_tokens(ids).to(w.dtype)
    token_qkv_fn, step_qkv, step_out = (_compiled(fn, device, recompute) for fn in (_token_qkv, _step_qkv, _step_out))
    token_qkv = token_qkv_fn(tokens, w.input_norm, w.qkv_token, eps)  # [B, T+K-1, (nh+2nkv) D]
    token_rows = row_windows(token_qkv, t, num_steps)  # step k reads rows k .. k + T - 1
    # RoPE at positions t + k for every step, once, in the compute dtype ([K, B, T, 1, D], the q/k layout): formed in
    # the compiled step, the sines and cosines of every element were evaluated again in backward
    steps = torch.arange(num_steps, device=input_ids.device)[:, None, None]
    cos, sin = (x.to(w.dtype)[:, :, :, None] for x in rotary_cos_sin(base_pos + steps, inv_freq))
    k0 = v0 = None
    diag_k, diag_v, out = [], [], []
    for k in range(num_steps):
        q, kk, vv = (x.transpose(1, 2) for x in step_qkv(  # [B, n, T, D] views
            hidden, token_rows[k], cos[k], sin[k], w.hidden_norm, w.qkv_hidden, eps, cfg.num_heads,
            cfg.num_kv_heads))
        if k == 0:
            k0, v0 = kk, vv
        else:
            diag_k.append(kk)
            diag_v.append(vv)
        hidden, normed = step_out(hidden, attend(q, k0, v0, diag_k, diag_v), w.o, w.post_norm, w.gate_up, w.down,
                                  w.final_norm, eps)
        out.append(normed)
    return out


class _WindowSum:
    """The gradient of one tensor read through K row windows, summed in place as their backward passes arrive."""

    def __init__(self, count: int):
        self.left, self.grad = count, None


class _Window(torch.autograd.Function):
    """x[:, start:start + length] (a view) whose backward adds its gradient into the shared `_WindowSum` and hands
    the sum to x with the last window: autograd would form a zero-padded copy of x per window (slice backward) and
    add those up."""

    @staticmethod
    def forward(ctx, x, start: int, length: int, total: _WindowSum):
        ctx.start, ctx.total = start, total
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        return x[:, start:start + length]

    @staticmethod
    def backward(ctx, grad):
        total, start = ctx.total, ctx.start
        if total.left <= 0:
            raise RuntimeError("backward through the TTT token q/k/v windows ran twice (retain_graph): their "
                               "gradient sum was handed on by the first")
        if total.grad is None:
            total.grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        total.grad[:, start:start + grad.shape[1]] += grad
        total.left -= 1
        if total.left:
            return None, None, None, None
        out, total.grad = total.grad, None
        return out, None, None, None


def row_windows(x: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """x[:, k:k + length] for k < count, as views whose gradients are summed into one tensor like x."""
    total = _WindowSum(count)
    return [_Window.apply(x, k, length, total) for k in range(count)]


def _token_qkv(tokens, norm_weight, weight, eps):
    """input_layernorm(embed(x)) W_token^T: the q/k/v rows over the token half of the layer input."""
    return rms_norm(tokens, norm_weight, eps) @ weight.T


def _step_qkv(hidden, token_qkv, cos, sin, norm_weight, weight, eps, num_heads: int, num_kv_heads: int):
    """Eagle3Draft.step_qkv with the token half precomputed -> q [B, T, nh, D], k/v [B, T, nkv, D] (RoPE'd q, k by
    cos/sin [B, T, 1, D]; written token-major: the caller's transposes to [B, n, T, D] are views, as the attention
    kernels read them).
    v is a copy, not a view of the [B, T, (nh + 2 nkv) D] product: attention keeps v until backward, and a view would
    keep the whole product alive with it (10x v's bytes at Qwen3-30B-A3B draft widths)."""
    b, t, _ = hidden.shape
    d = cos.shape[-1]
    qkv = rms_norm(hidden, norm_weight, eps) @ weight.T + token_qkv
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    return (rotate(q.view(b, t, num_heads, d), cos, sin), rotate(k.view(b, t, num_kv_heads, d), cos, sin),
            v.reshape(b, t, num_kv_heads, d).contiguous())


def _step_out(hidden, attn, o_weight, post_norm, gate_up, down, final_norm, eps):
    """Eagle3Draft.step_out, then the final norm -> (g_next [B, T, H], norm(g_next)). The residual sums are the
    products' addmm inputs: under `keep_products` the kept products are then h and g_next themselves (g_next is kept
    anyway, as the next step's input), not [T, H] terms beside them."""
    b, nh, t, d = attn.shape
    width = hidden.shape[-1]
    h = torch.addmm(hidden.reshape(b * t, width), attn.transpose(1, 2).reshape(b * t, nh * d), o_weight.T)
    gate, up = (rms_norm(h, post_norm, eps) @ gate_up.T).chunk(2, dim=-1)
    g_next = torch.addmm(h, F.silu(gate) * up, down.T).view(b, t, width)
    return g_next, rms_norm(g_next, final_norm, eps)


_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def _save_products(ctx, op, *args, **kwargs):
    # elementwise work is always formed again (MUST_RECOMPUTE; PREFER_RECOMPUTE measured the same memory at T=4096)
    return CheckpointPolicy.MUST_SAVE if op in _PRODUCTS else CheckpointPolicy.MUST_RECOMPUTE


def keep_products(fn):
    """fn under selective activation checkpointing: backward keeps fn's inputs and the matrix products it needs, and
    forms the elementwise work again (norms, rotary, SwiGLU's silu(gate) * up, residual sums): each step would
    otherwise keep, next to the products, normed copies of its hidden states and the [T, I] SwiGLU product
    (1.1 GiB of a T=8192 step at Qwen3-30B-A3B draft widths), for one more pass over them in backward."""
    context = functools.partial(create_selective_checkpoint_contexts, _save_products)

    def selective(*args):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=context)
    # A code object of its own per fn: torch.compile caches by code object, so wrappers sharing one would be
    # recompiles of one frame, and the second would mark every dimension that differs between them dynamic (the
    # weights' widths too): Inductor then emits kernels with symbolic strides, 2-3x slower on an H100.
    selective.__code__ = selective.__code__.replace(co_name=f"{fn.__name__}_keep_products")
    return functools.wraps(fn)(selective)


@functools.cache
def _compiled(fn, device_type: str, recompute: bool = True):
    """fn (under `keep_products` with `recompute`) compiled for CUDA (fused elementwise work, in forward and where
    backward forms it again); eager elsewhere."""
    fn = keep_products(fn) if recompute else fn
    return torch.compile(fn) if device_type == "cuda" else fn


@dataclass
class TTTLoss:
    """A batch's TTT loss and per-step metrics. They stay on the device until `start_host_copy` or a first read
    (one host copy of all of them); the trainer queues the copy before backward and reads it after queuing backward,
    so the read waits for the forward pass alone."""

    loss: torch.Tensor  # scalar, weighted over steps
    stats: torch.Tensor  # [K, 3 + len(extra_names)]: per step the loss, accuracy, valid count, then extra columns
    extra_names: tuple[str, ...] = ()  # further per-step metrics to log (e.g. EAGLE-1 feature_loss)
    # applied to [loss, stats] before they are copied to the host: under data parallelism their sum over ranks
    # (each rank's loss and per-step metrics are its part of the global batch's, see GlobalCounts)
    reduce_metrics: Callable[[torch.Tensor], torch.Tensor] | None = None

    def start_host_copy(self) -> None:
        """Queue the copy of the loss and the metrics to the host now, without waiting. Called before backward is
        queued, a later read waits for the forward pass alone: a read (`.item()`) queued behind backward waits for
        all of it, and the GPU then idles while the host queues the optimizer step and the next batch."""
        self._copy  # noqa: B018 (the cached property queues the copy)

    @functools.cached_property
    def _copy(self) -> HostCopy:
        values = torch.cat([self.loss.detach().reshape(1).to(self.stats.dtype), self.stats.detach().flatten()])
        return HostCopy(values if self.reduce_metrics is None else self.reduce_metrics(values))

    @functools.cached_property
    def _values(self) -> list[float]:
        return self._copy.tolist()

    @property
    def host_loss(self) -> float:
        """The loss as a float (from the copy `start_host_copy` queued, else queued now)."""
        return self._values[0]

    @functools.cached_property
    def _host(self) -> list[list[float]]:
        return torch.tensor(self._values[1:], dtype=torch.float64).view(self.stats.shape).T.tolist()  # exact floats

    @property
    def step_loss(self) -> list[float]:
        return self._host[0]

    @property
    def step_acc(self) -> list[float]:
        return self._host[1]

    @property
    def step_count(self) -> list[int]:
        return [int(c) for c in self._host[2]]

    @property
    def extra(self) -> dict[str, list[float]]:
        return dict(zip(self.extra_names, self._host[3:], strict=True))


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


# (this rank's valid tokens per TTT step [K]) -> the counts each step's loss is normalised by: the identity on one
# process; under data parallelism their sum over ranks, so that the ranks' losses add up to the loss of the global
# batch (the trainer scales the backward by the world size, as DDP averages the gradients)
GlobalCounts = Callable[[torch.Tensor], torch.Tensor]


def step_counts(valid: list[torch.Tensor], global_counts: GlobalCounts | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's valid tokens per step [K] int64, the counts the step losses are normalised by)."""
    counts = torch.stack([v.sum() for v in valid])
    return counts, counts if global_counts is None else global_counts(counts)


def ttt_loss(step_logits: list[torch.Tensor], teacher_probs: torch.Tensor, valid: list[torch.Tensor],
             step_weight: float, global_counts: GlobalCounts | None = None) -> TTTLoss:
    """Soft cross-entropy against the teacher per step; step k weighs step_weight**k; each step's loss is
    normalised over its valid tokens (all ranks', see GlobalCounts). Accuracy: draft argmax == teacher argmax."""
    counts, norm = step_counts(valid, global_counts)
    total = teacher_probs.new_zeros(())
    stats = []  # per step: loss, accuracy, count (kept on device; one host sync at the end)
    teacher_top = teacher_probs.argmax(-1)
    for k, logits in enumerate(step_logits):
        labels = shift_left(teacher_probs, 1 + k)  # [B, T, Vd]: target distribution at t+1+k
        mask = valid[k].float()
        n = norm[k].float().clamp_min(1)
        ce = -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # [B, T]
        step = (ce * mask).sum() / n
        total = total + step_weight**k * step
        with torch.no_grad():
            hit = (logits.argmax(-1) == shift_left(teacher_top, 1 + k)).float()
            stats.append(torch.stack([step.detach(), (hit * mask).sum() / n, counts[k].float()]))
    return TTTLoss(total, torch.stack(stats))


def simulated_acceptance(step_acc: list[float]) -> float:
    """Expected tokens per target forward with a K-token chain: 1 + sum_k prod_{j<=k} acc_j.

    acc_j is measured with ground-truth inputs, so this is the usual optimistic proxy; evaluate/ measures
    the real thing."""
    tau, run = 1.0, 1.0
    for acc in step_acc:
        run *= acc
        tau += run
    return tau

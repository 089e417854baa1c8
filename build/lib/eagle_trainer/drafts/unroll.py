"""The TTT unroll: K draft steps over every position of a batch at once.

At step k = 0..K-1, position t holds the chain that starts after target prefix t:
    input token x[t+1+k], hidden = step k-1 output at t (step 0: the projected target feature at t),
    RoPE position t + k (packed batches: position_ids[t] + k, its place in its own document),
    label = target distribution at position t+1+k (it predicts token t+2+k; loss.step_valid_mask).
Attention follows attention.py: step-0 keys causally (and within t's document), plus t's own later-step keys.

`unroll` runs any draft through its `step` (llama.Draft), one layer call per step: the reference, and EAGLE-1's
training unroll. `unroll_eagle3` is the same function for the EAGLE-3 draft arranged for training speed (weights
cast once, the token half of q/k/v formed once, RoPE tables once); its elementwise pieces (`UnrollPieces`) are what
policy.py wraps from outside with selective recompute and torch.compile.

Shapes: B batch, T tokens (N packed), H hidden, nh/nkv heads, D head dim, K steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from eagle_trainer.drafts.attention import step0_attention
from eagle_trainer.drafts.layers import rms_norm, rotary_cos_sin, rotate
from eagle_trainer.drafts.loss import shift_left
from eagle_trainer.drafts.policy import keep_products


def unroll(draft, input_ids: torch.Tensor, features: torch.Tensor, num_steps: int, attention: str = "naive",
           position_ids: torch.Tensor | None = None, documents: torch.Tensor | None = None) -> list[torch.Tensor]:
    """K steps of `draft.step` over every position at once -> K step outputs [B, T, H] (EAGLE-3: g_next, before
    the final norm; EAGLE-1: the predicted features). Each layer keeps its step-0 keys/values and its later
    steps' keys/values at t, and attends to them as attention.py says."""
    attend_fn = step0_attention(attention, documents, input_ids.device)
    b, t = input_ids.shape
    base_pos = torch.arange(t, device=input_ids.device).expand(b, t) if position_ids is None else position_ids
    num_layers = draft.config.num_layers
    kv0: list = [None] * num_layers  # per layer: step-0 (k, v)
    diag = [([], []) for _ in range(num_layers)]  # per layer: the later steps' k and v at t
    hidden, out = draft.project(features), []
    for k in range(num_steps):
        def attend(i, q, kk, vv, first=k == 0):
            if first:
                kv0[i] = (kk, vv)
            else:
                diag[i][0].append(kk)
                diag[i][1].append(vv)
            return attend_fn(q, *kv0[i], *diag[i])

        hidden = draft.step(shift_left(input_ids, 1 + k), hidden, base_pos + k, attend)  # token x[t+1+k]
        out.append(hidden)
    return out


def unroll_eagle3(draft, input_ids: torch.Tensor, aux_hidden: torch.Tensor, num_steps: int,
                  attention: str = "naive", position_ids: torch.Tensor | None = None,
                  documents: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Unroll the draft K steps over every position at once. Returns K final-normed hidden states [B, T, H]
    (the lm_head's input; `soft_ce.fused_ttt_loss` takes them without forming the logits).
    Packed batches pass position_ids [B, T] (position in the document) and documents [B, T] (document ids).

    The same function as `unroll` followed by the final norm (tests/drafts/test_unroll.py checks it against the
    KV-cached decoder), arranged for training: the weights are cast once (`draft.unroll_weights`); the q/k/v rows
    over the token half of the layer input, input_layernorm(embed(x[t+1+k])) W^T, are computed once for x[t+1] and
    read k rows on at step k (K-1 fewer products over that half, forward and backward). The pieces around the
    attention and the matrix products are `draft.unroll_pieces`, as policy.py left them (recomputed, compiled)."""
    attend = step0_attention(attention, documents, input_ids.device, num_steps)
    cfg, pieces = draft.config, draft.unroll_pieces
    b, t = input_ids.shape
    base_pos = torch.arange(t, device=input_ids.device).expand(b, t) if position_ids is None else position_ids
    w = draft.unroll_weights()
    eps, inv_freq = cfg.rms_norm_eps, draft.rotary.inv_freq
    hidden = draft.project(aux_hidden).to(w.dtype)  # g0 [B, T, H]
    # x[t+1] for t < T + K - 1 (token 0 past the end, as shift_left pads): step k reads rows k .. k + T - 1
    ids = torch.cat([input_ids[:, 1:], input_ids.new_zeros(b, num_steps)], dim=1)
    tokens = draft.embed_tokens(ids).to(w.dtype)
    token_qkv = pieces.token_qkv(tokens, w.input_norm, w.qkv_token, eps)  # [B, T+K-1, (nh+2nkv) D]
    token_rows = row_windows(token_qkv, t, num_steps)  # step k reads rows k .. k + T - 1
    # RoPE at positions t + k for every step, once, in the compute dtype ([K, B, T, 1, D], the q/k layout): formed in
    # the compiled step, the sines and cosines of every element would be evaluated again in backward
    steps = torch.arange(num_steps, device=input_ids.device)[:, None, None]
    cos, sin = (x.to(w.dtype)[:, :, :, None] for x in rotary_cos_sin(base_pos + steps, inv_freq))
    k0 = v0 = None
    diag_k, diag_v, out = [], [], []
    for k in range(num_steps):
        q, kk, vv = (x.transpose(1, 2) for x in pieces.step_qkv(  # [B, n, T, D] views
            hidden, token_rows[k], cos[k], sin[k], w.hidden_norm, w.qkv_hidden, eps, cfg.num_heads,
            cfg.num_kv_heads))
        if k == 0:
            k0, v0 = kk, vv
        else:
            diag_k.append(kk)
            diag_v.append(vv)
        hidden, normed = pieces.step_out(hidden, attend(q, k0, v0, diag_k, diag_v), w.o, w.post_norm, w.gate_up,
                                         w.down, w.final_norm, eps)
        out.append(normed)
    return out


@dataclass(frozen=True)
class UnrollPieces:
    """The functions `unroll_eagle3` calls around the attention and the matrix products. policy.py swaps them for
    their `recomputed` twins and compiles them; the unroll calls whatever the draft holds."""

    token_qkv: Callable
    step_qkv: Callable
    step_out: Callable
    recomputed: "UnrollPieces | None" = None  # the same functions under policy.keep_products

    def map(self, fn: Callable[[Callable], Callable]) -> "UnrollPieces":
        return UnrollPieces(fn(self.token_qkv), fn(self.step_qkv), fn(self.step_out))



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
    products' addmm inputs: under policy.keep_products the kept products are then h and g_next themselves (g_next is kept
    anyway, as the next step's input), not [T, H] terms beside them."""
    b, nh, t, d = attn.shape
    width = hidden.shape[-1]
    h = torch.addmm(hidden.reshape(b * t, width), attn.transpose(1, 2).reshape(b * t, nh * d), o_weight.T)
    gate, up = (rms_norm(h, post_norm, eps) @ gate_up.T).chunk(2, dim=-1)
    g_next = torch.addmm(h, F.silu(gate) * up, down.T).view(b, t, width)
    return g_next, rms_norm(g_next, final_norm, eps)



# Each recomputing twin is a function of its own: torch.compile caches compiled code by code object, so twins sharing
# one wrapper would be recompiles of one frame, and the second would mark every dimension that differs between them
# dynamic (the weights' widths too): Inductor then emits kernels with symbolic strides, 2-3x slower on an H100.
def _token_qkv_recomputed(*args):
    return keep_products(_token_qkv, *args)


def _step_qkv_recomputed(*args):
    return keep_products(_step_qkv, *args)


def _step_out_recomputed(*args):
    return keep_products(_step_out, *args)


UNROLL_PIECES = UnrollPieces(_token_qkv, _step_qkv, _step_out, recomputed=UnrollPieces(
    _token_qkv_recomputed, _step_qkv_recomputed, _step_out_recomputed))

"""The attention of the TTT unroll: three paths computing one function.

At step k, position t attends to the step-0 keys/values at positions <= t (causal; packed batches: of t's document
only) plus the step-j keys/values at position t for j = 1..k: what a serving engine's KV cache holds when it drafts
k+1 tokens after prefix t (tests/drafts/test_unroll.py checks the unroll against llama.KVCache).

- `naive`: scores against all step-0 keys [B, nh, T, T] plus k diagonal scores; the reference.
- `flex`:  a causal flex_attention over the step-0 block (compiled on the GPU: never holds [T, T]) that
           returns its log-sum-exp, merged with the k diagonal terms in torch; memory is O(T).
- `fused`: the step-0 block through FlashAttention-2 (its varlen form for packed rows) with its
           log-sum-exp, the diagonal terms merged by Triton kernels, and a backward that hands the library the
           merged output and log-sum-exp (kernels/ttt_attention); O(T) memory, the default on a GPU.

Shapes: B batch, T tokens (N packed), nh/nkv heads, D head dim.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from eagle_trainer.kernels.ttt_attention import DiagonalStore, step0_kernel, ttt_attention


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
    return create_block_mask(_causal, None, None, t, t, device=device)


@functools.cache
def _block_mask_builder(device_type: str):
    """create_block_mask compiled on the GPU (torch's way since it deprecated the `_compile` flag); eager
    elsewhere."""
    return torch.compile(create_block_mask) if device_type == "cuda" else create_block_mask


def _document_block_mask(documents: torch.Tensor):
    """Causal and same-document, for documents [B, T]: built per batch (compiled on the GPU, so the mask is
    evaluated block by block and never held as [T, T])."""

    def causal_same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (documents[b, q_idx] == documents[b, kv_idx])

    b, t = documents.shape
    return _block_mask_builder(documents.device.type)(causal_same_document, b, None, t, t, device=documents.device)


@functools.cache
def _flex(device_type: str):
    """flex_attention compiled for CUDA (the fused O(T) kernel); eager elsewhere (a reference, forward only)."""
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
    out0, aux = _flex(q.device.type)(q, k0, v0, block_mask=block_mask, enable_gqa=True,
                                      return_aux=AuxRequest(lse=True))
    lse0 = aux.lse  # out0 [B, nh, T, D], lse0 [B, nh, T]
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
    """Same function again, with a library attention kernel for the step-0 block (FlashAttention-2, varlen for
    packed rows; kernels/ttt_attention) and Triton kernels merging the diagonal terms, forward and backward.
    `step0`: `step0_kernel(device, documents)` and `store`: a `DiagonalStore`, both built once per unroll. fp32 on a
    GPU (no library kernel takes it) goes to the flex path."""
    if q.device.type == "cuda" and q.dtype == torch.float32:
        return flex_ttt_attention(q, k0, v0, diag_k, diag_v, documents)
    return ttt_attention(q, k0, v0, diag_k, diag_v, step0=step0 or step0_kernel(q.device, documents), store=store)


ATTENTION = {"naive": naive_ttt_attention, "flex": flex_ttt_attention, "fused": fused_ttt_attention}


def pick_attention(name: str, device: torch.device) -> str:
    """draft.attention -> the path: auto is fused on a GPU that runs FlashAttention-2 (compute capability 8.0 and
    up: Ampere, Hopper, Blackwell), flex on an older one, naive on the CPU."""
    if name not in ("auto", *ATTENTION):
        raise ValueError(f"draft.attention={name!r} is not one of auto, {', '.join(ATTENTION)}")
    if device.type != "cuda":
        return "naive" if name == "auto" else name
    flash = torch.cuda.get_device_capability(device) >= (8, 0)
    if name == "auto":
        return "fused" if flash else "flex"
    if name == "fused" and not flash:
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"draft.attention=fused needs FlashAttention-2, which needs a GPU of compute capability 8.0 "
                         f"or newer; {device} is {major}.{minor}: use draft.attention=flex (or auto)")
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



"""Packed attention for the target's full-attention layers: causal within each document, memory linear in N.

A packed batch (data.pack) is one row [1, N] of documents back to back. Given no attention mask, HF's
`create_causal_mask` would build a same-document causal mask for it, [N, N] for sdpa (1 GiB at N = 32k).
Instead every target is switched, through HF's public attention hooks, to an implementation registered here
under `NAME`:

- the attention function (`AttentionInterface`): inside a packed forward (FrozenTarget sets the documents,
  targets/packing.py) it runs `flex_attention` with a BlockMask built from cu_seqlens (causal AND same document;
  built once per forward, shared by every layer); any other call goes to HF's sdpa function unchanged;
- the mask function (`AttentionMaskInterface`): None inside a packed forward (no mask is built), HF's sdpa mask
  otherwise, so evaluation's KV cache and tree masks, padded batches and regeneration run exactly as with sdpa.

Both hooks are keyed by name only, so the models' own forwards (Qwen3, Qwen3-MoE, Qwen3-Next's gated attention)
need no change. On a GPU flex_attention is compiled once (the fused kernel never holds [N, N]); on the CPU it runs
eagerly, which materialises the scores per layer: a reference for tests, not a memory saving.

    target.packed_attention   auto (flex on a GPU when target.attn_implementation is sdpa, else hf) | flex | hf
                              (HF's own [N, N] mask for packed batches)

Shapes: N packed tokens, D documents, H/Hkv query/key-value heads, Dh head dim, nb = ceil(N / BLOCK_SIZE).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from eagle_trainer.targets.packing import current_documents, per_documents

IMPLEMENTATIONS = ("auto", "flex", "hf")
NAME = "eagle_packed"  # the key of our functions in HF's attention and mask interfaces
INNER = "sdpa"  # what every call outside a packed forward runs: HF's own functions of this name
BLOCK_SIZE = 128  # flex_attention's default sparse block (its GPU kernels' tiles divide it)


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nb, nb] bool (q block, kv block) -> counts [1, 1, nb] and kv block ids [1, 1, nb, nb] int32, the listed
    blocks first in ascending order (the layout BlockMask.from_kv_blocks takes)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    ids = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None], ids[None, None]


def document_block_mask(cu_seqlens: torch.Tensor, num_tokens: int, block_size: int = BLOCK_SIZE) -> BlockMask:
    """Causal attention within each document of a packed row: cu_seqlens [D+1] (last = num_tokens) -> BlockMask.

    The block tables come from the documents' spans, [nb, nb] entries: a kv block reaches a query block when it is
    at or before it and holds some of the query block's first document; it is full when both blocks lie in one
    document and the kv block is strictly earlier (the diagonal block is causal inside). No [N, N] mask is formed;
    `mask_mod` decides token pairs inside the partial blocks."""
    device = cu_seqlens.device
    tokens = torch.arange(num_tokens, device=device, dtype=cu_seqlens.dtype)
    doc = torch.searchsorted(cu_seqlens[1:], tokens, right=True)  # [N] each token's document
    num_blocks = -(-num_tokens // block_size)
    starts = torch.arange(num_blocks, device=device) * block_size
    first = doc[starts]  # [nb] document of each block's first token
    last = doc[(starts + block_size - 1).clamp(max=num_tokens - 1)]  # and of its last
    q, kv = starts[:, None], starts[None, :]
    reached = (kv <= q) & (last[None, :] >= first[:, None])  # [nb, nb]; documents ascend, so >= means ==
    full = (kv < q) & (first[None, :] == last[:, None])
    kv_num_blocks, kv_indices = _ordered(reached & ~full)
    full_kv_num_blocks, full_kv_indices = _ordered(full)

    def causal_same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc[q_idx] == doc[kv_idx])

    return BlockMask.from_kv_blocks(kv_num_blocks=kv_num_blocks, kv_indices=kv_indices,
                                    full_kv_num_blocks=full_kv_num_blocks, full_kv_indices=full_kv_indices,
                                    BLOCK_SIZE=block_size, mask_mod=causal_same_document,
                                    seq_lengths=(num_tokens, num_tokens))


@functools.cache
def _flex(device_type: str):
    """flex_attention compiled once for CUDA (the fused kernel; later lengths reuse it with dynamic shapes);
    eager elsewhere."""
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """HF's attention-function signature: query [1, H, N, Dh], key/value [1, Hkv, N, Dh] -> ([1, N, H, Dh], None).
    Outside a packed forward: HF's sdpa function with the same arguments."""
    cu_seqlens = current_documents()
    if cu_seqlens is None:
        return ALL_ATTENTION_FUNCTIONS[INNER](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    assert attention_mask is None, "a packed forward got a mask: our mask function builds none"
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{type(module).__name__} is a sliding-window layer; target.packed_attention=flex keeps only "
                         "causal, same-document attention: set target.packed_attention=hf for this target")
    num_tokens = query.shape[2]
    block_mask = per_documents(("block_mask", num_tokens, query.device),
                               lambda: document_block_mask(cu_seqlens, num_tokens))
    groups = query.shape[1] // key.shape[1]
    if groups & (groups - 1):  # flex's kernels share a kv head among a power-of-two number of query heads
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = _flex(query.device.type)(query, key, value, block_mask=block_mask, scale=scaling,
                                   enable_gqa=query.shape[1] != key.shape[1])  # [1, H, N, Dh]
    return out.transpose(1, 2).contiguous(), None


def runs_sdpa(attn_implementation: str) -> bool:
    """Whether an attention call under `attn_implementation` runs HF's sdpa function now: sdpa itself, or ours
    outside a packed forward."""
    return attn_implementation == INNER or (attn_implementation == NAME and current_documents() is None)


def _packed_mask(*args, **kwargs):
    """HF's mask-function signature: no mask inside a packed forward (the attention builds its BlockMask from the
    documents); otherwise HF's sdpa mask, with the same arguments."""
    if current_documents() is not None:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[INNER](*args, **kwargs)


def register_packed_attention() -> None:
    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, _packed_mask)


def resolve_packed_attention(impl: str, attn_implementation: str, device: torch.device) -> str:
    """`target.packed_attention` -> flex or hf. flex wraps HF's sdpa (every non-packed call runs it), so it needs
    target.attn_implementation=sdpa; auto picks flex on a GPU with sdpa (where the compiled kernel saves the memory),
    hf otherwise (on the CPU eager flex would hold the scores anyway, and be slower)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"target.packed_attention={impl!r} is not one of {IMPLEMENTATIONS}")
    if impl == "auto":
        return "flex" if attn_implementation == INNER and device.type == "cuda" else "hf"
    if impl == "flex" and attn_implementation != INNER:
        raise ValueError(f"target.packed_attention=flex runs HF's sdpa for every call outside a packed forward, but "
                         f"target.attn_implementation={attn_implementation!r}; set target.attn_implementation=sdpa, "
                         "or target.packed_attention=hf (or auto) to keep HF's attention for packed batches too")
    return impl


def bind_packed_attention(model: nn.Module, cfg: Any) -> str:
    """Switch a loaded HF model's attention to ours (flex) or back to `cfg.attn_implementation` (hf), as
    `cfg.packed_attention` (a TargetConfig) asks; returns the implementation bound."""
    impl = resolve_packed_attention(cfg.packed_attention, cfg.attn_implementation, next(model.parameters()).device)
    if impl == "flex":
        register_packed_attention()
    model.set_attn_implementation(NAME if impl == "flex" else cfg.attn_implementation)
    return impl

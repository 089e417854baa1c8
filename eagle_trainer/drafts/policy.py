"""Training policy applied to a draft from outside its model code: selective recompute, then torch.compile.

The trainer (and any other driver, e.g. a benchmark) calls, in this order:

    apply_recompute(draft)  # draft.recompute: backward forms the unroll's elementwise work again
    apply_compile(draft)    # on a GPU: the unroll's elementwise pieces compiled (fused norms, RoPE, SwiGLU)

Recompute comes first so that compile traces the checkpointed functions: the saved-tensor policy then sees the
individual matrix products inside the compiled region, and backward recomputes inside compiled code too. Both act on
`draft.unroll_pieces` (llama.Draft), which the draft kind declares; a kind whose unroll runs its modules as they are
(EAGLE-1) has none, and both steps leave it as it is.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def _save_products(ctx, op, *args, **kwargs):
    # elementwise work is always formed again (MUST_RECOMPUTE; PREFER_RECOMPUTE measured the same memory at T=4096)
    return CheckpointPolicy.MUST_SAVE if op in _PRODUCTS else CheckpointPolicy.MUST_RECOMPUTE


_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _save_products)


def keep_products(fn, *args):
    """fn(*args) under selective activation checkpointing: backward keeps fn's inputs and the matrix products it
    needs, and forms the elementwise work again (norms, rotary, SwiGLU's silu(gate) * up, residual sums): each step
    would otherwise keep, next to the products, normed copies of its hidden states and the [T, I] SwiGLU product
    (1.1 GiB of a T=8192 step at Qwen3-30B-A3B draft widths), for one more pass over them in backward."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_CONTEXT)


def recompute_on(setting: bool | None, device: torch.device) -> bool:
    """draft.recompute: true or false as set; None (auto) recomputes on a GPU, where it saves memory for about 1% of
    a T=8192 step (the pieces are compiled), and not on the CPU, where the eager pieces formed again cost the demo's
    training about a sixth of its time and memory is not short."""
    return setting if setting is not None else device.type == "cuda"


def apply_recompute(draft: torch.nn.Module) -> None:
    """Run the draft's unroll pieces under `keep_products` from now on."""
    if draft.unroll_pieces is not None:
        draft.unroll_pieces = draft.unroll_pieces.recomputed or draft.unroll_pieces


def apply_compile(draft: torch.nn.Module, backend: str | Callable = "inductor") -> None:
    """Compile the draft's unroll pieces (one compiled function each; call after `apply_recompute`)."""
    if draft.unroll_pieces is not None:
        draft.unroll_pieces = draft.unroll_pieces.map(lambda fn: torch.compile(fn, backend=backend))

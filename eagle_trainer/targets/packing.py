"""Packed documents in a target forward: which documents the one row of a packed batch holds.

FrozenTarget sets the documents' starts here around the target forward (`documents`); layers read them with
`current_documents`. The full-attention layers (targets/packed_attention.py) run a causal, same-document flex
attention from them; a recurrent layer that can reset its state per document (Qwen3-Next's gated delta net with
our core, targets/gdn.py) passes them to its kernels as cu_seqlens; one that cannot calls `refuse_documents`.
What every layer of one forward shares (the attention's BlockMask) is built once per block (`per_documents`).

Shapes: N packed tokens, D documents; cu_seqlens [D+1] int32 (first 0, last N).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

_CU_SEQLENS: ContextVar[torch.Tensor | None] = ContextVar("eagle_packed_cu_seqlens", default=None)
_SHARED: ContextVar[dict | None] = ContextVar("eagle_packed_shared", default=None)


@contextmanager
def documents(cu_seqlens: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `current_documents()` is `cu_seqlens` (None: not packed)."""
    token = _CU_SEQLENS.set(cu_seqlens)
    shared = _SHARED.set(None if cu_seqlens is None else {})
    try:
        yield
    finally:
        _SHARED.reset(shared)
        _CU_SEQLENS.reset(token)


def current_documents() -> torch.Tensor | None:
    """The document starts [D+1] of the packed batch being run through the target, or None."""
    return _CU_SEQLENS.get()


def per_documents(key: Any, build: Callable[[], Any]) -> Any:
    """`build()`, called once per `documents` block and key: every layer of the forward gets the same object."""
    shared = _SHARED.get()
    assert shared is not None, "per_documents outside a packed documents() block"
    if key not in shared:
        shared[key] = build()
    return shared[key]


def refuse_documents(what: str, fix: str) -> None:
    """Raise if a packed batch is running: `what` would carry state from one document into the next."""
    if _CU_SEQLENS.get() is not None:
        raise ValueError(f"{what} cannot reset its state at document boundaries, so a packed batch (data.pack=true) "
                         f"would leak one conversation into the next; {fix}, or set data.pack=false")

"""Packed documents in a target forward: which documents the one row of a packed batch holds.

HF's attention layers see document boundaries through `position_ids` alone: with no attention mask and no
cache, `masking_utils.find_packed_sequence_indices` starts a new document wherever the position does not
step by one, and `create_causal_mask` ANDs "same document" into the causal mask (sdpa, eager and flex alike).
A recurrent layer (Qwen3-Next's gated delta net) gets no such mask: FrozenTarget sets the documents' starts
here around the forward, and a layer forward that can reset its state per document reads them
(`current_documents`); one that cannot calls `refuse_documents`.

Shapes: N packed tokens, D documents; cu_seqlens [D+1] int32 (first 0, last N).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_CU_SEQLENS: ContextVar[torch.Tensor | None] = ContextVar("eagle_packed_cu_seqlens", default=None)


@contextmanager
def documents(cu_seqlens: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `current_documents()` is `cu_seqlens` (None: not packed)."""
    token = _CU_SEQLENS.set(cu_seqlens)
    try:
        yield
    finally:
        _CU_SEQLENS.reset(token)


def current_documents() -> torch.Tensor | None:
    """The document starts [D+1] of the packed batch being run through the target, or None."""
    return _CU_SEQLENS.get()


def refuse_documents(what: str, fix: str) -> None:
    """Raise if a packed batch is running: `what` would carry state from one document into the next."""
    if _CU_SEQLENS.get() is not None:
        raise ValueError(f"{what} cannot reset its state at document boundaries, so a packed batch (data.pack=true) "
                         f"would leak one conversation into the next; {fix}, or set data.pack=false")

"""Draft models, their unroll and their losses. Never imports targets/, parallel/ or anything above them.

    llama.py      what every kind shares: config fields, the Llama decoder layer, the Draft base, the KV cache
    eagle3.py     the EAGLE-3 draft and loss (registered as eagle3)
    eagle1.py     the EAGLE-1 draft and loss (registered as eagle1, and eagle2: the same draft, tree-decoded)
    attention.py  the TTT attention paths (naive, flex, fused)
    unroll.py     the TTT unroll: any draft through its `step`, and EAGLE-3's arranged for training speed
    loss.py       step masks, the per-step loss loop, TTTLoss
    soft_ce.py    EAGLE-3's fused lm_head + soft cross-entropy head
    policy.py     selective recompute and torch.compile, applied to a draft from outside
    io.py         draft checkpoints on disk (draft_config.json + draft.safetensors)

Importing the package registers the built-in algorithms with the registry.
"""

from __future__ import annotations

import torch

from eagle_trainer.drafts import eagle1, eagle3  # noqa: F401 (registers eagle3, eagle1, eagle2)
from eagle_trainer.drafts.llama import Draft, KVCache


def frozen_weights_to(draft: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold the draft's frozen weights (the target embedding [V, H]) in `dtype`: on the GPU they are only read
    under bf16 autocast, and an fp32 copy of Qwen3's 151936 x 2048 embedding is 1.2 GiB. A shared bf16 target
    embedding (the app shares the target's) is left as it is."""
    for p in draft.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


__all__ = ["Draft", "KVCache", "frozen_weights_to"]

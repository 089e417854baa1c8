"""The draft vocabulary map (docs/design.md, Draft vocab map): which target ids the draft's lm_head predicts.

The draft vocabulary is the Vd most frequent target ids among LOSS tokens (ties: lower id first), sorted
ascending; with fewer than Vd distinct ids it is padded with the smallest unused ids. Two tensors carry it,
in the layout SGLang and vLLM load:

    d2t  int64 [Vd]  draft index i -> target id, stored as the offset d2t[i] = target_id(i) - i
    t2d  bool  [V]   True at the target ids that are in the draft vocabulary

Saved as safetensors with tensors `d2t` and `t2d`.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file


def count_loss_tokens(dataset: datasets.Dataset, target_vocab_size: int, batch_size: int = 1024) -> torch.Tensor:
    """How often each target id occurs as a loss token: int64 [V]. Streams the Arrow data in batches."""
    counts = np.zeros(target_vocab_size, dtype=np.int64)
    for table in dataset.with_format("arrow").iter(batch_size=batch_size):
        ids = pc.list_flatten(table["input_ids"]).to_numpy()
        mask = pc.list_flatten(table["loss_mask"]).to_numpy(zero_copy_only=False)
        ids = ids[mask]
        if ids.size and (ids.min() < 0 or ids.max() >= target_vocab_size):
            raise ValueError(
                f"loss token id {int(ids.max())} is outside the target vocabulary [0, {target_vocab_size}); "
                f"pass the target model's config.vocab_size as target_vocab_size"
            )
        counts += np.bincount(ids, minlength=target_vocab_size)
    return torch.from_numpy(counts)


def vocab_map_from_counts(counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t int64 [Vd], t2d bool [V]) from per-id loss-token counts [V]."""
    target_vocab_size = counts.numel()
    if not 0 < draft_vocab_size <= target_vocab_size:
        raise ValueError(
            f"draft_vocab_size={draft_vocab_size} must be in [1, target vocab size {target_vocab_size}]; "
            f"lower draft.draft_vocab_size"
        )
    # A stable descending sort keeps ties in ascending id order, and puts the unused (count 0) ids after
    # the used ones, smallest first: exactly the padding rule.
    order = torch.sort(counts, descending=True, stable=True).indices
    draft_ids = torch.sort(order[:draft_vocab_size]).values.to(torch.int64)  # [Vd] ascending
    d2t = draft_ids - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    return d2t, t2d


def build_vocab_map(
    dataset: datasets.Dataset, target_vocab_size: int, draft_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t int64 [Vd], t2d bool [V]) for a tokenised dataset with columns input_ids, loss_mask."""
    if draft_vocab_size > target_vocab_size:
        raise ValueError(
            f"draft_vocab_size={draft_vocab_size} exceeds the target vocab size {target_vocab_size}; "
            f"lower draft.draft_vocab_size"
        )
    return vocab_map_from_counts(count_loss_tokens(dataset, target_vocab_size), draft_vocab_size)


def draft_ids_from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    """Target id of each draft index: int64 [Vd]."""
    return d2t.to(torch.int64) + torch.arange(d2t.numel(), dtype=torch.int64, device=d2t.device)


def vocab_coverage(counts: torch.Tensor, t2d: torch.Tensor) -> float:
    """Fraction of loss tokens whose target id is in the draft vocabulary."""
    total = int(counts.sum())
    return float(counts[t2d].sum()) / total if total else 0.0


def save_vocab_map(path: str | Path, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Write to a temporary file and rename it into place: a crash, or another process writing the same map, never
    leaves a half-written file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        save_file({"d2t": d2t.to(torch.int64).contiguous(), "t2d": t2d.to(torch.bool).contiguous()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_vocab_map(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t int64 [Vd], t2d bool [V]); t2d stored as uint8 by other tools is read back as bool too."""
    if not Path(path).is_file():
        raise ValueError(f"vocab map {str(path)!r} does not exist; build it with `eagle-data vocab ... --out {path}`")
    tensors = load_file(str(path))
    missing = {"d2t", "t2d"} - set(tensors)
    if missing:
        raise ValueError(f"vocab map {str(path)!r} lacks tensors {sorted(missing)}; rebuild it with `eagle-data vocab`")
    d2t, t2d = tensors["d2t"].to(torch.int64), tensors["t2d"].to(torch.bool)
    draft_ids = draft_ids_from_d2t(d2t)
    in_range = d2t.numel() > 0 and 0 <= int(draft_ids.min()) and int(draft_ids.max()) < t2d.numel()
    if not in_range or int(t2d.sum()) != d2t.numel() or not bool(t2d[draft_ids].all()):
        raise ValueError(f"vocab map {str(path)!r}: d2t and t2d name different ids; rebuild it with `eagle-data vocab`")
    return d2t, t2d

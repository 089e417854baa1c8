"""The target in offline training: stored captured states in, TargetOutputs out, no model.

`OfflineTarget.forward(batch)` forms the teacher from an OfflineBatch's states through `teacher_outputs`, the
function online training (`FrozenTarget.forward`) uses, so both give the same TargetOutputs for the same states.
What it needs of the target, the lm_head rows of the draft ids and the input embedding, is read straight from
the checkpoint's safetensors files (`from_checkpoint`).

Shapes: B batch, T tokens, Ht target hidden, V target vocab, Vd draft vocab.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eagle_trainer import registry
from eagle_trainer.config import TargetConfig
from eagle_trainer.targets.frozen import teacher_outputs
from eagle_trainer.targets.loading import read_config, read_target_tensors
from eagle_trainer.types import OfflineBatch, TargetOutputs


class OfflineTarget:
    """Stands in for FrozenTarget when the states come from an offline dump (data.offline.OfflineStore)."""

    def __init__(self, draft_head: torch.Tensor, mask_teacher_argmax: bool, embedding: torch.Tensor | None = None,
                 lm_head: torch.Tensor | None = None):
        self.draft_head = draft_head  # [Vd, Ht]: lm_head rows of the draft ids
        self.mask_teacher_argmax = mask_teacher_argmax
        self.embedding = embedding  # [V, Ht] the target's input embedding (the draft's, frozen)
        self.lm_head = lm_head  # [V, Ht] on the teacher's device, kept only for drafts that decode with it (EAGLE-1)

    @classmethod
    def from_checkpoint(cls, path: str | Path, draft_ids: torch.Tensor, mask_teacher_argmax: bool,
                        device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                        keep_lm_head: bool = False) -> "OfflineTarget":
        """Read the lm_head rows of `draft_ids` [Vd] and the embedding from the checkpoint, as `dtype` on `device`
        (the dtype the online target would run in, so the teacher matches online training); with `keep_lm_head`
        also the whole lm_head [V, Ht] (an EAGLE-1 draft decodes with it; an EAGLE-3 one never needs it)."""
        _, arch, _ = read_config(TargetConfig(path=str(path), trust_remote_code=trust_remote_code))
        spec = registry.target_spec(arch)
        head, embed = spec.lm_head + ".weight", spec.embed + ".weight"
        tensors = read_target_tensors(path, [head, embed], trust_remote_code=trust_remote_code)
        draft_head = tensors[head][draft_ids.cpu()].to(device, dtype)
        lm_head = tensors[head].to(device, dtype) if keep_lm_head else None
        return cls(draft_head, mask_teacher_argmax, tensors[embed].to(device, dtype), lm_head)

    def input_embedding(self) -> torch.Tensor:
        if self.embedding is None:
            raise ValueError("this OfflineTarget was built without the target embedding; pass embedding= or use "
                             "OfflineTarget.from_checkpoint")
        return self.embedding

    def target_head(self) -> torch.Tensor:
        """The target's lm_head [V, Ht] on the teacher's device (EAGLE-1 drafts decode with it)."""
        if self.lm_head is None:
            raise ValueError("this OfflineTarget was built without the target lm_head; use "
                             "OfflineTarget.from_checkpoint(..., keep_lm_head=True)")
        return self.lm_head

    @torch.no_grad()
    def forward(self, batch: OfflineBatch) -> TargetOutputs:
        states = batch.states.to(self.draft_head.device, dtype=self.draft_head.dtype)
        return teacher_outputs(states, self.draft_head, self.mask_teacher_argmax)

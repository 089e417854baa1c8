"""The simulated acceptance length of a draft: its per-step TTT accuracy on tokenised conversations, through its
algorithm's own loss, and 1 + sum_k prod_{j<=k} acc_j from it. Every row counts: the batches here keep the ragged
last one, unlike training's `data.batches`, which drops it so that every rank takes the same number of steps."""

from __future__ import annotations

import torch

from eagle_trainer import registry
from eagle_trainer.config import DraftConfig
from eagle_trainer.data import draft_ids_from_d2t
from eagle_trainer.data.dataset import collate, examples_at
from eagle_trainer.drafts.attention import pick_attention
from eagle_trainer.drafts.llama import Draft
from eagle_trainer.drafts.loss import simulated_acceptance
from eagle_trainer.targets.frozen import FrozenTarget


@torch.no_grad()
def simulated_on(model, architecture: str, draft: Draft, dataset, ttt_steps: int, batch_size: int,
                 pad_id: int, device: torch.device) -> dict:
    """Per-step TTT accuracy of the draft on every row of `dataset`, the tokens it is measured on per step
    (num_tokens), and the simulated acceptance length from it."""
    draft_spec = registry.resolve(architecture, draft.config.algorithm)
    target = FrozenTarget(model, draft_spec.target, draft.aux_layer_ids, draft_ids_from_d2t(draft.d2t), draft.t2d,
                          mask_teacher_argmax=True)
    draft_cfg = DraftConfig(ttt_steps=ttt_steps)
    attention = pick_attention("auto", device)
    hits, counts = [0.0] * ttt_steps, [0] * ttt_steps
    for start in range(0, len(dataset), batch_size):
        examples = examples_at(dataset, list(range(start, min(start + batch_size, len(dataset)))))
        batch = collate(examples, pad_id).pad_to_multiple(128 if attention == "flex" else 1, pad_id).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = draft_spec.algorithm.loss(draft, batch, target.forward(batch), draft_cfg, attention)
        for j in range(ttt_steps):
            hits[j] += out.step_acc[j] * out.step_count[j]
            counts[j] += out.step_count[j]
    target.close()
    acc = [h / max(c, 1) for h, c in zip(hits, counts)]
    return {"ttt_steps": ttt_steps, "acc": acc, "num_tokens": counts, "sim_accept_len": simulated_acceptance(acc)}

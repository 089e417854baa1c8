"""Draft models, their shapes from the target, and their losses. Never imports targets/ or parallel/.

Registers the built-in draft algorithms with the registry on import: eagle3 (drafts/eagle3.py + ttt.py), and
eagle1 / eagle2 (drafts/eagle1.py: one draft and training; eagle2 names the dynamic-tree decoding it is served with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eagle_trainer import registry
from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts.eagle1 import Eagle1Config, Eagle1Draft, unroll
from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft
from eagle_trainer.drafts.soft_ce import fused_ttt_loss, unfused_ttt_loss
from eagle_trainer.drafts.ttt import GlobalCounts, TTTLoss, shift_left, step_counts, step_valid_mask, ttt_hidden
from eagle_trainer.types import Batch, TargetInfo, TargetOutputs


def frozen_weights_to(draft: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold the draft's frozen weights (the target embedding [V, H]) in `dtype`: on the GPU they are only read
    under bf16 autocast, and an fp32 copy of Qwen3's 151936 x 2048 embedding is 1.2 GiB. A shared bf16 target
    embedding (train.py) is left as it is."""
    for p in draft.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def shape_from_target(info: TargetInfo, cfg: DraftConfig) -> dict:
    """The fields every draft takes from its target: H = Ht, the target's attention shape and RoPE unless
    overridden, its vocab (DESIGN section 4)."""
    if cfg.draft_vocab_size > info.vocab_size:
        raise ValueError(f"draft.draft_vocab_size={cfg.draft_vocab_size} exceeds the target vocab {info.vocab_size}; "
                         f"set draft.draft_vocab_size <= {info.vocab_size}")
    return dict(
        hidden_size=info.hidden_size,
        num_heads=cfg.num_heads or info.num_heads,
        num_kv_heads=cfg.num_kv_heads or info.num_kv_heads,
        head_dim=cfg.head_dim or info.head_dim,
        intermediate_size=cfg.intermediate_size or info.intermediate_size,
        vocab_size=info.vocab_size,
        draft_vocab_size=cfg.draft_vocab_size,
        rms_norm_eps=info.rms_norm_eps,
        rope_theta=info.rope_theta,
        rope_scaling=info.rope_scaling,
        max_position_embeddings=info.max_position_embeddings,
        num_layers=cfg.num_layers,
        target_architecture=info.architecture,
    )


def eagle3_config(info: TargetInfo, cfg: DraftConfig, aux_layer_ids) -> Eagle3Config:
    return Eagle3Config(**shape_from_target(info, cfg), target_hidden_size=info.hidden_size,
                        aux_layer_ids=tuple(aux_layer_ids))


def build_eagle3(info: TargetInfo, cfg: DraftConfig, aux_layer_ids) -> Eagle3Draft:
    return Eagle3Draft(eagle3_config(info, cfg, aux_layer_ids))


def eagle3_loss(draft: Eagle3Draft, batch: Batch, outputs: TargetOutputs, cfg: DraftConfig,
                attention: str, global_counts: GlobalCounts | None = None) -> TTTLoss:
    """The K-step TTT loss of one batch (DESIGN section 4); a packed batch keeps every chain in its document."""
    # aux in the compute dtype: an fp32 copy under autocast would only be cast back for fc, and would stay alive to
    # the end of the loss (0.2 GiB at T=8192, H 2048)
    aux = outputs.aux_hidden.to(draft.compute_dtype())
    documents = batch.document_ids()  # None unless packed
    normed = ttt_hidden(draft, batch.input_ids, aux, cfg.ttt_steps, attention, batch.position_ids, documents,
                        cfg.recompute)
    valid = step_valid_mask(batch.loss_mask, batch.attention_mask, outputs.teacher_valid, cfg.ttt_steps, documents)
    head = fused_ttt_loss if cfg.fused_head else unfused_ttt_loss
    return head(normed, draft.lm_head.weight, outputs.teacher_logits, valid, cfg.step_weight,
                global_counts=global_counts)


def eagle1_config(info: TargetInfo, cfg: DraftConfig, algorithm: str) -> Eagle1Config:
    """EAGLE-1/2: the draft reads and predicts target features (H = Ht) and decodes with the target's lm_head."""
    return Eagle1Config(**shape_from_target(info, cfg), fc_bias=cfg.fc_bias, algorithm=algorithm)


def eagle1_loss(draft: Eagle1Draft, batch: Batch, outputs: TargetOutputs, cfg: DraftConfig,
                attention: str, global_counts: GlobalCounts | None = None) -> TTTLoss:
    """Per step k (K = draft.ttt_steps, 1 = plain EAGLE-1): feature_weight * SmoothL1(f_hat, f[t+1+k]) (mean
    over H) + ce_weight * soft-CE(lm_head(f_hat) over the draft vocab, teacher at t+1+k), each averaged over
    the step's valid tokens and weighted step_weight**k. Inputs get U(-a, a) noise while training."""
    features = outputs.final_hidden.to(draft.fc.weight.dtype)  # f [B, T, H], after the target's final norm
    inputs = features
    if draft.training and cfg.feature_noise > 0:
        inputs = features + (torch.rand_like(features) * 2 - 1) * cfg.feature_noise
    documents = batch.document_ids()  # None unless packed
    predicted = unroll(draft, batch.input_ids, inputs, cfg.ttt_steps, attention, batch.position_ids, documents)
    valid = step_valid_mask(batch.loss_mask, batch.attention_mask, outputs.teacher_valid, cfg.ttt_steps, documents)
    acc = torch.promote_types(features.dtype, torch.float32)  # losses in fp32 at least (bf16 under autocast)
    total = features.new_zeros((), dtype=acc)
    teacher = outputs.teacher_probs()  # [B, T, Vd] fp32
    teacher_top = teacher.argmax(-1)
    stats = []
    counts, norm = step_counts(valid, global_counts)
    for k, f_hat in enumerate(predicted):
        mask = valid[k].to(acc)
        n = norm[k].to(acc).clamp_min(1)
        target = shift_left(features, 1 + k)  # f[t+1+k]
        feature = (F.smooth_l1_loss(f_hat.to(acc), target.to(acc), reduction="none").mean(-1) * mask).sum() / n
        logits = draft.draft_logits(f_hat).to(acc)  # [B, T, Vd]
        labels = shift_left(teacher, 1 + k)
        ce = (-(labels * F.log_softmax(logits, -1)).sum(-1) * mask).sum() / n
        step = cfg.feature_weight * feature + cfg.ce_weight * ce
        total = total + cfg.step_weight**k * step
        with torch.no_grad():
            hit = (logits.argmax(-1) == shift_left(teacher_top, 1 + k)).float()
            stats.append(torch.stack([step.detach(), (hit * mask).sum() / n, counts[k].to(acc), feature.detach()]))
    return TTTLoss(total, torch.stack(stats), extra_names=("feature_loss",))


def _eagle1_builder(algorithm: str):
    return lambda info, cfg, aux_layer_ids: Eagle1Draft(eagle1_config(info, cfg, algorithm))


registry.register_algorithm(registry.AlgorithmSpec(name="eagle3", build_draft=build_eagle3, loss=eagle3_loss))
for _name in ("eagle1", "eagle2"):  # one draft and training; eagle2 decodes with dynamic trees at serve time
    registry.register_algorithm(registry.AlgorithmSpec(name=_name, build_draft=_eagle1_builder(_name),
                                                       loss=eagle1_loss, needs_aux_hidden=False,
                                                       needs_target_head=True))

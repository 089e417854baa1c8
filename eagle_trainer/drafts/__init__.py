"""Draft models and their training-time unroll. Never imports targets/ or parallel/.

Registers the built-in draft algorithms with the registry on import.
"""

from __future__ import annotations

from eagle_trainer import registry
from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft
from eagle_trainer.drafts.ttt import TTTLoss, step_valid_mask, ttt_logits, ttt_loss
from eagle_trainer.types import Batch, TargetInfo, TargetOutputs


def eagle3_config(info: TargetInfo, cfg: DraftConfig, aux_layer_ids) -> Eagle3Config:
    """The draft's shape: the target's attention shape unless overridden, H = Ht (DESIGN section 4)."""
    if cfg.draft_vocab_size > info.vocab_size:
        raise ValueError(f"draft.draft_vocab_size={cfg.draft_vocab_size} exceeds the target vocab {info.vocab_size}; "
                         f"set draft.draft_vocab_size <= {info.vocab_size}")
    return Eagle3Config(
        hidden_size=info.hidden_size,
        target_hidden_size=info.hidden_size,
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
        aux_layer_ids=tuple(aux_layer_ids),
        num_layers=cfg.num_layers,
        target_architecture=info.architecture,
    )


def build_eagle3(info: TargetInfo, cfg: DraftConfig, aux_layer_ids) -> Eagle3Draft:
    return Eagle3Draft(eagle3_config(info, cfg, aux_layer_ids))


def eagle3_loss(draft: Eagle3Draft, batch: Batch, outputs: TargetOutputs, cfg: DraftConfig,
                attention: str) -> TTTLoss:
    """The K-step TTT loss of one batch (DESIGN section 4)."""
    aux = outputs.aux_hidden.to(draft.fc.weight.dtype)
    logits = ttt_logits(draft, batch.input_ids, aux, cfg.ttt_steps, attention)
    valid = step_valid_mask(batch.loss_mask, batch.attention_mask, outputs.teacher_valid, cfg.ttt_steps)
    return ttt_loss(logits, outputs.teacher_probs, valid, cfg.step_weight)


registry.register_algorithm(registry.AlgorithmSpec(name="eagle3", build_draft=build_eagle3, loss=eagle3_loss))

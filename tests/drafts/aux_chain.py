"""A draft kind defined outside the package: the walk-through of docs/new_draft.md, complete.

`aux_chain` reads the target's aux states like EAGLE-3, but runs an EAGLE-1-style chain: each step feeds
fc(cat(embed(token), hidden)) through its own Llama layers and predicts with its own lm_head over the draft vocab.
One module, one registration; the trainer, the evaluator and checkpoints then handle it through the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eagle_trainer import registry
from eagle_trainer.drafts.layers import RMSNorm
from eagle_trainer.drafts.llama import DecoderLayer, Draft, KVCache, LlamaDraftConfig, shape_from_target
from eagle_trainer.drafts.loss import step_valid_mask, ttt_loss
from eagle_trainer.drafts.unroll import unroll


@dataclass(frozen=True, kw_only=True)
class AuxChainConfig(LlamaDraftConfig):
    target_hidden_size: int
    aux_layer_ids: tuple[int, ...]
    algorithm: str = "aux_chain"
    # shape facts the FLOP counter reads
    fc_every_step = True
    layer_input_size = property(lambda self: self.hidden_size)
    fc_in_features = property(lambda self: 2 * self.hidden_size)


class AuxChainDraft(Draft):
    def __init__(self, cfg: AuxChainConfig):
        super().__init__(cfg)
        self.aux_fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.hidden_size) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)

    def target_features(self, states) -> torch.Tensor:
        return states.aux_hidden

    def project(self, aux: torch.Tensor) -> torch.Tensor:
        return self.aux_fc(aux)

    def step(self, tokens, hidden, positions, attend):
        x = self.fc(torch.cat([self.embed_tokens(tokens).to(hidden.dtype), hidden], dim=-1))
        cos, sin = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            x = layer.out(x, attend(i, *layer.qkv(layer.input_layernorm(x), cos, sin)))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def aux_chain_loss(draft, batch, outputs, cfg, attention, global_counts=None):
    """Soft cross-entropy per step against the teacher, through the shared loss loop (loss.ttt_loss)."""
    documents = batch.document_ids()
    states = unroll(draft, batch.input_ids, outputs.aux_hidden.to(draft.compute_dtype()), cfg.ttt_steps, attention,
                    batch.position_ids, documents)
    valid = step_valid_mask(batch.loss_mask, batch.attention_mask, outputs.teacher_valid, cfg.ttt_steps, documents)
    return ttt_loss([draft.logits(h) for h in states], outputs.teacher_probs(), valid, cfg.step_weight,
                    global_counts)


def register() -> registry.AlgorithmSpec:
    """Register the kind once (tests import this module more than once per session)."""
    if "aux_chain" in registry.known_algorithms():
        return registry.algorithm_spec("aux_chain")
    return registry.register_algorithm(registry.AlgorithmSpec(
        name="aux_chain", config_class=AuxChainConfig, draft_class=AuxChainDraft,
        build_config=lambda info, cfg, aux_layer_ids: AuxChainConfig(
            **shape_from_target(info, cfg), target_hidden_size=info.hidden_size, aux_layer_ids=tuple(aux_layer_ids)),
        unroll=unroll, loss=aux_chain_loss, cache_class=KVCache, kind="aux-chain", feature="aux_hidden"))


register()

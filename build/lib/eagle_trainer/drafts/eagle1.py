"""The EAGLE-1 draft (EAGLE-2 is the same draft decoded with dynamic trees): LlamaForCausalLMEagle semantics.

    x      = fc(cat(embed(x[t+1]), f[t]))                     [B, T, 2H] -> [B, T, H], with bias (fc_bias)
    layers : Llama decoder layers; layer 0 has no input_layernorm; no final norm
    f_hat  = output of the last layer                         [B, T, H]: predicts the feature f[t+1]
    logits = f_hat @ target_head^T                            the TARGET's lm_head, frozen, not exported

The feature f is the target's final hidden state AFTER its final norm: that is what SGLang and vLLM hand an
EAGLE-1/2 draft (the hidden states their target model returns, the logits processor's input), and the
target's lm_head applies to it directly. Training regresses f_hat on f (SmoothL1) and adds a soft
cross-entropy of the draft-vocab logits against the target distribution, step by step through loss.step_losses;
`draft.ttt_steps=K` > 1 unrolls the feature chain TTT-style (unroll.unroll), each step feeding its own prediction.

Shapes: B batch, T tokens, H hidden, V target vocab, Vd draft vocab, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eagle_trainer import registry
from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts.llama import DecoderLayer, Draft, KVCache, LlamaDraftConfig, shape_from_target
from eagle_trainer.drafts.loss import GlobalCounts, TTTLoss, shift_left, soft_cross_entropy, step_losses, \
    step_valid_mask
from eagle_trainer.drafts.unroll import unroll
from eagle_trainer.types import Batch, TargetInfo, TargetOutputs


@dataclass(frozen=True, kw_only=True)
class Eagle1Config(LlamaDraftConfig):
    fc_bias: bool = True  # SGLang's LlamaForCausalLMEagle has it; vLLM's EAGLE-1 loader does not
    algorithm: str = "eagle1"  # eagle1 | eagle2 (the same draft; eagle2 means tree decoding)

    @property
    def layer_input_size(self) -> int:
        return self.hidden_size  # fc's output (layer 0), the previous layer's (later ones)

    @property
    def fc_in_features(self) -> int:
        return 2 * self.hidden_size  # [embed(x[t+1]), f[t]]

    fc_every_step = True

    def __post_init__(self):
        super().__post_init__()
        if self.num_layers < 1:
            raise ValueError(f"draft.num_layers={self.num_layers}: an EAGLE-1 draft needs at least one layer")


class Eagle1Draft(Draft):
    def __init__(self, cfg: Eagle1Config):
        super().__init__(cfg)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=cfg.fc_bias)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.layer_input_size, input_norm=i > 0)
                                    for i in range(cfg.num_layers))
        # the target's lm_head [V, H]: shared (set_target_weights), never saved or exported
        self.register_buffer("target_head", torch.zeros(cfg.vocab_size, cfg.hidden_size), persistent=False)

    def set_target_weights(self, embedding: torch.Tensor, target_head: torch.Tensor | None = None,
                           share: bool = False) -> None:
        """The target's input embedding [V, H] (frozen: copied, or with `share` held as it is where it can be) and
        lm_head [V, H] (shared, frozen)."""
        if target_head is None:
            raise ValueError("an EAGLE-1 draft decodes with the target's lm_head; pass it as target_head")
        super().set_target_weights(embedding, share=share)
        self.target_head = target_head.detach()

    def target_features(self, states) -> torch.Tensor:
        """The target's final hidden state after its final norm [.., T, H]."""
        return states.final_hidden

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features  # f enters each step through fc, together with the token

    def step(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """tokens [B, T] (x[t+1]), features [B, T, H] (f[t], or the previous step's prediction) -> f_hat [B, T, H]."""
        emb = self.embed_tokens(tokens).to(features.dtype)
        x = self.fc(torch.cat([emb, features], dim=-1))
        cos, sin = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            normed = x if layer.input_layernorm is None else layer.input_layernorm(x)
            x = layer.out(x, attend(i, *layer.qkv(normed, cos, sin)))
        return x

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, T, H] -> target-vocab logits [B, T, V] through the target's lm_head."""
        return f @ self.target_head.to(f.dtype).T

    def draft_to_target(self, ids: torch.Tensor) -> torch.Tensor:
        return ids  # logits are over the target vocab already

    def draft_logits(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, T, H] -> logits over the draft vocab [B, T, Vd] (the target_head rows of the draft ids)."""
        ids = torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t
        return f @ self.target_head[ids].to(f.dtype).T


def eagle1_config(info: TargetInfo, cfg: DraftConfig, algorithm: str) -> Eagle1Config:
    """EAGLE-1/2: the draft reads and predicts target features (H = Ht) and decodes with the target's lm_head."""
    return Eagle1Config(**shape_from_target(info, cfg), fc_bias=cfg.fc_bias, algorithm=algorithm)


def eagle1_loss(draft: Eagle1Draft, batch: Batch, outputs: TargetOutputs, cfg: DraftConfig,
                attention: str, global_counts: GlobalCounts | None = None) -> TTTLoss:
    """Per step k (K = draft.ttt_steps, 1 = plain EAGLE-1): feature_weight * SmoothL1(f_hat, f[t+1+k]) (mean
    over H) + ce_weight * soft-CE(draft-vocab logits of f_hat, teacher at t+1+k), each averaged over the step's
    valid tokens and weighted step_weight**k. Inputs get U(-a, a) noise while training."""
    features = outputs.final_hidden.to(draft.fc.weight.dtype)  # f [B, T, H], after the target's final norm
    inputs = features
    if draft.training and cfg.feature_noise > 0:
        inputs = features + (torch.rand_like(features) * 2 - 1) * cfg.feature_noise
    documents = batch.document_ids()  # None unless packed
    predicted = unroll(draft, batch.input_ids, inputs, cfg.ttt_steps, attention, batch.position_ids, documents)
    valid = step_valid_mask(batch.loss_mask, batch.attention_mask, outputs.teacher_valid, cfg.ttt_steps, documents)
    acc = torch.promote_types(features.dtype, torch.float32)  # losses in fp32 at least (bf16 under autocast)
    teacher = outputs.teacher_probs()  # [B, T, Vd] fp32
    teacher_top = teacher.argmax(-1)

    def step_term(k, mask, n):
        f_hat = predicted[k]
        target = shift_left(features, 1 + k)  # f[t+1+k]
        feature = (F.smooth_l1_loss(f_hat.to(acc), target.to(acc), reduction="none").mean(-1) * mask).sum() / n
        ce, accuracy = soft_cross_entropy(draft.draft_logits(f_hat).to(acc), teacher, teacher_top, k, mask, n)
        return cfg.feature_weight * feature + cfg.ce_weight * ce, accuracy, (feature.detach(),)

    return step_losses(valid, cfg.step_weight, global_counts, acc, step_term, extra_names=("feature_loss",))


for _name in ("eagle1", "eagle2"):  # one draft and training; eagle2 decodes with dynamic trees at serve time
    registry.register_algorithm(registry.AlgorithmSpec(
        name=_name, config_class=Eagle1Config, draft_class=Eagle1Draft,
        build_config=lambda info, cfg, aux_layer_ids, algorithm=_name: eagle1_config(info, cfg, algorithm),
        unroll=unroll, loss=eagle1_loss, cache_class=KVCache, kind="EAGLE-1/2", feature="final_hidden", needs_target_head=True))

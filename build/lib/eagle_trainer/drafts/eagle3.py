"""The EAGLE-3 draft: one Llama decoder layer over [embed(token), hidden] (LlamaForCausalLMEagle3 semantics).

    g0     = fc(cat(aux_low, aux_mid, aux_high))                       [B, T, 3Ht] -> [B, T, H]
    x      = cat(input_layernorm(embed(tok)), hidden_norm(g))          [B, T, 2H]
    h      = g + o_proj(attention(q(x), k(x), v(x)))                   q/k/v read 2H
    g_next = h + mlp(post_attention_layernorm(h))                      (pre-norm, fed to the next step)
    logits = lm_head(norm(g_next))                                     [B, T, Vd]

The step comes in two pieces (`step_qkv`, attention outside, `step_out`), so that the training unroll
(unroll.unroll_eagle3) and the serving-style KV cache (llama.KVCache, through `step`) drive the same weights the
same way. The token embedding is the target's, frozen, and is not exported. The loss is the K-step soft
cross-entropy against the target (loss.py); on a GPU its lm_head + soft-CE run fused (soft_ce.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eagle_trainer import registry
from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts.layers import RMSNorm
from eagle_trainer.drafts.llama import DecoderLayer, Draft, KVCache, LlamaDraftConfig, shape_from_target
from eagle_trainer.drafts.loss import GlobalCounts, TTTLoss, step_valid_mask
from eagle_trainer.drafts.soft_ce import fused_ttt_loss, unfused_ttt_loss
from eagle_trainer.drafts.unroll import UNROLL_PIECES, unroll, unroll_eagle3
from eagle_trainer.types import Batch, TargetInfo, TargetOutputs


@dataclass(frozen=True, kw_only=True)
class Eagle3Config(LlamaDraftConfig):
    target_hidden_size: int  # Ht
    aux_layer_ids: tuple[int, ...]  # 0-based target decoder-layer outputs
    algorithm: str = "eagle3"

    @property
    def layer_input_size(self) -> int:
        return 2 * self.hidden_size  # [input_layernorm(embed), hidden_norm(g)]

    @property
    def fc_in_features(self) -> int:
        return len(self.aux_layer_ids) * self.target_hidden_size

    fc_every_step = False  # fc projects the aux states once, before the unroll

    def __post_init__(self):
        super().__post_init__()
        if self.num_layers != 1:
            raise ValueError(f"draft.num_layers={self.num_layers}: the EAGLE-3 draft has exactly one decoder layer "
                             "(the engines' LlamaForCausalLMEagle3 loads one midlayer); set draft.num_layers=1")


@dataclass
class UnrollWeights:
    """`Eagle3Draft.unroll_weights()`: the decoder layer's weights in the compute dtype, for the TTT unroll."""

    dtype: torch.dtype
    qkv_token: torch.Tensor  # [(nh + 2 nkv) D, H]: q/k/v rows over the input_layernorm(embedding) half
    qkv_hidden: torch.Tensor  # [(nh + 2 nkv) D, H]: over the hidden_norm(g) half
    o: torch.Tensor  # [H, nh D]
    gate_up: torch.Tensor  # [2 I, H]
    down: torch.Tensor  # [H, I]
    input_norm: torch.Tensor  # [H] each
    hidden_norm: torch.Tensor
    post_norm: torch.Tensor
    final_norm: torch.Tensor


class Eagle3Draft(Draft):
    unroll_pieces = UNROLL_PIECES

    def __init__(self, cfg: Eagle3Config):
        super().__init__(cfg)
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = DecoderLayer(cfg, cfg.layer_input_size, input_norm=True, hidden_norm=True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)

    def target_features(self, states) -> torch.Tensor:
        """The aux layers' outputs [.., T, 3Ht], low/mid/high concatenated."""
        return states.aux_hidden

    def project(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, 3Ht] -> g0 [B, T, H]."""
        return self.fc(aux_hidden)

    def step_qkv(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """tokens [B, T], hidden g [B, T, H], positions [B, T] -> q [B, nh, T, D], k/v [B, nkv, T, D]."""
        layer = self.midlayer
        emb = self.embed_tokens(tokens).to(hidden.dtype)
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(hidden)], dim=-1)  # [B, T, 2H]
        return layer.qkv(x, *self.rotary(positions))

    def step_out(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """hidden g [B, T, H], attention output [B, nh, T, D] -> g_next [B, T, H] (pre-norm)."""
        return self.midlayer.out(hidden, attn)

    def step(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        q, k, v = self.step_qkv(tokens, hidden, positions)
        return self.step_out(hidden, attend(0, q, k, v))

    def unroll_weights(self) -> UnrollWeights:
        """The layer's weights for one TTT unroll, cast once to the compute dtype (autocast's, else the params'):
        under autocast every use would cast the fp32 masters again, K times per step. Gradients flow back through
        the casts. q/k/v are one [(nh + 2 nkv) D, 2H] matrix split into its token and hidden halves, gate/up one
        [2 I, H] matrix."""
        dtype = self.compute_dtype()
        layer, attn, h = self.midlayer, self.midlayer.self_attn, self.config.hidden_size
        cast = lambda m: m.weight.to(dtype)
        qkv = torch.cat([cast(attn.q_proj), cast(attn.k_proj), cast(attn.v_proj)])  # cast, then joined: half the bytes
        return UnrollWeights(
            dtype=dtype, qkv_token=qkv[:, :h], qkv_hidden=qkv[:, h:], o=cast(attn.o_proj),
            gate_up=torch.cat([cast(layer.mlp.gate_proj), cast(layer.mlp.up_proj)]),
            down=cast(layer.mlp.down_proj), input_norm=cast(layer.input_layernorm), hidden_norm=cast(layer.hidden_norm),
            post_norm=cast(layer.post_attention_layernorm), final_norm=cast(self.norm))

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """g [B, T, H] -> draft-vocab logits [B, T, Vd]."""
        return self.lm_head(self.norm(g))


def eagle3_config(info: TargetInfo, cfg: DraftConfig, aux_layer_ids) -> Eagle3Config:
    return Eagle3Config(**shape_from_target(info, cfg), target_hidden_size=info.hidden_size,
                        aux_layer_ids=tuple(aux_layer_ids))


def eagle3_loss(draft: Eagle3Draft, batch: Batch, outputs: TargetOutputs, cfg: DraftConfig,
                attention: str, global_counts: GlobalCounts | None = None) -> TTTLoss:
    """The K-step TTT loss of one batch (docs/design.md, TTT); a packed batch keeps every chain in its document."""
    # aux in the compute dtype: an fp32 copy under autocast would only be cast back for fc, and would stay alive to
    # the end of the loss (0.2 GiB at T=8192, H 2048)
    aux = outputs.aux_hidden.to(draft.compute_dtype())
    documents = batch.document_ids()  # None unless packed
    normed = unroll_eagle3(draft, batch.input_ids, aux, cfg.ttt_steps, attention, batch.position_ids, documents)
    valid = step_valid_mask(batch.loss_mask, batch.attention_mask, outputs.teacher_valid, cfg.ttt_steps, documents)
    head = fused_ttt_loss if cfg.fused_head else unfused_ttt_loss
    return head(normed, draft.lm_head.weight, outputs.teacher_logits, valid, cfg.step_weight,
                global_counts=global_counts)


EAGLE3 = registry.register_algorithm(registry.AlgorithmSpec(
    name="eagle3", config_class=Eagle3Config, draft_class=Eagle3Draft, build_config=eagle3_config,
    unroll=unroll, loss=eagle3_loss, cache_class=KVCache, kind="EAGLE-3", feature="aux_hidden"))

"""The EAGLE-1 draft (EAGLE-2 is the same draft decoded with dynamic trees): LlamaForCausalLMEagle semantics.

    x      = fc(cat(embed(x[t+1]), f[t]))                     [B, T, 2H] -> [B, T, H], with bias (fc_bias)
    layers : Llama decoder layers; layer 0 has no input_layernorm; no final norm
    f_hat  = output of the last layer                         [B, T, H]: predicts the feature f[t+1]
    logits = lm_head(f_hat)                                    the TARGET's lm_head, frozen, not exported

The feature f is the target's final hidden state AFTER its final norm: that is what SGLang and vLLM hand an
EAGLE-1/2 draft (the hidden states their target model returns, the logits processor's input), and the
target's lm_head applies to it directly. Training regresses f_hat on f (SmoothL1) and adds a soft
cross-entropy of lm_head(f_hat) against the target distribution over the draft vocab (drafts/__init__.py).

`unroll` runs K steps over every position at once (K = 1: plain EAGLE-1 training; K > 1: the feature chain is
unrolled TTT-style, each step feeding its own prediction, with the attention pattern of drafts/ttt.py).
`Eagle1KVCache` is the serving-style incremental decoder the evaluator and the unroll test use.

Shapes: B batch, T tokens, H hidden, nh/nkv heads, D head dim, V target vocab, Vd draft vocab, L layers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eagle_trainer.drafts.layers import RMSNorm, Rotary, SwiGLU, apply_rotary, set_frozen_embedding
from eagle_trainer.drafts.ttt import shift_left, step0_attention


@dataclass(frozen=True)
class Eagle1Config:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # target vocab V (the draft decodes over all of it, with the target's lm_head)
    draft_vocab_size: int  # Vd: the vocab subset the training soft-CE is taken over
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None
    num_layers: int = 1
    fc_bias: bool = True  # SGLang's LlamaForCausalLMEagle has it; vLLM's EAGLE-1 loader does not
    target_architecture: str = ""
    algorithm: str = "eagle1"  # eagle1 | eagle2 (the same draft; eagle2 means tree decoding)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"draft.num_layers={self.num_layers}: an EAGLE-1 draft needs at least one layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Eagle1Config":
        return cls(**json.loads(Path(path).read_text()))


class Eagle1Layer(nn.Module):
    """A Llama decoder layer; layer 0 has no input_layernorm (its input is fc's output)."""

    def __init__(self, cfg: Eagle1Config, index: int):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps) if index > 0 else None
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.self_attn.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.self_attn.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.self_attn.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = SwiGLU(h, cfg.intermediate_size)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: Eagle1Config):
        """x [B, T, H] -> q [B, nh, T, D], k/v [B, nkv, T, D] (RoPE applied)."""
        h = x if self.input_layernorm is None else self.input_layernorm(x)
        b, t, _ = h.shape
        q = self.self_attn.q_proj(h).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.self_attn.k_proj(h).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.self_attn.v_proj(h).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def out(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream x [B, T, H] and attention output [B, nh, T, D] -> the layer's output [B, T, H]."""
        b, _, t, _ = attn.shape
        h = x + self.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle1Draft(nn.Module):
    def __init__(self, cfg: Eagle1Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=cfg.fc_bias)
        self.layers = nn.ModuleList(Eagle1Layer(cfg, i) for i in range(cfg.num_layers))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # the target's lm_head [V, H]: shared (set_target_weights), never saved or exported
        self.register_buffer("lm_head_weight", torch.zeros(cfg.vocab_size, cfg.hidden_size), persistent=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    def set_target_weights(self, embedding: torch.Tensor, lm_head: torch.Tensor | None, share: bool = False) -> None:
        """The target's input embedding [V, H] (frozen: copied, or with `share` held as it is where it can be,
        layers.set_frozen_embedding) and lm_head [V, H] (shared, frozen)."""
        if lm_head is None:
            raise ValueError("an EAGLE-1 draft decodes with the target's lm_head; pass it (target.output_head())")
        set_frozen_embedding(self.embed_tokens, embedding, share)
        self.lm_head_weight = lm_head.detach()

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)

    # the interface the evaluator drives (shared with Eagle3Draft)
    def target_features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """From HF `output_hidden_states` (last entry: after the final norm) -> the feature f [.., T, H]."""
        return hidden_states[-1]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features  # f enters each step through fc, together with the token

    def new_cache(self) -> "Eagle1KVCache":
        return Eagle1KVCache(self)

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, T, H] -> target-vocab logits [B, T, V] through the target's lm_head."""
        return f @ self.lm_head_weight.to(f.dtype).T

    def draft_to_target(self, ids: torch.Tensor) -> torch.Tensor:
        return ids  # logits are over the target vocab already

    def draft_logits(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, T, H] -> logits over the draft vocab [B, T, Vd] (the lm_head rows of the draft ids)."""
        ids = torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t
        return f @ self.lm_head_weight[ids].to(f.dtype).T

    def step_input(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (x[t+1]), features [B, T, H] (f[t]) -> fc output [B, T, H]."""
        emb = self.embed_tokens(tokens).to(features.dtype)
        return self.fc(torch.cat([emb, features], dim=-1))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint or export holds: all weights but the target's embedding (and lm_head)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed_tokens.")}


def unroll(draft: Eagle1Draft, input_ids: torch.Tensor, features: torch.Tensor, num_steps: int,
           attention: str = "naive", position_ids: torch.Tensor | None = None,
           documents: torch.Tensor | None = None) -> list[torch.Tensor]:
    """K steps over every position at once -> K predicted features [B, T, H].

    Step k at position t: token x[t+1+k], input feature f[t] (k = 0) or step k-1's prediction at t, RoPE
    position t + k; it predicts f[t+1+k]. Attention per layer: the step-0 keys at positions <= t plus that
    layer's step-j keys at t for j = 1..k (what a serving engine's KV cache holds for the chain after t).
    Packed batches (position_ids, documents [B, T]) follow drafts/ttt.py: RoPE position position_ids[t] + k,
    step-0 keys of t's document only."""
    attend = step0_attention(attention, documents, input_ids.device)
    cfg = draft.config
    b, t = input_ids.shape
    base_pos = torch.arange(t, device=input_ids.device).expand(b, t) if position_ids is None else position_ids
    kv0: list = [None] * cfg.num_layers  # per layer: step-0 (k, v)
    diag = [([], []) for _ in range(cfg.num_layers)]  # per layer: the later steps' k and v at t
    hidden, out = features, []
    for k in range(num_steps):
        x = draft.step_input(shift_left(input_ids, 1 + k), hidden)  # x[t+1+k]
        cos, sin = draft.rotary(base_pos + k)
        for i, layer in enumerate(draft.layers):
            q, kk, vv = layer.qkv(x, cos, sin, cfg)
            if k == 0:
                kv0[i] = (kk, vv)
            else:
                diag[i][0].append(kk)
                diag[i][1].append(vv)
            x = layer.out(x, attend(q, *kv0[i], *diag[i]))
        hidden = x
        out.append(hidden)
    return out


class Eagle1KVCache:
    """Serving-style incremental decoding: each layer's keys/values grow by the tokens fed in (as
    `eagle3.DraftKVCache`, one cache per layer)."""

    def __init__(self, draft: Eagle1Draft):
        self.draft = draft
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * draft.config.num_layers

    def extend(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Feed [B, n] tokens with their input features [B, n, H]; returns the predicted features [B, n, H].
        `allowed` [n, S] says which cached keys each new token sees (default: all earlier ones, causally)."""
        cfg = self.draft.config
        x = self.draft.step_input(tokens, features)
        cos, sin = self.draft.rotary(positions)
        for i, layer in enumerate(self.draft.layers):
            q, k, v = layer.qkv(x, cos, sin, cfg)
            if self.kv[i] is not None:
                k, v = torch.cat([self.kv[i][0], k], dim=2), torch.cat([self.kv[i][1], v], dim=2)
            self.kv[i] = (k, v)
            n, s = q.shape[2], k.shape[2]
            mask = allowed
            if mask is None:
                mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(diagonal=s - n)  # [n, S]
            x = layer.out(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        return x

    def __len__(self) -> int:
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]

    def truncate(self, length: int) -> None:
        self.kv = [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv]

"""The EAGLE-3 draft: one Llama decoder layer over [embed(token), hidden] (LlamaForCausalLMEagle3 semantics).

    g0     = fc(cat(aux_low, aux_mid, aux_high))                       [B, T, 3Ht] -> [B, T, H]
    x      = cat(input_layernorm(embed(tok)), hidden_norm(g))          [B, T, 2H]
    h      = g + o_proj(attention(q(x), k(x), v(x)))                   q/k/v read 2H
    g_next = h + mlp(post_attention_layernorm(h))                      (pre-norm, fed to the next step)
    logits = lm_head(norm(g_next))                                     [B, T, Vd]

The module exposes the step in pieces (`step_qkv`, attention outside, `step_out`) so that the TTT unroll
(drafts/ttt.py) and a serving-style KV-cached decoder (`DraftKVCache`) drive the same weights the same way.
The token embedding is the target's, frozen, and is not exported.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from eagle_trainer.drafts.layers import RMSNorm, Rotary, SwiGLU, apply_rotary, set_frozen_embedding


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    target_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # target vocab V
    draft_vocab_size: int  # Vd
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    aux_layer_ids: tuple[int, ...]  # 0-based target decoder-layer outputs
    rope_scaling: dict | None = None
    num_layers: int = 1
    target_architecture: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_layers != 1:
            raise ValueError(f"draft.num_layers={self.num_layers}: the EAGLE-3 draft has exactly one decoder layer "
                             "(the engines' LlamaForCausalLMEagle3 loads one midlayer); set draft.num_layers=1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Eagle3Config":
        raw = json.loads(Path(path).read_text())
        raw["aux_layer_ids"] = tuple(raw["aux_layer_ids"])
        return cls(**raw)


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


class Eagle3Layer(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(2 * h, cfg.num_heads * d, bias=False)
        self.self_attn.k_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.self_attn.v_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.self_attn.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = SwiGLU(h, cfg.intermediate_size)


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    def set_embedding(self, weight: torch.Tensor, share: bool = False) -> None:
        """The target's input embedding [V, Ht], frozen: copied, or with `share` held as it is where it can be
        (layers.set_frozen_embedding)."""
        set_frozen_embedding(self.embed_tokens, weight, share)

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)

    def set_target_weights(self, embedding: torch.Tensor, lm_head: torch.Tensor | None = None,
                           share: bool = False) -> None:
        """The target weights a draft reads: EAGLE-3 the embedding (`set_embedding`); it has its own lm_head."""
        self.set_embedding(embedding, share)

    def target_features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """From HF `output_hidden_states` (entry i+1 = output of decoder layer i) -> aux [.., T, 3Ht]."""
        return torch.cat([hidden_states[i + 1] for i in self.config.aux_layer_ids], dim=-1)

    def new_cache(self) -> "DraftKVCache":
        return DraftKVCache(self)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def project(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, 3Ht] -> g0 [B, T, H]."""
        return self.fc(aux_hidden)

    def step_qkv(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """tokens [B, T], hidden g [B, T, H], positions [B, T] -> q [B, nh, T, D], k/v [B, nkv, T, D]."""
        cfg, layer = self.config, self.midlayer
        emb = self.embed_tokens(tokens).to(hidden.dtype)
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(hidden)], dim=-1)  # [B, T, 2H]
        b, t, _ = x.shape
        q = layer.self_attn.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = self.rotary(positions)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def step_out(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """hidden g [B, T, H], attention output [B, nh, T, D] -> g_next [B, T, H] (pre-norm)."""
        layer = self.midlayer
        b, _, t, _ = attn.shape
        h = hidden + layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def compute_dtype(self) -> torch.dtype:
        """The dtype the draft's products run in: autocast's where it is on, else the parameters'."""
        device = self.fc.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.fc.weight.dtype

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

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint or export holds: all weights but the frozen target embedding."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed_tokens.")}


class DraftKVCache:
    """Serving-style incremental decoding for one draft: keys/values grow by the tokens fed in.

    New tokens attend to every cached key plus, causally, to each other, exactly as an engine's draft
    worker extends its cache. Used as the oracle of the TTT unroll and by the evaluator.
    """

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft
        self.k: torch.Tensor | None = None  # [B, nkv, S, D]
        self.v: torch.Tensor | None = None

    def extend(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Feed [B, n] tokens with their hidden inputs; returns g_next [B, n, H] for them.

        `allowed` [n, S] (S = cache length after appending) says which cached keys each new token sees;
        by default every earlier key and, causally, the new ones (a tree decoder passes its ancestor mask).
        """
        q, k, v = self.draft.step_qkv(tokens, hidden, positions)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        n, s = q.shape[2], self.k.shape[2]
        if allowed is None:
            allowed = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(diagonal=s - n)  # [n, S]
        attn = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=allowed, enable_gqa=True)
        return self.draft.step_out(hidden, attn)

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def truncate(self, length: int) -> None:
        self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]

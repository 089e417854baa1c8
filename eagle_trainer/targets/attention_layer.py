"""Binding the attention-glue kernels (kernels/attention_glue) into HF's full-attention modules, per instance.

HF's gated attention (`Qwen3NextAttention.forward`) stays the model definition: our forward reuses the module's
projections, norm weights, attention function (`config._attn_implementation`: sdpa, or targets/packed_attention's
flex for packed batches) and o_proj, and swaps the element-wise work between them for two kernels:
- q/k: HF chunks q_proj's output into query and gate (interleaved per head), norms each head (a copy, as the query
  is strided), transposes, and applies partial RoPE through slices, rotate_half's cat, products, a sum and another
  cat. `qk_norm_rope` reads the query where q_proj wrote it and writes q and k once each, as [B, T, H, D] rows
  whose [B, H, T, D] view the attention function takes as it is;
- output: HF copies the strided gate out, takes its sigmoid and multiplies; `sigmoid_gate` reads it in place.
The frozen target's training forward has no cache; any call with one (evaluation's decoding) goes to HF's
forward, as does eager attention (HF's `eager_attention_forward` is not in the shared attention registry).

    attn_layer_impl   auto (the default: triton on a GPU, else hf) | hf | triton (GPU, or the CPU under
                      TRITON_INTERPRET=1)

Shapes: B batch, T tokens, H/Hkv query/key-value heads, D head dim, R rotary dims.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from eagle_trainer.targets.moe import bind_instances, resolve_kernel_impl

IMPLEMENTATIONS = ("auto", "triton", "hf")
HF_FORWARD_ARGUMENTS = ("cache", "past_key_values")  # (transformers 5 renamed past_key_values to cache)


def _gated_attention_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings=None,
                             attention_mask=None, *args, **kwargs):
    if args or any(kwargs.get(name) is not None for name in HF_FORWARD_ARGUMENTS) \
            or self.config._attn_implementation == "eager":
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    from eagle_trainer.kernels.attention_glue import qk_norm_rope, sigmoid_gate
    for name in HF_FORWARD_ARGUMENTS:
        kwargs.pop(name, None)
    b, t, _ = hidden_states.shape
    d = self.head_dim
    query_gate = self.q_proj(hidden_states).view(b, t, -1, 2 * d)  # [B, T, H, 2D]: each head's query, then its gate
    cos, sin = position_embeddings  # [B, T, R]
    query = qk_norm_rope(query_gate[..., :d], self.q_norm.weight, self.q_norm.eps, cos, sin, zero_centred=True)
    key = qk_norm_rope(self.k_proj(hidden_states).view(b, t, -1, d), self.k_norm.weight, self.k_norm.eps, cos, sin,
                       zero_centred=True)  # [B, T, Hkv, D]
    value = self.v_proj(hidden_states).view(b, t, -1, d)
    attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attention(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             **kwargs)  # out [B, T, H, D]
    return self.o_proj(sigmoid_gate(out, query_gate[..., d:])), weights


def resolve_attn_layer_impl(impl: str, device: torch.device) -> str:
    return resolve_kernel_impl("attn_layer_impl", impl, IMPLEMENTATIONS, device)


def bind_gated_attention(model: nn.Module, cfg: Any, class_names: tuple[str, ...]) -> str:
    """Give every instance of `class_names` (Qwen3-Next's gated attention) our forward, or HF's back, per
    `cfg.attn_layer_impl`; returns the implementation bound."""
    impl = resolve_attn_layer_impl(cfg.attn_layer_impl, next(model.parameters()).device)
    if "full_attention" not in getattr(model.config, "layer_types", ("full_attention",)):
        return impl  # linear-attention layers only: nothing to bind
    return bind_instances(model, "attn_layer_impl", impl, class_names, _gated_attention_forward)

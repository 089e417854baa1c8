"""Binding the attention-glue kernels (kernels/attention_glue) into HF's full-attention modules, per instance.

HF's gated attention (`Qwen3NextAttention.forward`) stays the model definition: our forward reuses the module's
projections, norm weights, attention function (`config._attn_implementation`: sdpa, or targets/packed_attention's
flex for packed batches) and o_proj, and swaps the element-wise work between them for two kernels:
- q/k: HF chunks q_proj's output into query and gate (interleaved per head), norms each head (a copy, as the query
  is strided), transposes, and applies partial RoPE through slices, rotate_half's cat, products, a sum and another
  cat. `qk_norm_rope` reads the query where q_proj wrote it and writes q and k once each, as [B, T, H, D] rows
  whose [B, H, T, D] view the attention function takes as it is;
- output: HF copies the strided gate out, takes its sigmoid and multiplies; `sigmoid_gate` reads it in place.
SDPA's backend: the process runs without cuDNN's attention (app/runtime.sdpa_without_cudnn: it builds a graph per
new shape). With EAGLE_CUDNN_SDPA=repeated (off by default: it made the full-depth step slower), a layer whose call
has the shape, strides and no mask of its calls in 32 earlier forwards puts cuDNN first for it
(kernels/utils.RepeatedShapes: rows cut at data.max_length or of one fixed length recur, the long tail of lengths
builds no graph): on an H100 at head dim 256 cuDNN's attention call alone takes half of FlashAttention-2's time.
The frozen target's training forward has no cache; any call with one (evaluation's decoding) goes to HF's
forward, as does eager attention (HF's `eager_attention_forward` is not in the shared attention registry).

    attn_layer_impl   auto (the default: triton on a GPU, else hf) | hf | triton (GPU, or the CPU under
                      TRITON_INTERPRET=1)

Shapes: B batch, T tokens, H/Hkv query/key-value heads, D head dim, R rotary dims.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from eagle_trainer.kernels.utils import RepeatedShapes, layout_key
from eagle_trainer.targets.moe import bind_instances, resolve_kernel_impl
from eagle_trainer.targets.packed_attention import runs_sdpa

IMPLEMENTATIONS = ("auto", "triton", "hf")
HF_FORWARD_ARGUMENTS = ("cache", "past_key_values")  # (transformers 5 renamed past_key_values to cache)


CUDNN_SHAPES = RepeatedShapes(part="target")  # (layer, call layout) of this process's target forwards so far
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def sdpa_backends(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask):
    """A context for `module`'s attention call: with CUDNN_SHAPES on (EAGLE_CUDNN_SDPA=repeated or 1), cuDNN first
    among SDPA's backends once this layer made calls of the same layout without a mask in CUDNN_SHAPES.after earlier
    forwards (16-bit, on a GPU, through HF's sdpa function: `attn_implementation` sdpa, or packed_attention's outside
    a packed forward); otherwise nothing."""
    if not CUDNN_SHAPES.enabled or not runs_sdpa(module.config._attn_implementation) or attention_mask is not None \
            or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) \
            or not CUDNN_SHAPES.repeated((id(module), *layout_key(q, k, v))):
        return contextlib.nullcontext()
    return sdpa_kernel(CUDNN_FIRST, set_priority=True)


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
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    with sdpa_backends(self, q, k, v, attention_mask):
        out, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                 dropout=0.0 if not self.training else self.attention_dropout, **kwargs)  # [B, T, H, D]
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

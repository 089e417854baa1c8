"""Binding the Triton GDN core (kernels/gdn) into HF's Qwen3-Next linear-attention modules, per instance.

HF's `Qwen3NextGatedDeltaNet.forward` stays the model definition: our forward reuses the module's own
projections, `fix_query_key_value_ordering`, conv weight, A_log, dt_bias, gated-norm weight and out_proj, and
swaps the four steps between them for our kernels (conv1d + SiLU, g/beta gating, the chunked gated delta rule,
the gated RMSNorm). The frozen target's training forward has no cache and no attention mask (batches are
right-padded: the causal conv and the delta rule never carry padding into earlier tokens); any call with a
cache (evaluation's incremental decoding) or a mask goes to HF's original forward.

Packed batches (data.pack): FrozenTarget sets the documents' starts (targets/packing.py) around the forward,
and our forward hands them to the conv and the delta rule as cu_seqlens, so both restart at each document.
HF's torch path cannot: with gdn_impl=hf each module gets a forward pre-hook that refuses a packed batch
(ValueError naming the fixes) and leaves HF's forward to run unchanged otherwise.

    gdn_impl   auto (the default: triton on a GPU, else hf) | hf | triton (GPU, or the CPU under
               TRITON_INTERPRET=1)

Shapes: B batch, T tokens, C conv channels (2*Hk*Dk + Hv*Dv), Hk/Hv key/value heads, Dk/Dv head dims.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eagle_trainer.targets.moe import bind_instances, resolve_kernel_impl
from eagle_trainer.targets.packing import current_documents, refuse_documents

IMPLEMENTATIONS = ("auto", "triton", "hf")
LINEAR_ATTENTION_CLASS = "Qwen3NextGatedDeltaNet"


def _refuse_packed(module: nn.Module, args) -> None:
    """Forward pre-hook on HF's linear attention: its state would run on from one packed document into the next."""
    refuse_documents("HF's gated delta net forward (target.gdn_impl=hf, or auto off the GPU)",
                     "set target.gdn_impl=triton (on the CPU with TRITON_INTERPRET=1)")


def _gdn_forward(self: nn.Module, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    if cache_params is not None or attention_mask is not None:
        _refuse_packed(self, ())
        return type(self).forward(self, hidden_states, cache_params=cache_params, attention_mask=attention_mask,
                                  **kwargs)
    from eagle_trainer.kernels.gdn import causal_conv1d_silu, chunk_gated_delta_rule, gated_rms_norm, gdn_gating
    cu_seqlens = current_documents()  # [D+1] of a packed batch (B = 1): conv and state restart per document
    b, t, _ = hidden_states.shape
    query, key, value, z, beta_in, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                                         self.in_proj_ba(hidden_states))
    mixed = torch.cat([x.reshape(b, t, -1) for x in (query, key, value)], dim=-1)  # [B, T, C]
    mixed = causal_conv1d_silu(mixed, self.conv1d.weight, self.conv1d.bias, cu_seqlens=cu_seqlens)
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(b, t, -1, self.head_k_dim)  # [B, T, Hk, Dk]
    key = key.reshape(b, t, -1, self.head_k_dim)
    value = value.reshape(b, t, -1, self.head_v_dim)  # [B, T, Hv, Dv]
    g, beta = gdn_gating(a, beta_in, self.A_log, self.dt_bias)  # [B, T, Hv]
    core = chunk_gated_delta_rule(query, key, value, g, beta, cu_seqlens=cu_seqlens, l2norm_qk=True)  # [B, T, Hv, Dv]
    core = gated_rms_norm(core, z, self.norm.weight, self.norm.variance_epsilon)
    return self.out_proj(core.reshape(b, t, -1))


def resolve_gdn_impl(impl: str, device: torch.device) -> str:
    return resolve_kernel_impl("gdn_impl", impl, IMPLEMENTATIONS, device)


def bind_gdn(model: nn.Module, cfg: Any) -> str:
    """Give every linear-attention module of `model` our forward, or HF's back behind the packed-batch guard, per
    `cfg.gdn_impl`; returns the implementation bound."""
    impl = resolve_gdn_impl(cfg.gdn_impl, next(model.parameters()).device)
    bind_instances(model, "gdn_impl", impl, (LINEAR_ATTENTION_CLASS,), _gdn_forward)
    for module in model.modules():
        if type(module).__name__ == LINEAR_ATTENTION_CLASS:
            guard = module.__dict__.pop("_eagle_packing_guard", None)  # from an earlier binding
            if guard is not None:
                guard.remove()
            if impl != "triton":
                module._eagle_packing_guard = module.register_forward_pre_hook(_refuse_packed)
    return impl

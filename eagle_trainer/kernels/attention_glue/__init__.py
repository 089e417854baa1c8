"""The element-wise work of a target's full-attention layer around its attention kernel, one launch each.

    qk_norm_rope(x [B, T, H, D], weight [D], eps, cos, sin [B, T, R], zero_centred) -> [B, T, H, D]
    sigmoid_gate(attn [B, T, H, D], gate [B, T, H, D]) -> [B, T, H * D]

    norm_rope.py   per-head RMSNorm of q or k, then RoPE on the first R dims (HF's rotate_half form)
    gate.py        Qwen3-Next's output gate: attention output * sigmoid(gate)
    reference.py   both in plain torch, HF's arithmetic step by step

Both read strided views where HF copies first (Qwen3-Next's q and gate are interleaved per head in q_proj's
output) and write contiguous [B, T, H, D] rows, the layout the attention kernels read without a transpose copy.
Rows are independent: batch invariant by construction. Bound into the targets by targets/attention_layer.py.
"""

from eagle_trainer.kernels.attention_glue.gate import sigmoid_gate
from eagle_trainer.kernels.attention_glue.norm_rope import qk_norm_rope

__all__ = ["qk_norm_rope", "sigmoid_gate"]

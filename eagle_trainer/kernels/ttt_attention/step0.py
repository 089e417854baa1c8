"""Step 0 of TTT attention: one library attention call over the step-0 keys that also returns its log-sum-exp.

Unpacked batches: FlashAttention-2, and cuDNN's fused attention for a shape that keeps coming (`Causal`; unless
EAGLE_CUDNN_SDPA=0); packed batches: FlashAttention-2 varlen (each document is one sequence); the CPU
(tests): aten's CPU flash attention. Grouped-query heads are read as they are.
Each class has forward(q, k, v, scale) -> (out [B, nh, T, D], lse [B, nh, T] fp32, saved) and
backward(dout, q, k, v, out, lse, saved, scale) -> (dq, dk, dv); the backward may be handed the merged out and lse
(see attention.py).
"""

from __future__ import annotations

import torch

from eagle_trainer.kernels.utils import RepeatedShapes, layout_key

CUDNN_SHAPES = RepeatedShapes(part="draft")  # the step-0 problem shapes of this process's unrolls so far


def cudnn_takes_head_dim(head_dim: int, device: torch.device) -> bool:
    """Whether cuDNN's fused attention runs forward and backward at `head_dim` on `device`: up to 128 from Ampere on,
    up to 256 on Hopper (cuDNN's support matrix; Qwen3-Next's drafts have 256)."""
    return head_dim <= 128 or (head_dim <= 256 and torch.cuda.get_device_capability(device)[0] == 9)


class FlashCausal:
    """Step 0 of an unpacked batch at a new shape: FlashAttention-2, causal (grouped-query heads native)."""

    def forward(self, q, k, v, scale):
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
        return res[0], res[1], res[2:8]  # out [B, nh, T, D]; lse [B, nh, T]; cum_q, cum_k, max_q, max_k, rng, unused

    def backward(self, dout, q, k, v, out, lse, saved, scale):
        cum_q, cum_k, max_q, max_k, rng, unused = saved
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, rng, unused, scale=scale)


class CudnnCausal:
    """Step 0 of an unpacked batch at a frequent shape: cuDNN's fused attention, causal (grouped-query heads
    native). Faster than FlashAttention-2 on Hopper, but cuDNN builds an execution graph on the host for every new
    shape (batch, length, strides): `Causal` picks it only for shapes that keep coming."""

    def forward(self, q, k, v, scale):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
        return res[0], res[1].reshape(q.shape[:3]).contiguous(), res[2:8]  # lse [B, nh, T, 1] -> [B, nh, T]

    def backward(self, dout, q, k, v, out, lse, saved, scale):
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True,
            scale=scale)


class Causal:
    """Step 0 of an unpacked batch: CudnnCausal once `shapes` (default CUDNN_SHAPES, on unless
    EAGLE_CUDNN_SDPA=0) counted this unroll's layout in 32 earlier unrolls, FlashCausal otherwise;
    picked at the unroll's first call and kept for its steps and their backward. Unpacked batches are padded to
    their longest row, so a layout recurs where the data's lengths do (rows cut at data.max_length, fixed-length
    rows, a benchmark); lengths that come a few times build no cuDNN graph. cuDNN is taken for 16-bit inputs at the
    head dims it runs both ways (`cudnn_takes_head_dim`; tests/drafts/test_attention.py checks 128 and, on Hopper,
    256 on a GPU)."""

    def __init__(self, shapes: RepeatedShapes | None = None):
        self.shapes, self.impl = shapes if shapes is not None else CUDNN_SHAPES, None

    def forward(self, q, k, v, scale):
        if self.impl is None:
            cudnn = self.shapes.enabled and q.dtype in (torch.float16, torch.bfloat16) \
                and cudnn_takes_head_dim(q.shape[-1], q.device) and self.shapes.repeated(layout_key(q, k, v))
            self.impl = CudnnCausal() if cudnn else FlashCausal()
        return self.impl.forward(q, k, v, scale)

    def backward(self, dout, q, k, v, out, lse, saved, scale):
        return self.impl.backward(dout, q, k, v, out, lse, saved, scale)


class FlashVarlenCausal:
    """Step 0 of a packed row (B = 1): FlashAttention-2 varlen, each document one causal sequence."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int):
        self.cu, self.max_len = cu_seqlens.to(torch.int32), max_len

    @staticmethod
    def _tokens(x):  # [1, n, T, D] -> [T, n, D] with unit stride in D
        x = x.squeeze(0).transpose(0, 1)  # views (not x[0]: tests/kernels/test_ttt_attention_step0.py fakes them)
        return x if x.stride(-1) == 1 else x.contiguous()

    def forward(self, q, k, v, scale):
        q3, k3, v3 = (self._tokens(x) for x in (q, k, v))
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q3, k3, v3, self.cu, self.cu, self.max_len, self.max_len, 0.0, True, False, scale=scale)
        return out.transpose(0, 1).unsqueeze(0), lse.unsqueeze(0), (rng, unused)  # out [1, nh, T, D]; lse [1, nh, T]

    def backward(self, dout, q, k, v, out, lse, saved, scale):
        rng, unused = saved
        q3, k3, v3, o3, do3 = (self._tokens(x) for x in (q, k, v, out, dout))
        grads = torch.ops.aten._flash_attention_backward(
            do3, q3, k3, v3, o3, lse.squeeze(0), self.cu, self.cu, self.max_len, self.max_len, 0.0, True, rng, unused,
            scale=scale)
        return tuple(g.transpose(0, 1).unsqueeze(0) for g in grads)


class CpuFlash:
    """Step 0 on the CPU (tests): aten's CPU flash attention, causal or under a [B, 1, T, T] same-document mask."""

    def __init__(self, allowed: torch.Tensor | None = None):
        self.allowed = allowed  # bool [B, 1, T, T] or None (causal)

    def _bias(self, q):  # the op takes an additive mask in q's dtype
        if self.allowed is None:
            return None
        return torch.zeros(self.allowed.shape, dtype=q.dtype).masked_fill_(~self.allowed, float("-inf"))

    def forward(self, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, self.allowed is None, attn_mask=self._bias(q), scale=scale)
        return out, lse.contiguous(), None

    def backward(self, dout, q, k, v, out, lse, saved, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, self.allowed is None, attn_mask=self._bias(q), scale=scale)


def step0_kernel(device: torch.device, documents: torch.Tensor | None = None,
                 shapes: RepeatedShapes | None = None):
    """The step-0 attention for a batch: Causal (FlashAttention-2, or cuDNN for a layout `shapes` counted 32 times
    when the switch is on) / FlashVarlenCausal (packed, from `documents` [1, T]) on a GPU, CpuFlash on the CPU.
    Built once per unroll (a packed row's document bounds cost one host sync)."""
    if device.type != "cuda":
        if documents is None:
            return CpuFlash()
        t = documents.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=documents.device).tril()
        return CpuFlash((causal & (documents[:, :, None] == documents[:, None, :]))[:, None])
    if documents is None:
        return Causal(shapes)
    if documents.shape[0] != 1:
        raise ValueError(f"packed TTT attention takes one row of documents, got documents {tuple(documents.shape)}")
    starts = torch.nonzero(documents[0, 1:] != documents[0, :-1]).flatten() + 1
    n = documents.shape[1]
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), n)])
    return FlashVarlenCausal(cu, int((cu[1:] - cu[:-1]).max()))

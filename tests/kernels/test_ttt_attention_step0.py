"""The GPU step-0 kernels' calls into torch's attention ops, checked on any machine with fake CUDA tensors.

The ops (FlashAttention-2, dense and varlen, and cuDNN's fused attention) run on a GPU only, and their Python
signatures are private to torch: under FakeTensorMode the calls go through torch's own shape functions, so a changed
argument order, result tuple or log-sum-exp layout in a torch release shows here, on the CPU, rather than on the
device. What the kernels compute is checked on a GPU (tests/drafts/test_attention.py, gpu-marked).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from eagle_trainer.kernels.ttt_attention.step0 import (CudnnCausal, FlashCausal, FlashVarlenCausal,
                                                       cudnn_takes_head_dim, step0_kernel)
from eagle_trainer.kernels.utils import RepeatedShapes


def draft_layout(b, t, heads, d):
    """[B, heads, T, D] strided as the draft makes them (token-major, heads transposed in)."""
    return torch.empty(b, t, heads, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)


@pytest.mark.parametrize("b,t,heads,kv_heads,d", [(2, 301, 32, 4, 128), (1, 77, 9, 3, 64)])
def test_flash_causal_calls_take_grouped_heads(b, t, heads, kv_heads, d):
    with FakeTensorMode():
        q, dout = draft_layout(b, t, heads, d), draft_layout(b, t, heads, d)
        k, v = draft_layout(b, t, kv_heads, d), draft_layout(b, t, kv_heads, d)
        for step0 in (FlashCausal(), CudnnCausal()):
            out, lse, saved = step0.forward(q, k, v, d ** -0.5)
            assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
            assert lse.shape == (b, heads, t) and lse.dtype == torch.float32 and lse.is_contiguous()
            dq, dk, dv = step0.backward(dout, q, k, v, out, lse, saved, d ** -0.5)
            assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_an_unroll_takes_cudnn_for_a_shape_an_earlier_unroll_had():
    """Causal (the unpacked step 0) picks at its first call and keeps the pick for its steps and backward:
    FlashAttention-2 for a layout new to the process, cuDNN once `after` earlier unrolls had it (here 1); fp32
    never cuDNN."""
    shapes, device = RepeatedShapes(after=1, enabled=True), torch.device("cuda", 0)

    def pick(t, heads=8, dtype=torch.bfloat16):
        step0 = step0_kernel(device, shapes=shapes)
        q = torch.empty(1, t, heads, 64, dtype=dtype, device="cuda").transpose(1, 2)
        k = torch.empty(1, t, 2, 64, dtype=dtype, device="cuda").transpose(1, 2)
        step0.forward(q, k, k, 0.125)
        first = type(step0.impl)
        step0.forward(q, k, k, 0.125)  # the unroll's later steps keep the pick
        assert type(step0.impl) is first
        return first.__name__

    with FakeTensorMode():
        assert [pick(300), pick(300), pick(301), pick(300, heads=4), pick(301)] == \
            ["FlashCausal", "CudnnCausal", "FlashCausal", "FlashCausal", "CudnnCausal"]
        assert [pick(50, dtype=torch.float32), pick(50, dtype=torch.float32)] == ["FlashCausal"] * 2


@pytest.mark.parametrize("capability,takes_256", [((9, 0), True), ((8, 0), False), ((10, 0), False)])
def test_cudnn_takes_head_dim_256_on_hopper_only(monkeypatch, capability, takes_256):
    """Head dims up to 128 go to cuDNN on any GPU; 256 (Qwen3-Next's drafts) on Hopper only, where cuDNN's backward
    runs it; past 256 never."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    device = torch.device("cuda", 0)
    assert cudnn_takes_head_dim(64, device) and cudnn_takes_head_dim(128, device)
    assert cudnn_takes_head_dim(256, device) == takes_256
    assert not cudnn_takes_head_dim(257, device) and not cudnn_takes_head_dim(512, device)


def test_flash_varlen_calls_take_a_packed_row():
    t, heads, kv_heads, d = 250, 16, 4, 64
    with FakeTensorMode():
        q, dout = draft_layout(1, t, heads, d), draft_layout(1, t, heads, d)
        k, v = draft_layout(1, t, kv_heads, d), draft_layout(1, t, kv_heads, d)
        cu = torch.empty(4, dtype=torch.int64, device="cuda")  # three documents; the values are the kernel's
        step0 = FlashVarlenCausal(cu, max_len=120)
        out, lse, saved = step0.forward(q, k, v, d ** -0.5)
        assert out.shape == q.shape and lse.shape == (1, heads, t) and lse.dtype == torch.float32
        dq, dk, dv = step0.backward(dout, q, k, v, out, lse, saved, d ** -0.5)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

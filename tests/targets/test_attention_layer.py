"""When the bound full-attention layer puts cuDNN first among SDPA's backends (targets/attention_layer.py), checked
on any machine with fake CUDA tensors; the kernels themselves run in tests/targets/test_qwen3_next.py."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from eagle_trainer.kernels.utils import RepeatedShapes
from eagle_trainer.targets import attention_layer
from eagle_trainer.targets.packed_attention import NAME
from eagle_trainer.targets.packing import documents


@pytest.mark.parametrize("implementation", ["sdpa", NAME])
def test_cudnn_first_for_a_layout_that_came_before_through_sdpa(implementation, monkeypatch):
    """sdpa, or the packed-attention wrapper that every GPU run binds (outside a packed forward it calls sdpa): from
    the second forward of a layout on (after=1 here), cuDNN first. Never for the wrapper inside a packed forward
    (flex runs; under plain sdpa a packed forward gets HF's mask), with a mask, in fp32 or on the CPU."""
    monkeypatch.setattr(attention_layer, "CUDNN_SHAPES", RepeatedShapes(after=1, enabled=True))
    layer = SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation))

    def cudnn_first(device="cuda", dtype=torch.bfloat16, mask=None, t=40):
        q = torch.empty(1, t, 4, 16, dtype=dtype, device=device).transpose(1, 2)
        k = torch.empty(1, t, 2, 16, dtype=dtype, device=device).transpose(1, 2)
        context = attention_layer.sdpa_backends(layer, q, k, k, mask)
        return not isinstance(context, contextlib.nullcontext)

    with FakeTensorMode():
        assert [cudnn_first(), cudnn_first(), cudnn_first(t=41)] == [False, True, False]
        assert not cudnn_first(mask=torch.empty(1, 1, 40, 40, dtype=torch.bool, device="cuda"))
        assert [cudnn_first(dtype=torch.float32) for _ in range(2)] == [False, False]
        with documents(torch.tensor([0, 20, 40])):  # a packed forward: flex under NAME (sdpa gets HF's mask)
            assert cudnn_first() == (implementation == "sdpa")
    assert [cudnn_first(device="cpu") for _ in range(2)] == [False, False]

"""The fused RMSNorm against HF's arithmetic (reference.py), interpreted on the CPU and compiled on a GPU."""

import pytest
import torch

from eagle_trainer.kernels.rmsnorm import rms_norm
from eagle_trainer.kernels.rmsnorm.reference import rms_norm_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("shape", [(1, 48), (37, 80), (3, 5, 128), (300, 2048)])
def test_rms_norm_matches_reference_fp32(shape):
    g = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE)
    w = torch.randn(shape[-1], generator=g).to(DEVICE)
    out = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, rms_norm_reference(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_of_a_strided_view_and_bad_weight():
    x = torch.randn(6, 4, 32, device=DEVICE).transpose(0, 1)  # not contiguous
    w = torch.rand(32, device=DEVICE)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        rms_norm(x, torch.ones(31, device=DEVICE), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2048), (4097, 32, 128)])
def test_gpu_rms_norm_bf16_matches_hf_module(shape):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm
    norm = Qwen3MoeRMSNorm(shape[-1], eps=1e-6).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16) * 4
    out, ref = rms_norm(x, norm.weight, 1e-6), norm(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    # Same arithmetic; only the order of the fp32 sum of squares differs, so almost every element is bit-equal.
    assert (out == ref).float().mean() > 0.99
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)

"""The fused RMSNorm against HF's arithmetic (reference.py), plain and zero-centred, interpreted on the CPU and
compiled on a GPU. Outputs are allocated NaN-poisoned, so an element the kernel does not write fails."""

import pytest
import torch
from kernel_checks import poison

from eagle_trainer.kernels.rmsnorm import fused as fused_mod
from eagle_trainer.kernels.rmsnorm import rms_norm
from eagle_trainer.kernels.rmsnorm.reference import rms_norm_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    poison(monkeypatch, fused_mod)


@pytest.mark.parametrize("zero_centred", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (37, 80), (3, 5, 128), (300, 2048), (65, 257)])
def test_rms_norm_matches_reference_fp32(poisoned, shape, zero_centred):
    g = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE)
    w = torch.randn(shape[-1], generator=g).to(DEVICE)
    out = rms_norm(x, w, 1e-6, zero_centred=zero_centred)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, rms_norm_reference(x, w, 1e-6, zero_centred), rtol=1e-5, atol=1e-6)


def test_zero_centred_weight_is_an_offset_from_one(poisoned):
    """A zero weight leaves x_hat unscaled (HF initialises Qwen3NextRMSNorm's weight to zeros); the plain form
    would give zeros. The two forms agree when the plain weight is 1 + the zero-centred one."""
    x = torch.randn(7, 96, device=DEVICE)
    w = torch.randn(96, device=DEVICE) * 0.1
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(x, torch.zeros_like(w), 1e-6, zero_centred=True), x_hat)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, zero_centred=True), rms_norm(x, 1 + w, 1e-6),
                               rtol=1e-6, atol=1e-6)


def test_rms_norm_matches_hf_qwen3_next_module_fp32(poisoned):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm
    norm = Qwen3NextRMSNorm(144, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.3)
    x = torch.randn(2, 51, 144, device=DEVICE) * 4
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps, zero_centred=True), norm(x).detach(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zero_centred", [False, True])
def test_rms_norm_of_a_strided_view_and_bad_weight(poisoned, zero_centred):
    x = torch.randn(6, 4, 32, device=DEVICE).transpose(0, 1)  # not contiguous
    w = torch.rand(32, device=DEVICE)
    torch.testing.assert_close(rms_norm(x, w, 1e-5, zero_centred=zero_centred),
                               rms_norm_reference(x, w, 1e-5, zero_centred), rtol=1e-5, atol=1e-6)
    assert rms_norm(x[:0], w, 1e-5, zero_centred=zero_centred).shape == (0, 6, 32)
    with pytest.raises(ValueError, match="does not fit"):
        rms_norm(x, torch.ones(31, device=DEVICE), 1e-5, zero_centred=zero_centred)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2048), (4097, 32, 128)])
def test_gpu_rms_norm_bf16_matches_hf_module(poisoned, shape):
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


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2048), (4097, 16, 256), (333, 2, 256)])
def test_gpu_zero_centred_bf16_matches_hf_qwen3_next_module(poisoned, shape):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm
    norm = Qwen3NextRMSNorm(shape[-1], eps=1e-6).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.1)
    x = torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16) * 4
    out, ref = rms_norm(x, norm.weight, norm.eps, zero_centred=True), norm(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert (out == ref).float().mean() > 0.99
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)

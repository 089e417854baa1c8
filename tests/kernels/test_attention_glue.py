"""The attention layer's fused q/k norm + RoPE and sigmoid output gate against HF's arithmetic (reference.py),
interpreted on the CPU and compiled on a GPU, at odd sizes, on the strided views the binding passes. Outputs are
allocated NaN-poisoned, so an element a kernel does not write fails."""

import pytest
import torch
from kernel_checks import compile_for_hopper, poison

from eagle_trainer.kernels.attention_glue import gate as gate_mod
from eagle_trainer.kernels.attention_glue import norm_rope as norm_rope_mod
from eagle_trainer.kernels.attention_glue import qk_norm_rope, sigmoid_gate
from eagle_trainer.kernels.attention_glue.reference import qk_norm_rope_reference, sigmoid_gate_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the 16-bit dtype whose rounding is checked: bf16 compiled; fp16 interpreted (Triton's interpreter truncates to bf16
# where the GPU rounds to nearest even, but rounds to fp16 as the GPU does)
HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16


@pytest.fixture
def poisoned(monkeypatch):
    poison(monkeypatch, norm_rope_mod, gate_mod)


def _rope(batch, tokens, rotary, g, dtype):
    """cos/sin as HF's rotary embedding makes them: cat(freqs, freqs) of per-token positions, in the model dtype."""
    positions = torch.randint(0, 4000, (batch, tokens, 1), generator=g).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    freqs = positions * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def _inputs(shape, rotary, cos_batch, dtype, seed):
    """x as a strided view: each head's D values followed by D others (Qwen3-Next's query | gate interleave)."""
    batch, tokens, heads, dim = shape
    g = torch.Generator().manual_seed(seed)
    both = (torch.randn(batch, tokens, heads, 2 * dim, generator=g) * 3).to(DEVICE, dtype)
    weight = (torch.randn(dim, generator=g) * 0.3).to(DEVICE, dtype)
    cos, sin = _rope(cos_batch, tokens, rotary, g, dtype)
    return both[..., :dim], weight, cos, sin


CASES = [((1, 37, 3, 80), 80, 1), ((2, 19, 5, 96), 32, 2), ((3, 5, 2, 256), 64, 1), ((1, 1, 1, 48), 16, 1),
         ((2, 70, 16, 128), 128, 2)]


@pytest.mark.parametrize("zero_centred", [False, True])
@pytest.mark.parametrize("shape, rotary, cos_batch", CASES)
def test_qk_norm_rope_matches_reference_fp32(poisoned, shape, rotary, cos_batch, zero_centred):
    x, weight, cos, sin = _inputs(shape, rotary, cos_batch, torch.float32, seed=shape[1])
    assert not x.is_contiguous() or x.shape[1] * x.shape[2] == 1
    out = qk_norm_rope(x, weight, 1e-6, cos, sin, zero_centred=zero_centred)
    assert out.shape == x.shape and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, qk_norm_rope_reference(x, weight, 1e-6, cos, sin, zero_centred),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_centred", [False, True])
def test_qk_norm_rope_16_bit_rounds_as_hf(poisoned, zero_centred):
    """In 16 bits every product and the sum are rounded as HF's ops round them: nearly every element is bit-equal (the
    norm's fp32 sum runs in another order than torch's mean, which may move a rounding by one ulp)."""
    x, weight, cos, sin = _inputs((2, 67, 4, 256), 64, 2, HALF, seed=5)
    out = qk_norm_rope(x, weight, 1e-6, cos, sin, zero_centred=zero_centred)
    ref = qk_norm_rope_reference(x, weight, 1e-6, cos, sin, zero_centred)
    assert out.dtype == ref.dtype == HALF
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    assert (out == ref).float().mean().item() > 0.99


def test_qk_norm_rope_plain_norm_rounds_x_hat_to_x_dtype(poisoned):
    """The plain norm with a wider weight (HF: weight * x_hat.to(x.dtype), promoted): x_hat is rounded to x's 16-bit
    dtype, the rest runs in the weight's fp32, so nearly every element is bit-equal to HF's arithmetic."""
    x, _, cos, sin = _inputs((1, 29, 3, 64), 32, 1, HALF, seed=7)
    weight = torch.randn(64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out = qk_norm_rope(x, weight, 1e-6, cos, sin)
    ref = qk_norm_rope_reference(x, weight, 1e-6, cos, sin)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=1e-3)  # a rare x_hat one 16-bit ulp apart (sum order)
    assert (out == ref).float().mean().item() > 0.99


def test_qk_norm_rope_leaves_the_dims_past_r_normed_only(poisoned):
    """Partial RoPE: a zero sin and unit cos leave every dim the norm's; the dims past R never see cos or sin."""
    x, weight, cos, sin = _inputs((1, 9, 2, 64), 16, 1, torch.float32, seed=1)
    normed = qk_norm_rope_reference(x, weight, 1e-6, cos[..., :0], sin[..., :0], zero_centred=True)
    out = qk_norm_rope(x, weight, 1e-6, torch.ones_like(cos), torch.zeros_like(sin), zero_centred=True)
    torch.testing.assert_close(out, normed, rtol=1e-6, atol=1e-6)
    out = qk_norm_rope(x, weight, 1e-6, cos, sin, zero_centred=True)
    torch.testing.assert_close(out[..., 16:], normed[..., 16:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[..., :16], normed[..., :16])


def test_qk_norm_rope_refuses_bad_shapes(poisoned):
    x, weight, cos, sin = _inputs((1, 5, 2, 32), 16, 1, torch.float32, seed=0)
    with pytest.raises(ValueError, match="R even <= D"):
        qk_norm_rope(x, weight[:31], 1e-6, cos, sin)
    with pytest.raises(ValueError, match="R even <= D"):
        qk_norm_rope(x, weight, 1e-6, cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="R even <= D"):
        qk_norm_rope(x, weight, 1e-6, cos[:, :4], sin[:, :4])
    assert qk_norm_rope(x[:, :0], weight, 1e-6, cos[:, :0], sin[:, :0]).shape == (1, 0, 2, 32)


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("shape", [(1, 37, 3, 80), (2, 19, 5, 96), (3, 5, 16, 256), (1, 1, 1, 48)])
def test_sigmoid_gate_matches_reference(poisoned, shape, dtype):
    """The gate as the binding passes it (every other half-row of q_proj's output), the attention output as a
    [B, T, H, D] view of a [B, H, T, D] tensor."""
    batch, tokens, heads, dim = shape
    g = torch.Generator().manual_seed(tokens)
    both = (torch.randn(batch, tokens, heads, 2 * dim, generator=g) * 4).to(DEVICE, dtype)
    attn = torch.randn(batch, heads, tokens, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    out = sigmoid_gate(attn, both[..., dim:])
    ref = sigmoid_gate_reference(attn, both[..., dim:])
    assert out.shape == (batch, tokens, heads * dim) and out.is_contiguous() and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:  # the sigmoid and the product rounded as HF's ops round them
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
        assert (out == ref).float().mean().item() > 0.99


def test_sigmoid_gate_refuses_mismatched_inputs(poisoned):
    attn = torch.randn(1, 3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one dtype"):
        sigmoid_gate(attn, attn.double())
    with pytest.raises(ValueError, match="one dtype"):
        sigmoid_gate(attn, attn[..., :4])


@pytest.mark.parametrize("zero_centred", [False, True])
def test_kernels_compile_for_hopper(zero_centred):
    """Both kernels compile to sm_90 machine code at the bound shapes (Qwen3-Next: D 256, R 64; bf16), ahead of
    time, so a CPU-only run checks what the interpreter cannot: that Triton's compiler takes them, and that the
    rotation's bf16 products stay rounded before their sum (the interpreter rounds in fp16 only; with FP fusion the
    compiled kernel contracted product and sum into one bf16 FMA and missed HF's bits on an H100)."""
    rows = {"num_rows": "i32", "num_heads": "i32"}
    ptx = compile_for_hopper("eagle_trainer.kernels.attention_glue.norm_rope", "qk_norm_rope_fwd_kernel", {
        **{name: "*bf16" for name in ("x_ptr", "w_ptr", "cos_ptr", "sin_ptr", "y_ptr")}, **rows,
        **{name: "i32" for name in ("stride_xt", "stride_xh", "stride_ct")}, "eps": "fp32"},
        {"D": 256, "R": 64, "BR": 16, "BD": 256, "ZERO_CENTRED": zero_centred},
        enable_fp_fusion=norm_rope_mod.FP_FUSION)
    assert "cvt.rn.bf16.f32" in ptx or "mul.rn.bf16" in ptx
    assert "fma.rn.bf16" not in ptx
    compile_for_hopper("eagle_trainer.kernels.attention_glue.gate", "sigmoid_gate_fwd_kernel", {
        **{name: "*bf16" for name in ("a_ptr", "g_ptr", "y_ptr")}, **rows,
        **{name: "i32" for name in ("stride_at", "stride_ah", "stride_gt", "stride_gh")}},
        {"D": 256, "BR": 16, "BD": 256})

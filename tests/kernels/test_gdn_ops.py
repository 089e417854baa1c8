"""The gated delta net's small kernels (conv1d + SiLU, g/beta gating, gated RMSNorm) against their plain-torch
references and against HF's own Qwen3-Next code path.

Without a GPU the kernels run in Triton's interpreter (conftest) in fp32 at odd sizes; with one, the same tests
run compiled and the gpu-marked ones check bf16 at the real Qwen3-Next-80B-A3B linear-attention shape.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import poison
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from eagle_trainer.kernels.gdn import causal_conv1d_silu, gated_rms_norm, gdn_gating
from eagle_trainer.kernels.gdn import conv as conv_mod
from eagle_trainer.kernels.gdn import gating as gating_mod
from eagle_trainer.kernels.gdn import norm as norm_mod
from eagle_trainer.kernels.gdn.reference import (
    causal_conv1d_silu_reference,
    gated_rms_norm_reference,
    gdn_gating_reference,
)
from eagle_trainer.targets.tiny import tiny_qwen3_next_config

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer the launchers allocate starts as NaN: an element no kernel writes fails the test."""
    poison(monkeypatch, conv_mod, gating_mod, norm_mod)


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def hf_conv1d_silu(x, conv):
    """HF's prefill path on x [B, T, C]: F.silu(self.conv1d(x)[..., :seq_len]) in the [B, C, T] layout."""
    return F.silu(conv(x.transpose(1, 2))[..., :x.shape[1]]).transpose(1, 2)


def hf_conv1d(channels, kernel_size, seed):
    conv = torch.nn.Conv1d(channels, channels, kernel_size, bias=False, groups=channels, padding=kernel_size - 1)
    with torch.no_grad():
        conv.weight.copy_(randn(channels, 1, kernel_size, seed=seed, scale=0.5))
    return conv.to(DEVICE)


@pytest.mark.parametrize("batch,seq_len,channels,kernel_size,with_bias", [
    (1, 1, 48, 4, False), (2, 3, 80, 4, True), (1, 67, 168, 4, False), (3, 67, 5, 2, True), (1, 9, 37, 1, False)])
def test_conv_matches_reference(poisoned, batch, seq_len, channels, kernel_size, with_bias):
    x = randn(batch, seq_len, channels, seed=seq_len)
    w = randn(channels, kernel_size, seed=1, scale=0.5)
    bias = randn(channels, seed=2) if with_bias else None
    out = causal_conv1d_silu(x, w, bias)
    assert out.shape == x.shape and not out.isnan().any()
    torch.testing.assert_close(out, causal_conv1d_silu_reference(x, w, bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,seq_len,channels", [(1, 1, 168), (2, 3, 168), (2, 67, 80)])
def test_conv_matches_hf(poisoned, batch, seq_len, channels):
    conv = hf_conv1d(channels, 4, seed=seq_len)
    x = randn(batch, seq_len, channels, seed=seq_len + 1)
    with torch.no_grad():
        ref = hf_conv1d_silu(x, conv)
        fn_ref = hf.causal_conv1d_fn(x.transpose(1, 2), conv.weight.squeeze(1), None, "silu").transpose(1, 2)
        out = causal_conv1d_silu(x, conv.weight)  # HF's [C, 1, K] layout as it is
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, fn_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths", [[1, 9, 4], [3, 0, 67, 2], [5]])
def test_conv_packed_documents_do_not_leak(poisoned, lengths):
    channels = 80
    conv = hf_conv1d(channels, 4, seed=len(lengths))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    x = randn(1, sum(lengths), channels, seed=sum(lengths))
    with torch.no_grad():
        packed = causal_conv1d_silu(x, conv.weight, cu_seqlens=cu_seqlens)
        assert not packed.isnan().any()
        torch.testing.assert_close(packed, causal_conv1d_silu_reference(x, conv.weight, None, cu_seqlens),
                                   rtol=1e-5, atol=1e-6)
        bounds = cu_seqlens.tolist()
        for start, end in itertools.pairwise(bounds):
            alone = causal_conv1d_silu(x[:, start:end], conv.weight)
            assert torch.equal(packed[:, start:end], alone)  # the same bits: nothing from the previous document
            if end > start:  # nn.Conv1d refuses an empty sequence
                torch.testing.assert_close(packed[:, start:end], hf_conv1d_silu(x[:, start:end], conv),
                                           rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("run,runs,width,seq_len,packed,align", [
    (16, 5, 120, 67, False, 1), (24, 3, 100, 9, True, 1), (128, 2, 300, 3, False, 1), (32, 4, 304, 20, True, 16)])
def test_conv_reads_scattered_column_runs(poisoned, run, runs, width, seq_len, packed, align):
    """column_starts: channel j*S + i is x's column starts[j] + i (runs in any order, x wider than C, starts
    multiples of `align` where that is promised): the same result as gathering those columns first; a run of 24
    splits into blocks of 8 channels."""
    channels = run * runs
    starts = torch.randperm((width - run) // align + 1, generator=torch.Generator().manual_seed(run))[:runs] * align
    columns = (starts[:, None] + torch.arange(run)).reshape(-1).to(DEVICE)
    x = randn(1 if packed else 2, seq_len, width, seed=run)
    w, bias = randn(channels, 4, seed=1, scale=0.5), randn(channels, seed=2)
    cu_seqlens = torch.tensor([0, 4, seq_len], dtype=torch.int32, device=DEVICE) if packed else None
    out = causal_conv1d_silu(x, w, bias, cu_seqlens=cu_seqlens, column_starts=starts.to(DEVICE), column_align=align)
    assert out.shape == (*x.shape[:2], channels) and not out.isnan().any()
    assert torch.equal(out, causal_conv1d_silu(x[..., columns], w, bias, cu_seqlens=cu_seqlens))
    torch.testing.assert_close(out, causal_conv1d_silu_reference(x[..., columns], w, bias, cu_seqlens),
                               rtol=1e-5, atol=1e-6)


def hf_gating(a, b, a_log, dt_bias):
    """HF's expressions in Qwen3NextGatedDeltaNet.forward."""
    beta = b.sigmoid()
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    return g, beta


@pytest.mark.parametrize("shape", [(1, 1, 6), (2, 3, 6), (1, 67, 32), (67, 5)])
def test_gating_matches_reference_and_hf(poisoned, shape):
    num_heads = shape[-1]
    a, b = randn(*shape, seed=shape[0], scale=4), randn(*shape, seed=shape[1], scale=4)
    a.view(-1)[:4] = torch.tensor([-60.0, 19.9, 20.1, 60.0])  # both sides of softplus' threshold (20), and far out
    a_log = torch.log(torch.rand(num_heads, generator=torch.Generator().manual_seed(3)) * 16 + 0.01).to(DEVICE)
    dt_bias = randn(num_heads, seed=4)
    dt_bias[0] = 0.0
    g, beta = gdn_gating(a, b, a_log, dt_bias)
    assert g.dtype == beta.dtype == torch.float32 and g.shape == beta.shape == shape
    for ref_g, ref_beta in (gdn_gating_reference(a, b, a_log, dt_bias), hf_gating(a, b, a_log, dt_bias)):
        torch.testing.assert_close(g, ref_g, rtol=2e-6, atol=1e-30)
        torch.testing.assert_close(beta, ref_beta, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("shape,width,heads", [((1, 1), 8, 4), ((2, 3), 13, 6), ((67,), 64, 32), ((3, 5), 9, 9)])
def test_gating_reads_its_columns_out_of_wider_rows(poisoned, shape, width, heads):
    """a and b given as columns of one [..., W] tensor (in_proj_ba's output, here a slice of still wider rows): the
    same bits as the columns gathered first, and the reference's values."""
    wide = randn(*shape, width + 5, seed=width, scale=4)
    ba = wide[..., 2:2 + width]  # rows of stride W + 5
    g_cpu = torch.Generator().manual_seed(heads)
    a_cols = torch.randperm(width, generator=g_cpu)[:heads].to(DEVICE)
    b_cols = torch.randperm(width, generator=g_cpu)[:heads].to(DEVICE)
    a_log = torch.log(torch.rand(heads, generator=g_cpu) * 16 + 0.01).to(DEVICE)
    dt_bias = randn(heads, seed=4)
    g, beta = gdn_gating(ba, ba, a_log, dt_bias, a_columns=a_cols, b_columns=b_cols)
    assert g.shape == beta.shape == (*shape, heads) and not g.isnan().any() and not beta.isnan().any()
    a, b = ba[..., a_cols], ba[..., b_cols]
    ref_g, ref_beta = gdn_gating(a, b, a_log, dt_bias)
    assert torch.equal(g, ref_g) and torch.equal(beta, ref_beta)
    ref_g, ref_beta = gdn_gating_reference(a, b, a_log, dt_bias)
    torch.testing.assert_close(g, ref_g, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(beta, ref_beta, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="a_columns and b_columns together"):
        gdn_gating(ba, ba, a_log, dt_bias, a_columns=a_cols)
    with pytest.raises(ValueError, match="do not fit"):
        gdn_gating(ba, ba, a_log[:-1], dt_bias[:-1], a_columns=a_cols, b_columns=b_cols)


@pytest.mark.parametrize("rows,dim", [(1, 20), (3, 128), (67, 20), (5, 7)])
def test_gated_norm_matches_reference_and_hf(poisoned, rows, dim):
    module = hf.Qwen3NextRMSNormGated(dim, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
    x, z = randn(rows, dim, seed=rows, scale=3), randn(rows, dim, seed=rows + 1, scale=2)
    with torch.no_grad():
        out = gated_rms_norm(x, z, module.weight, 1e-6)
        ref = module(x, z)
    assert out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, gated_rms_norm_reference(x, z, module.weight, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,seq_len,key_heads,group,dim", [(1, 1, 1, 1, 20), (2, 5, 3, 2, 24), (1, 67, 2, 3, 7)])
def test_gated_norm_reads_a_grouped_strided_gate(poisoned, batch, seq_len, key_heads, group, dim):
    """z [B, T, Hk, G, D] as a view into a wider row (Qwen3-Next's z inside the in_proj_qkvz output): the same
    bits as the gate copied into [B, T, Hk * G, D]."""
    heads, row = key_heads * group, key_heads * (group * dim + 5)  # 5 other columns after each key head's gate
    wide = randn(batch, seq_len, row, seed=dim, scale=2)
    z = wide.view(batch, seq_len, key_heads, group * dim + 5)[..., :group * dim].unflatten(-1, (group, dim))
    x, weight = randn(batch, seq_len, heads, dim, seed=dim + 1, scale=3), randn(dim, seed=3)
    out = gated_rms_norm(x, z, weight, 1e-6)
    assert out.shape == x.shape and not out.isnan().any()
    flat = z.reshape(batch, seq_len, heads, dim)  # a copy
    assert torch.equal(out, gated_rms_norm(x, flat, weight, 1e-6))
    torch.testing.assert_close(out, gated_rms_norm_reference(x, flat, weight, 1e-6), rtol=1e-5, atol=1e-6)


def test_ops_inside_hf_gated_delta_net(poisoned):
    """HF's layer feeds the ops: the qkvz/ba split per key-head group, conv over cat(q, k, v), the norm on z."""
    config = tiny_qwen3_next_config(vocab_size=64, hidden_size=40, linear_num_key_heads=2, linear_num_value_heads=6,
                                    linear_key_head_dim=12, linear_value_head_dim=20)
    torch.manual_seed(0)
    layer = hf.Qwen3NextGatedDeltaNet(config, layer_idx=0).to(DEVICE)
    with torch.no_grad():
        layer.norm.weight.normal_(1.0, 0.3)
        hidden = randn(2, 7, 40, seed=5)
        q, k, v, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(hidden), layer.in_proj_ba(hidden))
        mixed_qkv = torch.cat([t.reshape(2, 7, -1) for t in (q, k, v)], dim=-1)  # [B, T, C], C = 2*24 + 120
        assert mixed_qkv.shape[-1] == layer.conv_dim == 168
        torch.testing.assert_close(causal_conv1d_silu(mixed_qkv, layer.conv1d.weight),
                                   hf_conv1d_silu(mixed_qkv, layer.conv1d), rtol=1e-5, atol=1e-6)
        g, beta = gdn_gating(a, b, layer.A_log, layer.dt_bias)  # a, b [B, T, Hv] views of the projection
        ref_g, ref_beta = hf_gating(a, b, layer.A_log, layer.dt_bias)
        torch.testing.assert_close(g, ref_g, rtol=2e-6, atol=1e-30)
        torch.testing.assert_close(beta, ref_beta, rtol=2e-6, atol=1e-7)
        core = randn(2, 7, 6, 20, seed=6)  # stands in for the delta rule's output [B, T, Hv, Dv]
        torch.testing.assert_close(gated_rms_norm(core, z, layer.norm.weight, layer.layer_norm_epsilon),
                                   layer.norm(core.reshape(-1, 20), z.reshape(-1, 20)).view(2, 7, 6, 20),
                                   rtol=1e-5, atol=1e-6)


def test_bad_shapes_raise():
    x = torch.zeros(1, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        causal_conv1d_silu(x, torch.zeros(7, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"need x \[1, T_total, C\]"):
        causal_conv1d_silu(x.expand(2, 5, 8), torch.zeros(8, 4, device=DEVICE),
                           cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="do not fit"):
        gdn_gating(x, x, torch.zeros(7, device=DEVICE), torch.zeros(8, device=DEVICE))
    with pytest.raises(ValueError, match="do not fit"):
        gated_rms_norm(x, x[..., :4], torch.zeros(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match=r"column_starts \(3,\) does not split the conv's 8 channels"):
        causal_conv1d_silu(x, torch.zeros(8, 4, device=DEVICE), column_starts=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="column_align=12 must be a power of two"):
        causal_conv1d_silu(x, torch.zeros(8, 4, device=DEVICE), column_starts=torch.zeros(2, dtype=torch.int32),
                           column_align=12)


def test_empty_inputs():
    assert causal_conv1d_silu(torch.zeros(1, 0, 8, device=DEVICE), torch.zeros(8, 4, device=DEVICE)).shape == (1, 0, 8)
    g, beta = gdn_gating(*(torch.zeros(0, 4, device=DEVICE),) * 2, torch.zeros(4, device=DEVICE),
                         torch.zeros(4, device=DEVICE))
    assert g.shape == beta.shape == (0, 4)
    assert gated_rms_norm(*(torch.zeros(0, 8, device=DEVICE),) * 2, torch.ones(8, device=DEVICE), 1e-6).shape == (0, 8)


# Qwen3-Next-80B-A3B linear attention: 16 key heads and 32 value heads of dim 128, conv kernel 4,
# so C = 2 * 16 * 128 + 32 * 128 = 8192 conv channels.
NUM_K_HEADS, NUM_V_HEADS, HEAD_DIM, CONV_DIM = 16, 32, 128, 8192


@pytest.mark.gpu
def test_gpu_bf16_conv_real_shape_packed(poisoned):
    lengths = [1, 900, 3, 2048, 1144]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    conv = hf_conv1d(CONV_DIM, 4, seed=0).to(torch.bfloat16)
    x = randn(1, sum(lengths), CONV_DIM, seed=1, dtype=torch.bfloat16)
    with torch.no_grad():
        packed = causal_conv1d_silu(x, conv.weight, cu_seqlens=cu_seqlens)
        assert packed.dtype == torch.bfloat16 and not packed.isnan().any()
        torch.testing.assert_close(packed, causal_conv1d_silu_reference(x, conv.weight, None, cu_seqlens),
                                   rtol=1e-2, atol=1e-2)
        bounds = cu_seqlens.tolist()
        for start, end in itertools.pairwise(bounds):
            assert torch.equal(packed[:, start:end], causal_conv1d_silu(x[:, start:end], conv.weight))
            ref = hf_conv1d_silu(x[:, start:end], conv)
            assert (packed[:, start:end] == ref).float().mean() > 0.95  # cuDNN's sum order differs in the last bit
            torch.testing.assert_close(packed[:, start:end], ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_bf16_gating_real_shape(poisoned):
    a, b = randn(2, 4096, NUM_V_HEADS, seed=0, scale=4, dtype=torch.bfloat16), \
        randn(2, 4096, NUM_V_HEADS, seed=1, scale=4, dtype=torch.bfloat16)
    a_log = torch.log(torch.rand(NUM_V_HEADS, device=DEVICE) * 16 + 0.01).to(torch.bfloat16)
    dt_bias = randn(NUM_V_HEADS, seed=2, dtype=torch.bfloat16)
    g, beta = gdn_gating(a, b, a_log, dt_bias)
    ref_g, ref_beta = hf_gating(a, b, a_log, dt_bias)
    assert g.dtype == torch.float32 and beta.dtype == torch.bfloat16
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-30)
    assert (beta == ref_beta).float().mean() > 0.99
    torch.testing.assert_close(beta, ref_beta, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_bf16_gated_norm_real_shape(poisoned):
    module = hf.Qwen3NextRMSNormGated(HEAD_DIM, eps=1e-6).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.1)
    x = randn(4097, NUM_V_HEADS, HEAD_DIM, seed=0, scale=4, dtype=torch.bfloat16)
    z = randn(4097, NUM_V_HEADS, HEAD_DIM, seed=1, scale=2, dtype=torch.bfloat16)
    with torch.no_grad():
        out, ref = gated_rms_norm(x, z, module.weight, 1e-6), module(x.view(-1, HEAD_DIM), z.view(-1, HEAD_DIM))
    assert out.dtype == ref.dtype == torch.bfloat16
    assert (out.view(-1, HEAD_DIM) == ref).float().mean() > 0.99  # only the fp32 sum order differs
    torch.testing.assert_close(out.view(-1, HEAD_DIM), ref, rtol=1e-2, atol=1e-2)

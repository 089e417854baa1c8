"""The chunked gated delta rule kernel against its fp64 token-by-token reference, and that against HF.

Without a GPU the kernel runs in Triton's interpreter (conftest) in fp32 at tiny sizes; with one, the same tests
run compiled, and the gpu-marked one checks bf16 at Qwen3-Next's shape against HF's torch_chunk_gated_delta_rule.
"""

import pytest
import torch
from kernel_checks import compile_for_hopper, poison, rel_err
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from eagle_trainer.kernels.gdn import chunk as chunk_mod
from eagle_trainer.kernels.gdn.chunk import chunk_gated_delta_rule
from eagle_trainer.kernels.gdn.reference import gated_delta_rule_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# HF's torch paths, not a hub/FLA kernel that the decorator may have bound
HF_CHUNK = getattr(hf.torch_chunk_gated_delta_rule, "__wrapped__", hf.torch_chunk_gated_delta_rule)
HF_RECURRENT = getattr(hf.torch_recurrent_gated_delta_rule, "__wrapped__", hf.torch_recurrent_gated_delta_rule)


def hf_heads(q, k, v):
    """q, k repeated to v's heads, as HF's Qwen3NextGatedDeltaNet does before its core (older transformers'
    torch paths take equal head counts only)."""
    group = v.shape[2] // k.shape[2]
    return q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)


@pytest.fixture
def poisoned(monkeypatch):
    """The output buffer starts as NaN: an element the kernel does not write fails the test."""
    poison(monkeypatch, chunk_mod)


def random_inputs(batch, num_tokens, num_k_heads, num_v_heads, head_k_dim, head_v_dim, l2norm_qk=True,
                  dtype=torch.float32, seed=0, max_decay=1.0):
    """q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], g, beta [B,T,Hv] fp32. Without the in-kernel l2 norm, k is drawn with
    |k| < 1 so that beta |k|^2 < 2 keeps the recurrence stable (as the norm does)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_tokens, num_k_heads, head_k_dim, generator=gen)
    k = torch.randn(batch, num_tokens, num_k_heads, head_k_dim, generator=gen)
    if not l2norm_qk:
        k = 0.9 * k / k.norm(dim=-1, keepdim=True) * torch.rand(batch, num_tokens, num_k_heads, 1, generator=gen)
    v = torch.randn(batch, num_tokens, num_v_heads, head_v_dim, generator=gen)
    g = -max_decay * torch.rand(batch, num_tokens, num_v_heads, generator=gen)
    beta = torch.rand(batch, num_tokens, num_v_heads, generator=gen)
    return (q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), g.to(DEVICE), beta.to(DEVICE))


@pytest.mark.parametrize("l2norm_qk", [True, False])
def test_reference_matches_hf(l2norm_qk):
    # HF's torch paths compute in fp32 whatever the input dtype: agreement to fp32 rounding
    q, k, v, g, beta = (x.double().cpu() for x in random_inputs(2, 70, 2, 4, 16, 24, l2norm_qk, seed=1))
    ref = gated_delta_rule_reference(q, k, v, g, beta, l2norm_qk=l2norm_qk)
    assert ref.dtype == torch.float64 and ref.shape == v.shape
    recurrent, _ = HF_RECURRENT(*hf_heads(q, k, v), v, g, beta, use_qk_l2norm_in_kernel=l2norm_qk)
    chunked, _ = HF_CHUNK(*hf_heads(q, k, v), v, g, beta, use_qk_l2norm_in_kernel=l2norm_qk)
    assert rel_err(recurrent, ref) < 1e-6
    assert rel_err(chunked, ref) < 1e-5


@pytest.mark.parametrize("batch,num_tokens,num_k_heads,num_v_heads,head_k_dim,head_v_dim,l2norm_qk", [
    (1, 1, 1, 2, 16, 16, True), (1, 63, 2, 4, 16, 32, True), (1, 64, 1, 2, 32, 16, False),
    (2, 65, 1, 2, 16, 48, True), (1, 130, 2, 4, 24, 16, True), (1, 130, 2, 2, 16, 16, False)])
def test_chunk_matches_reference(poisoned, batch, num_tokens, num_k_heads, num_v_heads, head_k_dim, head_v_dim,
                                 l2norm_qk):
    inputs = random_inputs(batch, num_tokens, num_k_heads, num_v_heads, head_k_dim, head_v_dim, l2norm_qk,
                           seed=num_tokens)
    out = chunk_gated_delta_rule(*inputs, l2norm_qk=l2norm_qk)
    ref = gated_delta_rule_reference(*inputs, l2norm_qk=l2norm_qk)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("batch,num_tokens", [(2, 67), (1, 130)])
def test_chunk_reads_q_k_v_where_they_lie(poisoned, batch, num_tokens):
    """q, k, v split out of one [B, T, C] tensor (the conv's output) are read through their row stride, not
    copied: the same bits as contiguous copies."""
    q, k, v, g, beta = random_inputs(batch, num_tokens, 2, 4, 16, 24, seed=num_tokens)
    mixed = torch.cat([x.flatten(2) for x in (q, k, v)], dim=-1)  # [B, T, 2 * 32 + 96]
    views = [x.unflatten(-1, (-1, dim)) for x, dim in zip(mixed.split([32, 32, 96], dim=-1), (16, 16, 24))]
    assert not any(x.is_contiguous() for x in views)
    out = chunk_gated_delta_rule(*views, g, beta)
    assert not out.isnan().any()
    assert torch.equal(out, chunk_gated_delta_rule(q, k, v, g, beta))


@pytest.mark.parametrize("lengths", [[5], [0, 64, 65, 1, 0, 130], [1] * 37, [3] * 8193])  # the last: torch's ops
def test_chunk_offsets_count_each_documents_chunks(poisoned, lengths):
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    expect = [0, *torch.tensor([-(-n // chunk_mod.BT) for n in lengths]).cumsum(0).tolist()]
    assert chunk_mod.chunk_offsets(cu_seqlens).tolist() == expect


@pytest.mark.parametrize("num_seqs", [1, 8192])  # the launcher's smallest and largest BN
def test_chunk_offsets_kernel_compiles_for_hopper(num_seqs):
    """Its cumsum over one program's BN lanes compiles to sm_90 code (ahead of time: the interpreter runs the CPU
    tests above)."""
    compile_for_hopper("eagle_trainer.kernels.gdn.chunk", "chunk_offsets_kernel",
                       {"cu_seqlens_ptr": "*i32", "cu_chunks_ptr": "*i32", "num_seqs": "i32"},
                       {"BT": chunk_mod.BT, "BN": max(16, 1 << (num_seqs - 1).bit_length())})


def test_packed_documents_do_not_share_state(poisoned):
    lengths = [1, 70, 5, 64]
    cu_seqlens = torch.tensor([0, 1, 71, 76, 140], device=DEVICE, dtype=torch.int32)
    q, k, v, g, beta = random_inputs(1, sum(lengths), 1, 2, 16, 32, seed=3)
    out = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens)
    assert not out.isnan().any()
    assert rel_err(out, gated_delta_rule_reference(q, k, v, g, beta, cu_seqlens=cu_seqlens)) < 1e-5
    # Each document alone gives the same bits: chunks start at each document, nothing leaks across.
    for bos, eos in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        alone = chunk_gated_delta_rule(*(x[:, bos:eos] for x in (q, k, v, g, beta)))
        assert torch.equal(alone, out[:, bos:eos])
    # ... and the packed run is not the one long sequence
    assert rel_err(chunk_gated_delta_rule(q, k, v, g, beta), out) > 1e-2


def test_strong_decay_and_repeated_keys(poisoned):
    # Qwen3-Next's g reaches ~ -20 (A up to 16); identical keys with beta = 1 make (I + A) all ones below the
    # diagonal, whose inverse is exact only if the substitution does not cancel large terms.
    q, k, v, g, beta = random_inputs(1, 100, 1, 2, 16, 16, seed=4, max_decay=20.0)
    out = chunk_gated_delta_rule(q, k, v, g, beta)
    assert rel_err(out, gated_delta_rule_reference(q, k, v, g, beta)) < 1e-5
    k = k[:, :1].expand_as(k).contiguous()
    g, beta = torch.zeros_like(g), torch.ones_like(beta)
    out = chunk_gated_delta_rule(q, k, v, g, beta)
    assert rel_err(out, gated_delta_rule_reference(q, k, v, g, beta)) < 1e-5


def test_scale_and_bad_shapes():
    q, k, v, g, beta = random_inputs(1, 9, 1, 2, 16, 16, seed=5)
    out = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.3)
    assert rel_err(out, gated_delta_rule_reference(q, k, v, g, beta, scale=0.3)) < 1e-5
    assert chunk_gated_delta_rule(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0]).shape == (1, 0, 2, 16)
    with pytest.raises(ValueError, match="multiple of Hk"):
        two_k_heads = torch.cat([k, k], dim=2)
        chunk_gated_delta_rule(two_k_heads, two_k_heads, v[:, :, :1].expand(1, 9, 3, 16), g[..., :1].expand(1, 9, 3),
                               beta[..., :1].expand(1, 9, 3))
    with pytest.raises(ValueError, match="batch 1"):
        two = [torch.cat([x, x]) for x in (q, k, v, g, beta)]
        chunk_gated_delta_rule(*two, cu_seqlens=torch.tensor([0, 9], device=DEVICE, dtype=torch.int32))


@pytest.mark.gpu
def test_gpu_bf16_qwen3_next_shape_matches_hf(poisoned):
    # Qwen3-Next-80B-A3B linear attention: Hk 16, Hv 32, Dk = Dv = 128; q, k, v in bf16 as the conv returns them,
    # g fp32, beta bf16 (b.sigmoid() in the model dtype).
    q, k, v, g, beta = random_inputs(1, 4096, 16, 32, 128, 128, dtype=torch.bfloat16, seed=6, max_decay=2.0)
    beta = beta.bfloat16()
    out = chunk_gated_delta_rule(q, k, v, g, beta)
    ref, _ = HF_CHUNK(*hf_heads(q, k, v), v, g, beta, use_qk_l2norm_in_kernel=True)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert rel_err(out, ref) < 1e-2
    cu_seqlens = torch.tensor([0, 1000, 1001, 3000, 4096], device=DEVICE, dtype=torch.int32)
    out = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens)
    for bos, eos in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        doc_q, doc_k, doc_v, doc_g, doc_beta = (x[:, bos:eos] for x in (q, k, v, g, beta))
        ref, _ = HF_CHUNK(*hf_heads(doc_q, doc_k, doc_v), doc_v, doc_g, doc_beta, use_qk_l2norm_in_kernel=True)
        assert rel_err(out[:, bos:eos], ref) < 1e-2

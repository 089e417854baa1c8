"""The three TTT attention paths compute one function: naive (the reference), flex and fused, forward and
backward, packed or not."""

import pytest
import torch

from batches import documents_of

from eagle_trainer.drafts.attention import naive_ttt_attention
from test_unroll import tiny_draft, ttt_logits


def test_naive_attention_uses_causal_block_and_diagonals():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    k0, v0 = torch.randn(1, 1, 4, 8, dtype=torch.float64), torch.randn(1, 1, 4, 8, dtype=torch.float64)
    k1, v1 = torch.randn_like(k0), torch.randn_like(v0)
    out = naive_ttt_attention(q, k0, v0, [k1], [v1])
    t = 2  # position 2 sees k0[0..2] and k1[2]
    keys = torch.cat([k0[0, 0, :t + 1], k1[0, 0, t:t + 1]])
    vals = torch.cat([v0[0, 0, :t + 1], v1[0, 0, t:t + 1]])
    ref = torch.softmax(q[0, 1, t] @ keys.T / 8**0.5, -1) @ vals
    torch.testing.assert_close(out[0, 1, t], ref)


@pytest.mark.parametrize("t,num_prev", [(37, 3), (5, 0), (130, 6), (1, 2)])
def test_flex_lse_merge_equals_naive_attention(t, num_prev):
    from eagle_trainer.drafts.attention import flex_ttt_attention

    torch.manual_seed(t)
    q = torch.randn(2, 4, t, 16)
    kv = [torch.randn(2, 2, t, 16) for _ in range(2 * (num_prev + 1))]
    k0, v0, dk, dv = kv[0], kv[1], kv[2::2], kv[3::2]
    torch.testing.assert_close(flex_ttt_attention(q, k0, v0, dk, dv), naive_ttt_attention(q, k0, v0, dk, dv),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [300, 2048])
def test_flex_path_matches_naive_on_gpu_forward_and_backward(t):
    """Compiled flex (the GPU path) equals the naive reference, values and gradients, at an odd and a long T."""
    from eagle_trainer.drafts.attention import flex_ttt_attention

    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(1, 8, t, 64, device=dev, requires_grad=True)
    kv = [torch.randn(1, 2, t, 64, device=dev, requires_grad=True) for _ in range(6)]
    k0, v0, dk, dv = kv[0], kv[1], kv[2::2], kv[3::2]
    grad = torch.randn(1, 8, t, 64, device=dev)
    outs, grads = [], []
    for fn in (flex_ttt_attention, naive_ttt_attention):
        out = fn(q, k0, v0, dk, dv)
        (g,) = torch.autograd.grad(out, [q], grad)
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_packed_flex_on_gpu_matches_naive_forward_and_backward():
    """The compiled flex path with a per-batch document block mask (built compiled) equals the naive one."""
    torch.manual_seed(0)
    draft = tiny_draft(hidden_size=64, target_hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16).float().cuda()
    _, packed = documents_of((300, 1, 77, 140, 5), 50, pad_to=128)
    packed = packed.to("cuda")
    aux = torch.randn(1, packed.input_ids.shape[1], 3 * 64, device="cuda")
    grads, outs = [], []
    for attention in ("flex", "naive"):
        logits = ttt_logits(draft, packed.input_ids, aux, 3, attention, packed.position_ids, packed.document_ids())
        draft.zero_grad(set_to_none=True)
        sum(x.square().mean() for x in logits).backward()
        outs.append(torch.stack(logits))
        grads.append(draft.fc.weight.grad.clone())
    err = lambda a, b: float(((a - b).norm() / b.norm()).detach())
    assert err(outs[0], outs[1]) < 5e-3 and err(grads[0], grads[1]) < 5e-3, (err(*outs), err(*grads))


@pytest.mark.gpu
def test_flex_ttt_memory_is_linear_in_t():
    """A 7-step TTT forward+backward: doubling T about doubles peak memory (a [T, T] path would quadruple it),
    and at T=16384 the peak stays under one fp32 [nh, T, T] score tensor."""
    torch.manual_seed(0)
    draft = tiny_draft(hidden_size=256, target_hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32,
                       intermediate_size=512, vocab_size=1000, draft_vocab_size=500).float().cuda()

    def peak_bytes(t):
        ids = torch.randint(0, 1000, (1, t), device="cuda")
        aux = torch.randn(1, t, 3 * 256, device="cuda")
        ttt_logits(draft, ids, aux, 2, attention="flex")  # compile outside the measured region
        draft.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logits = ttt_logits(draft, ids, aux, 7, attention="flex")
        sum(x.float().square().mean() for x in logits).backward()
        del logits
        draft.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - base

    small, large = peak_bytes(8192), peak_bytes(16384)
    assert large / small < 2.5, (small, large)
    assert large < 8 * 16384 * 16384 * 4, large


def attention_grads(fn, q, kv, grad):
    """Output and the gradients of q and every key/value of one TTT attention call."""
    k0, v0, dk, dv = kv[0], kv[1], kv[2::2], kv[3::2]
    out = fn(q, k0, v0, dk, dv)
    return [out, *torch.autograd.grad(out, [q, *kv], grad)]


@pytest.mark.parametrize("t,num_prev,packed", [(37, 3, False), (5, 0, False), (1, 2, False), (23, 6, True),
                                               (16, 1, True)])
def test_fused_attention_equals_naive_forward_and_backward(t, num_prev, packed):
    """The fused path (step-0 kernel + log-sum-exp merge, its custom backward) on the CPU: aten's CPU flash
    attention for step 0 and the merge kernels interpreted, against the naive reference, values and gradients."""
    import functools

    from eagle_trainer.drafts.attention import fused_ttt_attention

    torch.manual_seed(t)
    q = torch.randn(2 if not packed else 1, 6, t, 16, requires_grad=True)
    kv = [torch.randn(q.shape[0], 2, t, 16, requires_grad=True) for _ in range(2 * (num_prev + 1))]
    grad = torch.randn_like(q)
    documents = None
    if packed:  # three documents, one of a single token
        documents = torch.tensor([[0] * (t // 2) + [1] + [2] * (t - t // 2 - 1)])
    fused = functools.partial(fused_ttt_attention, documents=documents)
    naive = functools.partial(naive_ttt_attention, documents=documents)
    for got, want in zip(attention_grads(fused, q, kv, grad), attention_grads(naive, q, kv, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("t,packed,cudnn,heads", [(300, False, False, (32, 4, 128)), (2048, False, False, (32, 4, 128)),
                                                  (1000, True, False, (32, 4, 128)), (300, False, True, (32, 4, 128)),
                                                  (2048, False, True, (32, 4, 128)), (2048, False, False, (16, 2, 256)),
                                                  (1000, True, False, (16, 2, 256)), (300, False, True, (16, 2, 256)),
                                                  (2048, False, True, (16, 2, 256))])
def test_fused_path_matches_naive_on_gpu_bf16(t, packed, cudnn, heads):
    """FlashAttention-2 (its varlen form when packed) or cuDNN's attention (an unpacked shape seen before) as step 0
    + the merge kernels in bf16, against the naive reference in fp32 on the same values: output and every gradient
    within bf16 rounding (norm-relative 1e-2). Heads/kv heads/head dim of a Qwen3-8B draft and of a Qwen3-Next draft
    (head dim 256: cuDNN takes it on Hopper only)."""
    import functools

    from eagle_trainer.drafts.attention import fused_ttt_attention
    from eagle_trainer.kernels.ttt_attention.step0 import CudnnCausal, cudnn_takes_head_dim

    torch.manual_seed(0)
    dev = "cuda"
    num_heads, kv_heads, dim = heads
    if cudnn and not cudnn_takes_head_dim(dim, torch.device(dev)):
        pytest.skip(f"cuDNN's attention backward does not run head dim {dim} on this GPU (Hopper does)")
    q = torch.randn(1, t, num_heads, dim, device=dev).transpose(1, 2)  # [B, nh, T, D], strided as the draft makes it
    kv = [torch.randn(1, t, kv_heads, dim, device=dev).transpose(1, 2) for _ in range(8)]
    grad = torch.randn_like(q)
    documents = None
    if packed:
        documents = torch.repeat_interleave(torch.arange(4, device=dev), torch.tensor([1, 400, 99, t - 500],
                                                                                      device=dev))[None]
    leaves = lambda xs, dtype: [x.detach().to(dtype).requires_grad_() for x in xs]
    q16, kv16 = leaves([q], torch.bfloat16)[0], leaves(kv, torch.bfloat16)
    step0 = CudnnCausal() if cudnn else None
    got = attention_grads(functools.partial(fused_ttt_attention, documents=documents, step0=step0), q16, kv16,
                          grad.to(torch.bfloat16))
    want = attention_grads(functools.partial(naive_ttt_attention, documents=documents), leaves([q], torch.float32)[0],
                           leaves(kv, torch.float32), grad)
    for name, a, b in zip(["out", "dq", "dk0", "dv0"] + [f"diag{j}" for j in range(6)], got, want):
        err = float((a.float() - b).norm() / b.norm())
        assert err < 1e-2, (name, err)


def test_pick_attention(monkeypatch):
    """auto: naive on the CPU, fused on a GPU that runs FlashAttention-2 (8.0 and up), flex below; fused asked for
    on an older GPU is refused with the fix; a bad name is refused."""
    from eagle_trainer.drafts.attention import pick_attention

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert pick_attention("auto", cpu) == "naive" and pick_attention("flex", cpu) == "flex"
    with pytest.raises(ValueError, match=r"draft.attention='sdpa' is not one of auto, naive, flex, fused"):
        pick_attention("sdpa", cpu)
    for capability, auto in (((9, 0), "fused"), ((8, 0), "fused"), ((7, 5), "flex")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert pick_attention("auto", gpu) == auto
        assert pick_attention("flex", gpu) == "flex"
    with pytest.raises(ValueError, match=r"fused needs FlashAttention-2.*cuda:0 is 7.5: use draft.attention=flex"):
        pick_attention("fused", gpu)

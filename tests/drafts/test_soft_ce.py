"""The fused lm_head + soft-CE TTT head against the unfused reference: loss, per-step stats and gradients."""

import pytest
import torch

from eagle_trainer.drafts.soft_ce import _chunk_rows, fused_ttt_loss, unfused_ttt_loss


def case(batch=2, tokens=37, hidden=24, vocab=53, steps=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    normed = [torch.randn(batch, tokens, hidden, generator=gen, dtype=dtype) for _ in range(steps)]
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dtype) * 0.3
    teacher = torch.randn(batch, tokens, vocab, generator=gen).mul(2)  # logits
    valid = [torch.rand(batch, tokens, generator=gen) > 0.3 for _ in range(steps)]
    for k, v in enumerate(valid):
        v[:, tokens - 1 - k:] = False  # as step_valid_mask: no label past the end
    return normed, weight, teacher, valid


def run(head, normed, weight, teacher, valid, scale=1.0, **kw):
    normed = [h.clone().requires_grad_() for h in normed]
    weight = weight.clone().requires_grad_()
    out = head(normed, weight, teacher, valid, 0.8, **kw)
    (out.loss * scale).backward()
    return out, weight.grad, [h.grad for h in normed]


@pytest.mark.parametrize("max_elems", [10**9, 53 * 5, 1])  # one chunk, 5-row chunks, one row per chunk
def test_fused_matches_unfused(max_elems):
    # fp32 (the unfused head computes its soft-CE in fp32 whatever the input dtype)
    args = case()
    ref, ref_w, ref_h = run(unfused_ttt_loss, *args)
    out, grad_w, grad_h = run(fused_ttt_loss, *args, max_elems=max_elems)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert out.step_loss == pytest.approx(ref.step_loss, rel=1e-5)
    assert out.step_acc == pytest.approx(ref.step_acc, rel=1e-6) and out.step_count == ref.step_count
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-6)
    for a, b in zip(grad_h, ref_h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_scaled_loss():
    """Backward scales by the incoming gradient (the trainer divides by the accumulation steps)."""
    args = case(seed=1)
    ref, ref_w, ref_h = run(unfused_ttt_loss, *args, scale=0.25)
    out, grad_w, grad_h = run(fused_ttt_loss, *args, scale=0.25, max_elems=53 * 4)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-6)
    for a, b in zip(grad_h, ref_h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_valid_position_gives_zero_loss_and_grads():
    normed, weight, teacher, valid = case(steps=2, seed=2)
    valid = [torch.zeros_like(v) for v in valid]
    out, grad_w, grad_h = run(fused_ttt_loss, normed, weight, teacher, valid)
    assert out.loss.item() == 0 and out.step_count == [0, 0]
    assert not grad_w.any() and not any(g.any() for g in grad_h)


@pytest.mark.gpu
def test_gpu_bf16_matches_unfused():
    dev = torch.device("cuda")
    normed, weight, teacher, valid = case(batch=1, tokens=1000, hidden=256, vocab=4000, steps=3, seed=3)
    normed = [h.to(dev, torch.bfloat16) for h in normed]
    weight, valid = weight.to(dev, torch.bfloat16), [v.to(dev) for v in valid]
    teacher = teacher.to(dev, torch.bfloat16)  # the head's bf16 logits, as teacher_outputs forms them on a GPU
    ref, ref_w, ref_h = run(unfused_ttt_loss, normed, weight, teacher, valid)
    out, grad_w, grad_h = run(fused_ttt_loss, normed, weight, teacher, valid, max_elems=4000 * 128)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-3)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert rel(grad_w, ref_w) < 1e-2
    assert all(rel(a, b) < 1e-2 for a, b in zip(grad_h, ref_h, strict=True))


def test_a_second_backward_is_refused():
    """Backward hands on, scaled in place, the gradients formed in forward: a second one would scale them again."""
    normed, weight, teacher, valid = case(steps=2, seed=3)
    normed = [h.clone().requires_grad_() for h in normed]
    out = fused_ttt_loss(normed, weight.clone().requires_grad_(), teacher, valid, 0.8)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        out.loss.backward()


def test_gradients_are_written_over_the_hidden_states():
    """dh goes into the hidden states' memory: the gradient reaching a computation upstream is the unfused head's,
    and an upstream op that kept the hidden states for its own backward is caught (autograd's version check), not
    silently fed the gradient."""
    normed, weight, teacher, valid = case(seed=4)
    x = [h.clone().requires_grad_() for h in normed]
    ref_loss = unfused_ttt_loss([h * 2 for h in x], weight, teacher, valid, 0.8).loss
    ref = torch.autograd.grad(ref_loss, x)
    states = [h * 2 for h in x]  # mul by a constant keeps nothing of its output
    pointers = [s.data_ptr() for s in states]
    out = fused_ttt_loss(states, weight, teacher, valid, 0.8)
    assert [s.data_ptr() for s in states] == pointers
    for got, want in zip(torch.autograd.grad(out.loss, x), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    kept = [h.exp() for h in x]  # exp keeps its output for backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fused_ttt_loss(kept, weight, teacher, valid, 0.8).loss.backward()


def test_chunks_are_balanced_and_at_least_two_per_large_step():
    """At the 30B-A3B draft vocab (32000) and the default budget: T=4096 in two chunks (one would be the whole step's
    250 MiB), T=8192 and 16384 in two, T=32768 in four; T=1024 and shorter in one (64 MiB of logits at most); never
    more logits than the budget, never an empty chunk."""
    from eagle_trainer.drafts.soft_ce import MAX_ELEMS
    assert [_chunk_rows(t - 1, 32000, MAX_ELEMS) for t in (4096, 8192, 16384, 32768)] == [2048, 4096, 8192, 8192]
    assert _chunk_rows(16383, 32000, 1 << 27) == 4096
    assert [_chunk_rows(t - 1, 32000, MAX_ELEMS) for t in (2, 400, 1024, 1050)] == [1, 399, 1023, 525]
    for rows, vocab, budget in ((1, 7, 5), (3, 1000, 10), (37, 50, 999)):
        n = _chunk_rows(rows, vocab, budget, split_from=0)
        assert n >= 1 and (n * vocab <= budget or n == 1)
        assert n <= max(1, -(-rows // 2))

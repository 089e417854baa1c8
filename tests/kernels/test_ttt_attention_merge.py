"""The TTT attention merge kernels against their plain-torch references (interpreted on the CPU in fp32, compiled on
a GPU), at odd sizes (a query-head group of 3, head dim 24). Outputs are NaN-poisoned before each run."""

import pytest
import torch
from kernel_checks import poison

from eagle_trainer.kernels.ttt_attention import merge as merge_mod
from eagle_trainer.kernels.ttt_attention import merge_backward, merge_forward
from eagle_trainer.kernels.ttt_attention.reference import (
    merge_backward_reference,
    merge_forward_reference,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    poison(monkeypatch, merge_mod)


def inputs(b, nh, nkv, t, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    q = r(b, t, nh, d).transpose(1, 2)  # [B, nh, T, D] strided as the draft makes it
    out0 = r(b, t, nh, d).transpose(1, 2)
    lse0 = r(b, nh, t) * 2
    return q, out0, lse0, r(n, b, nkv, t, d), r(n, b, nkv, t, d)


@pytest.mark.parametrize("b,nh,nkv,t,d,n", [(2, 6, 2, 13, 24, 1), (1, 8, 2, 9, 16, 3), (3, 4, 4, 5, 32, 2)])
def test_merge_forward_and_backward_match_reference(poisoned, b, nh, nkv, t, d, n):
    q, out0, lse0, dk, dv = inputs(b, nh, nkv, t, d, n, seed=t)
    scale = d ** -0.5
    out, lse = merge_forward(q, out0, lse0, dk, dv, scale)
    ref_out, ref_lse = merge_forward_reference(q, out0, lse0, dk, dv, scale)
    assert out.stride() == out0.stride()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(1)
    dout = torch.randn(b, t, nh, d, generator=g).to(DEVICE).transpose(1, 2)
    dq0 = torch.randn(b, nh, t, d, generator=g).to(DEVICE)
    ref = merge_backward_reference(dout, out, q, lse, dq0, dk, dv, scale)
    got = merge_backward(dout, out, q, lse, dq0.clone(), dk, dv, scale)
    for name, x, y in zip(("dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)


def test_diagonal_store_steps_match_stacking():
    """Four steps of one unroll through a DiagonalStore (the merge kernels read its views; the diagonal tensors are
    not saved) give the outputs and gradients of stacking per call, and the store refuses a list that does not
    extend what it holds."""
    from eagle_trainer.kernels.ttt_attention import DiagonalStore, ttt_attention

    b, nh, nkv, t, d, steps = 1, 6, 2, 11, 16, 4
    g = torch.Generator().manual_seed(7)
    tokens = lambda n: torch.randn(b, t, n, d, generator=g).transpose(1, 2)  # token-major, as the draft makes them
    qs = [tokens(nh).requires_grad_() for _ in range(steps)]
    keys = [tokens(nkv).requires_grad_() for _ in range(steps)]
    values = [tokens(nkv).requires_grad_() for _ in range(steps)]
    grads = [torch.randn(b, nh, t, d, generator=g) for _ in range(steps)]
    results = []
    for store in (DiagonalStore(steps - 1), None):
        outs = [ttt_attention(qs[k], keys[0], values[0], keys[1:k + 1], values[1:k + 1], store=store)
                for k in range(steps)]
        leaves = [*qs, *keys, *values]
        results.append([*outs, *torch.autograd.grad(outs, leaves, grads)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    store = DiagonalStore(2)
    ttt_attention(qs[1], keys[0], values[0], keys[1:2], values[1:2], store=store)
    with pytest.raises(ValueError, match="do not extend"):
        ttt_attention(qs[2], keys[0], values[0], [keys[2], keys[1]], values[1:3], store=store)
    with pytest.raises(ValueError, match="capacity=2"):
        ttt_attention(qs[3], keys[0], values[0], keys[1:4], values[1:4], store=store)

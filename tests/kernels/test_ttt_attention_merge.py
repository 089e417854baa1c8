"""The TTT attention merge kernels against their plain-torch references (interpreted on the CPU in fp32, compiled on
a GPU), at odd sizes (a query-head group of 3, head dim 24). Outputs are NaN-poisoned before each run."""

import pytest
import torch
from kernel_checks import poison

from eagle_trainer.kernels import ttt_attention as ttt_mod
from eagle_trainer.kernels.ttt_attention import merge_backward, merge_forward
from eagle_trainer.kernels.ttt_attention.reference import (
    merge_backward_reference,
    merge_forward_reference,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    poison(monkeypatch, ttt_mod)


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

"""The gated delta rule over a draft tree (kernels/gdn/tree.py) against its node-by-node reference, and the
reference against the plain token-by-token rule along every root-to-leaf path.

Without a GPU the kernel runs in Triton's interpreter (conftest) in fp32 at odd sizes, outputs poisoned first.
"""

import pytest
import torch
from kernel_checks import poison, rel_err

from eagle_trainer.kernels.gdn import tree as tree_mod
from eagle_trainer.kernels.gdn.reference import l2norm_reference, tree_gated_delta_rule_reference
from eagle_trainer.kernels.gdn.tree import tree_gated_delta_rule

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# root-first trees: a chain, and an EAGLE-2-like tree (several children per node, depths 1-4)
CHAIN = [-1, 0, 1, 2, 3]
TREE = [-1, -1, -1, 0, 0, 1, 3, 3, 4, 6, 2, 10, 7]


def inputs(parents, heads, dk, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(parents)
    q = l2norm_reference(torch.randn(n, heads, dk, generator=gen)) * dk ** -0.5
    k = l2norm_reference(torch.randn(n, heads, dk, generator=gen))
    v = torch.randn(n, heads, dv, generator=gen)
    g = -torch.rand(n, heads, generator=gen) * 2  # log decay <= 0
    beta = torch.rand(n, heads, generator=gen)
    s0 = torch.randn(heads, dk, dv, generator=gen) * 0.3
    return [x.to(DEVICE) for x in (q, k, v, g, beta)] + [torch.tensor(parents, device=DEVICE), s0.to(DEVICE)]


@pytest.mark.parametrize("parents, heads, dk, dv", [
    (CHAIN, 3, 16, 40), (TREE, 2, 13, 37), (TREE, 5, 32, 64), ([-1], 1, 8, 8),
    pytest.param(TREE * 2, 32, 128, 128, marks=pytest.mark.gpu)])  # Qwen3-Next-80B-A3B's heads, a forest of 26
def test_tree_kernel_matches_reference(monkeypatch, parents, heads, dk, dv):
    poison(monkeypatch, tree_mod)
    args = inputs(parents, heads, dk, dv)
    out, states = tree_gated_delta_rule(*args)
    ref_out, ref_states = tree_gated_delta_rule_reference(*args)
    assert not out.isnan().any() and not states.isnan().any()
    assert rel_err(out, ref_out) < 1e-5 and rel_err(states, ref_states) < 1e-5


def test_reference_follows_each_path_as_plain_decoding_does():
    """Node i's output and state are the plain rule's after the tokens on the path root..i, from s0."""
    q, k, v, g, beta, parents, s0 = (x.cpu().double() if x.is_floating_point() else x.cpu()
                                     for x in inputs(TREE, 2, 8, 6, seed=3))
    out, states = tree_gated_delta_rule_reference(q, k, v, g, beta, parents, s0)
    for node in range(len(TREE)):
        path, i = [], node
        while i >= 0:
            path.append(i)
            i = TREE[i]
        state = s0.clone()
        for t in reversed(path):
            state = state * g[t].exp()[:, None, None]
            delta = beta[t, :, None] * (v[t] - torch.einsum("hk,hkv->hv", k[t], state))
            state = state + k[t, :, :, None] * delta[:, None]
        assert torch.allclose(states[node], state, atol=1e-12)
        assert torch.allclose(out[node], torch.einsum("hk,hkv->hv", q[node], state), atol=1e-12)

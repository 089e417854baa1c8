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


def inputs(parents, key_heads, group, dk, dv, seed=0, dtype=torch.float32):
    """q, k [n, Hk, Dk] and v [n, Hv, Dv] as slices of one conv-output row [n, C] (rows strided, as the decode path
    passes them), raw: the rule normalises and scales them; g, beta [n, Hv]; parents; s0 [Hv, Dk, Dv]."""
    gen = torch.Generator().manual_seed(seed)
    n, heads = len(parents), key_heads * group
    mixed = torch.randn(n, 2 * key_heads * dk + heads * dv, generator=gen).to(DEVICE, dtype)
    q, k, v = torch.split(mixed, [key_heads * dk, key_heads * dk, heads * dv], dim=-1)
    q, k, v = q.view(n, key_heads, dk), k.view(n, key_heads, dk), v.view(n, heads, dv)
    g = -torch.rand(n, heads, generator=gen) * 2  # log decay <= 0
    beta = torch.rand(n, heads, generator=gen).to(dtype)
    s0 = torch.randn(heads, dk, dv, generator=gen) * 0.3
    return [q, k, v, g.to(DEVICE), beta.to(DEVICE), torch.tensor(parents, device=DEVICE), s0.to(DEVICE)]


@pytest.mark.parametrize("parents, key_heads, group, dk, dv, dtype", [
    (CHAIN, 3, 1, 16, 40, torch.float32), (TREE, 2, 3, 13, 37, torch.float32), (TREE, 5, 2, 32, 64, torch.float32),
    ([-1], 1, 1, 8, 8, torch.float32), (TREE, 2, 2, 16, 24, torch.bfloat16),
    pytest.param(TREE * 2, 16, 2, 128, 128, torch.bfloat16, marks=pytest.mark.gpu)])  # Qwen3-Next-80B-A3B's heads
def test_tree_kernel_matches_reference(monkeypatch, parents, key_heads, group, dk, dv, dtype):
    poison(monkeypatch, tree_mod)
    args = inputs(parents, key_heads, group, dk, dv, dtype=dtype)
    assert len(parents) == 1 or args[0].stride(0) != key_heads * dk  # strided rows reach the kernel as they are
    out, states = tree_gated_delta_rule(*args)
    ref_out, ref_states = tree_gated_delta_rule_reference(*args)
    assert out.dtype == states.dtype == torch.float32
    assert not out.isnan().any() and not states.isnan().any()
    assert rel_err(out, ref_out) < 1e-5 and rel_err(states, ref_states) < 1e-5


def test_shapes_that_do_not_fit_are_refused():
    q, k, v, g, beta, parents, s0 = inputs(TREE, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple of Hk"):
        tree_gated_delta_rule(q, k, v[:, :3], g[:, :3], beta[:, :3], parents, s0[:3])
    with pytest.raises(ValueError, match="parents"):
        tree_gated_delta_rule(q, k, v, g, beta, parents[:-1], s0)


def test_reference_follows_each_path_as_plain_decoding_does():
    """Node i's output and state are the plain rule's after the tokens on the path root..i, from s0, with q and k
    normalised (q scaled by Dk^-0.5) and each key head serving its group of value heads."""
    q, k, v, g, beta, parents, s0 = (x.cpu().double() if x.is_floating_point() else x.cpu()
                                     for x in inputs(TREE, 2, 2, 8, 6, seed=3))
    out, states = tree_gated_delta_rule_reference(q, k, v, g, beta, parents, s0)
    q = l2norm_reference(q).repeat_interleave(2, dim=1) * 8 ** -0.5
    k = l2norm_reference(k).repeat_interleave(2, dim=1)
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

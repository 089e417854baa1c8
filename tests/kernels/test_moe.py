"""The Triton MoE core against its plain-torch reference.

Without a GPU the kernels run in Triton's interpreter (conftest) in fp32; with one, the same tests run compiled,
and the gpu-marked ones check bf16 at real Qwen3-MoE / Qwen3-Next shapes, run-to-run determinism and batch
invariance, with and without Qwen3-Next's gated shared expert.
"""

import pytest
import torch
from kernel_checks import poison, rel_err

from eagle_trainer.kernels.moe import SharedExpert, align_pairs, moe_experts, moe_forward, moe_route, moe_shared_expert
from eagle_trainer.kernels.moe import experts as experts_mod
from eagle_trainer.kernels.moe import shared as shared_mod
from eagle_trainer.kernels.moe.configs import get_config
from eagle_trainer.kernels.moe.reference import (align_pairs_reference, moe_block_reference, moe_experts_reference,
                                                 moe_route_reference, moe_shared_expert_reference)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the experts launcher allocates starts as NaN: an element no kernel writes fails the test."""
    poison(monkeypatch, experts_mod, shared_mod)


def random_layer(num_tokens, hidden, num_experts, inter, dtype=torch.float32, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(DEVICE, dtype)
    return (r(num_tokens, hidden), r(num_experts, hidden, s=scale), r(num_experts, 2 * inter, hidden, s=scale),
            r(num_experts, hidden, inter, s=scale))


def random_shared(hidden, inter, dtype=torch.float32, seed=0, scale=0.1):
    """Shared-expert weights; the gate's logits have a std of about scale * sqrt(hidden) for unit inputs."""
    g = torch.Generator().manual_seed(seed + 1000)
    def r(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
    return SharedExpert(r(inter, hidden), r(inter, hidden), r(hidden, inter), r(1, hidden))


@pytest.mark.parametrize("num_tokens,hidden,num_experts,top_k,norm", [
    (1, 48, 6, 2, True), (37, 80, 6, 2, True), (131, 72, 24, 3, False), (300, 64, 128, 8, True),
    (150, 96, 512, 10, True), (40, 64, 384, 10, False), (9, 32, 10, 10, True)])
def test_route_matches_reference(num_tokens, hidden, num_experts, top_k, norm):
    x, router, _, _ = random_layer(num_tokens, hidden, num_experts, 8, seed=num_tokens)
    logits, weights, ids = moe_route(x, router, top_k, norm)
    ref_logits, ref_weights, ref_ids = moe_route_reference(x, router, top_k, norm)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, ref_ids.to(DEVICE))
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)


def test_route_matches_hf_qwen3_next_router():
    """HF's Qwen3NextTopKRouter at the real Qwen3-Next-80B-A3B routing shape (512 experts, top-10, renormalised;
    a narrower hidden size): the same experts, and the weights to fp32 rounding (HF's softmax and sum run in
    another order). HF returns the weights in the logits' dtype; with fp32 logits that is fp32 too."""
    import json
    from pathlib import Path

    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextTopKRouter
    fields = json.loads((Path(__file__).parents[1] / "fixtures/qwen3_next_80b_a3b_config.json").read_text())
    config = Qwen3NextConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    config.hidden_size = 256
    router = Qwen3NextTopKRouter(config).to(DEVICE)
    assert (router.num_experts, router.top_k, router.norm_topk_prob) == (512, 10, True)
    x, weight, _, _ = random_layer(77, 256, 512, 8, seed=11, scale=0.2)  # logits of std 3
    with torch.no_grad():
        router.weight.copy_(weight)
        ref_logits, ref_weights, ref_ids = router(x)
    logits, weights, ids = moe_route(x, router.weight, router.top_k, router.norm_topk_prob)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(77, device=DEVICE))


def test_route_ties_go_to_the_lowest_expert():
    x, router, _, _ = random_layer(19, 32, 8, 8)
    router[5] = router[2]  # experts 2 and 5 always tie, as do 1, 4 and 7
    router[4] = router[1]
    router[7] = router[1]
    _, _, ids = moe_route(x, router, 8, True)
    for row in ids.tolist():  # all 8 experts chosen; within a tie the lower id comes first
        assert sorted(row) == list(range(8))
        assert row.index(2) < row.index(5) and row.index(1) < row.index(4) < row.index(7)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(1, 4, 1, 16), (37, 6, 2, 16), (200, 9, 3, 64)])
def test_align_pairs_blocks_hold_one_expert_each(num_tokens, num_experts, top_k, block_m):
    g = torch.Generator().manual_seed(num_tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]).to(DEVICE)
    sorted_pairs, block_expert = align_pairs(ids, num_experts, block_m)
    num_pairs = ids.numel()
    pairs = sorted_pairs.view(-1, block_m).cpu()
    flat = ids.reshape(-1).cpu()
    real = pairs[pairs < num_pairs]
    assert torch.equal(real.sort().values, torch.arange(num_pairs, dtype=torch.int32))  # each pair exactly once
    for blk, expert in zip(pairs, block_expert.tolist()):
        valid = blk[blk < num_pairs]
        if expert == num_experts:
            assert valid.numel() == 0
        else:
            assert valid.numel() > 0 and (flat[valid.long()] == expert).all()
            assert torch.equal(valid, valid.sort().values)  # stable: pair order within an expert


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [
    (1, 4, 1, 16), (37, 6, 2, 16), (300, 9, 3, 64), (200, 128, 8, 64), (150, 512, 10, 128), (1100, 128, 8, 64)])
def test_counting_sort_equals_a_stable_sort(num_tokens, num_experts, top_k, block_m):
    g = torch.Generator().manual_seed(num_tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]).to(DEVICE)
    ids[: num_tokens // 3, 0] = 1  # a hot expert
    pairs, blocks = align_pairs(ids.to(torch.int32), num_experts, block_m)
    ref_pairs, ref_blocks = align_pairs_reference(ids, num_experts, block_m)
    assert torch.equal(pairs, ref_pairs) and torch.equal(blocks, ref_blocks)


@pytest.mark.parametrize("num_tokens,hidden,num_experts,inter,top_k", [
    (1, 48, 6, 40, 2), (37, 80, 6, 48, 2), (131, 72, 24, 40, 3), (257, 64, 16, 96, 4)])
def test_experts_match_reference(poisoned, num_tokens, hidden, num_experts, inter, top_k):
    x, router, gate_up, down = random_layer(num_tokens, hidden, num_experts, inter, seed=num_tokens)
    _, weights, ids = moe_route(x, router, top_k, True)
    out = moe_experts(x, ids, weights, gate_up, down)
    ref = moe_experts_reference(x, ids, weights, gate_up, down)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5


def test_experts_with_idle_experts_and_one_hot_expert(poisoned):
    x, _, gate_up, down = random_layer(53, 64, 12, 40)
    weights = torch.rand(53, 2, device=DEVICE)
    ids = torch.full((53, 2), 3, device=DEVICE, dtype=torch.int32)  # every pair on expert 3; the other 11 idle
    ids[:, 1] = 7  # ... and on expert 7
    out = moe_experts(x, ids, weights, gate_up, down)
    assert rel_err(out, moe_experts_reference(x, ids, weights, gate_up, down)) < 1e-5
    ids = torch.full((53, 1), 11, device=DEVICE, dtype=torch.int32)  # all tokens on the last expert
    out = moe_experts(x, ids, weights[:, :1], gate_up, down)
    assert rel_err(out, moe_experts_reference(x, ids, weights[:, :1], gate_up, down)) < 1e-5


@pytest.mark.parametrize("num_tokens,hidden,inter", [(1, 48, 40), (37, 80, 56), (131, 72, 24), (257, 64, 96)])
def test_shared_expert_matches_reference(poisoned, num_tokens, hidden, inter):
    x = random_layer(num_tokens, hidden, 1, 8, seed=num_tokens)[0]
    shared = random_shared(hidden, inter, seed=num_tokens)
    out = moe_shared_expert(x, shared)
    ref = moe_shared_expert_reference(x, shared)
    assert out.dtype == x.dtype and not out.isnan().any()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("num_tokens,hidden,num_experts,inter,shared_inter,top_k", [
    (1, 48, 6, 40, 24, 2), (37, 80, 6, 48, 56, 2), (131, 72, 24, 40, 40, 3), (99, 64, 512, 16, 48, 10)])
def test_block_with_shared_expert_matches_reference(poisoned, num_tokens, hidden, num_experts, inter, shared_inter,
                                                    top_k):
    """Router, routed experts and the gated shared expert (the last term of the fp32 sum) against the fp64 block."""
    x, router, gate_up, down = random_layer(num_tokens, hidden, num_experts, inter, seed=num_tokens)
    shared = random_shared(hidden, shared_inter, seed=num_tokens)
    out = moe_forward(x, router, gate_up, down, top_k, True, shared=shared)
    ref = moe_block_reference(x, router, gate_up, down, top_k, True, shared=shared)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5
    routed = moe_block_reference(x, router, gate_up, down, top_k, True)
    assert rel_err(out, routed) > 1e-2  # the shared term is not negligible here: the check can fail


def test_block_with_shared_expert_is_deterministic_and_batch_invariant(poisoned):
    """Same input, same bits; a token's output is the same alone, in a small batch or among others, in any order
    (fp32 under the interpreter; compiled bf16 at the Qwen3-Next shape in the gpu test below)."""
    x, router, gate_up, down = random_layer(77, 72, 12, 40, seed=5)
    shared = random_shared(72, 56, seed=5)
    run = lambda h: moe_forward(h, router, gate_up, down, 3, True, shared=shared)  # noqa: E731
    full = run(x)
    assert torch.equal(full, run(x))
    picked = torch.tensor([5, 17, 76, 40], device=DEVICE)
    assert torch.equal(run(x[picked]), full[picked])
    assert torch.equal(run(x[33:34]), full[33:34])
    perm = torch.randperm(77, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert torch.equal(run(x[perm]), full[perm])
    other = random_layer(50, 72, 1, 8, seed=6)[0]
    assert torch.equal(run(torch.cat([other, x[:21]]))[50:], full[:21])


def test_shared_out_is_summed_last_in_fp32():
    """moe_experts' shared_out joins the fp32 sum: a zero term changes no bit, and in fp16 the block is the fp32 sum
    of the k pair outputs and then the shared term, rounded once (each pair's output computed alone, as k = 1 tokens),
    not the rounded routed sum plus the term rounded again."""
    x, router, gate_up, down = random_layer(45, 64, 6, 40, seed=3)
    _, weights, ids = moe_route(x, router, 2, True)
    routed = moe_experts(x, ids, weights, gate_up, down)
    assert torch.equal(moe_experts(x, ids, weights, gate_up, down, shared_out=torch.zeros_like(x)), routed)
    half = [t.half() for t in (x, gate_up, down)]
    routed16 = moe_experts(half[0], ids, weights, half[1], half[2])
    term = (torch.randn(45, 64, generator=torch.Generator().manual_seed(1)) * 1e-3).to(DEVICE, torch.float16)
    once = moe_experts(half[0], ids, weights, half[1], half[2], shared_out=term)
    pairs = moe_experts(half[0].repeat_interleave(2, 0), ids.reshape(-1, 1), weights.reshape(-1, 1), half[1], half[2])
    in_order = pairs.view(45, 2, 64).float().sum(1) + term.float()  # slot 0 + slot 1, then the shared term
    assert torch.equal(once, in_order.half())
    assert not torch.equal(once, (routed16.float() + term.float()).half())  # rounding twice differs somewhere


def test_forward_of_no_tokens_and_bad_shapes():
    x, router, gate_up, down = random_layer(0, 32, 4, 16)
    assert moe_forward(x, router, gate_up, down, 2, True).shape == (0, 32)
    with pytest.raises(ValueError, match="do not fit"):
        moe_experts(torch.zeros(3, 31, device=DEVICE), torch.zeros(3, 2, dtype=torch.int32, device=DEVICE),
                    torch.zeros(3, 2, device=DEVICE), gate_up, down)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(torch.zeros(3, 32, device=DEVICE), router, 5, True)
    shared = random_shared(32, 24)
    assert moe_forward(x, router, gate_up, down, 2, True, shared=shared).shape == (0, 32)
    with pytest.raises(ValueError, match="shared expert weights"):
        moe_shared_expert(torch.zeros(3, 32, device=DEVICE), shared._replace(down_proj=shared.gate_proj))
    with pytest.raises(ValueError, match="shared_out"):
        moe_experts(torch.zeros(3, 32, device=DEVICE), torch.zeros(3, 2, dtype=torch.int32, device=DEVICE),
                    torch.zeros(3, 2, device=DEVICE), gate_up, down, shared_out=torch.zeros(3, 31, device=DEVICE))


# Real shapes: Qwen3-30B-A3B (E128, k8, I768, H2048) and Qwen3-Next (E512, k10, I512, H2048).
REAL_SHAPES = [(128, 8, 768, 2048), (512, 10, 512, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts,top_k,inter,hidden", REAL_SHAPES)
def test_gpu_bf16_real_shape_matches_reference(poisoned, num_experts, top_k, inter, hidden):
    x, router, gate_up, down = random_layer(3001, hidden, num_experts, inter, dtype=torch.bfloat16, scale=0.02)
    logits, weights, ids = moe_route(x, router, top_k, True)
    ref_logits, ref_weights, ref_ids = moe_route_reference(x, router, top_k, True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-2, atol=1e-2)
    agree = (ids == ref_ids).all(dim=1).float().mean().item()
    assert agree > 0.99  # bf16 logits: a last-bit difference in accumulation can swap near-ties
    for invariant in (True, False):
        out = moe_experts(x, ids, weights, gate_up, down, batch_invariant=invariant)
        assert rel_err(out, moe_experts_reference(x, ids, weights, gate_up, down)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts,top_k,inter,hidden", REAL_SHAPES)
def test_gpu_deterministic_and_batch_invariant(num_experts, top_k, inter, hidden):
    x, router, gate_up, down = random_layer(4096, hidden, num_experts, inter, dtype=torch.bfloat16, scale=0.02)
    run = lambda h: moe_forward(h, router, gate_up, down, top_k, True, batch_invariant=True)  # noqa: E731
    full = run(x)
    assert torch.equal(full, run(x))  # same input, same bits
    # A token's output is the same alone, in a small batch or among 4096 others, in any order.
    picked = torch.tensor([5, 17, 4000, 1234, 77], device=DEVICE)
    assert torch.equal(run(x[picked]), full[picked])
    perm = torch.randperm(4096, device=DEVICE)
    assert torch.equal(run(x[perm]), full[perm])
    assert torch.equal(run(x[:333]), full[:333])
    other = torch.randn(9000, hidden, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(run(torch.cat([other, x[:100]]))[9000:], full[:100])
    assert get_config(DEVICE, num_experts, inter, hidden, 100 * top_k, True) == \
        get_config(DEVICE, num_experts, inter, hidden, 9100 * top_k, True)


# Qwen3-Next-80B-A3B's sparse block: E512, k10, I512, H2048, and a shared expert of intermediate size 512.
NEXT_SHARED_INTER = 512


@pytest.mark.gpu
@pytest.mark.parametrize("invariant", [True, False])
def test_gpu_bf16_block_with_shared_expert_matches_reference(poisoned, invariant):
    num_experts, top_k, inter, hidden = REAL_SHAPES[1]
    x, router, gate_up, down = random_layer(3001, hidden, num_experts, inter, dtype=torch.bfloat16, scale=0.02)
    shared = random_shared(hidden, NEXT_SHARED_INTER, dtype=torch.bfloat16, scale=0.02)
    _, weights, ids = moe_route(x, router, top_k, True)
    shared_out = moe_shared_expert(x, shared, batch_invariant=invariant)
    assert rel_err(shared_out, moe_shared_expert_reference(x, shared)) < 1e-2
    out = moe_experts(x, ids, weights, gate_up, down, batch_invariant=invariant, shared_out=shared_out)
    ref = moe_experts_reference(x, ids, weights, gate_up, down) + moe_shared_expert_reference(x, shared)
    assert rel_err(out, ref) < 1e-2  # the same expert choice on both sides: bf16 rounding only


@pytest.mark.gpu
def test_gpu_block_with_shared_expert_deterministic_and_batch_invariant():
    num_experts, top_k, inter, hidden = REAL_SHAPES[1]
    x, router, gate_up, down = random_layer(4096, hidden, num_experts, inter, dtype=torch.bfloat16, scale=0.02)
    shared = random_shared(hidden, NEXT_SHARED_INTER, dtype=torch.bfloat16, scale=0.02)
    run = lambda h: moe_forward(h, router, gate_up, down, top_k, True, batch_invariant=True,  # noqa: E731
                                shared=shared)
    full = run(x)
    assert torch.equal(full, run(x))  # same input, same bits
    picked = torch.tensor([5, 17, 4000, 1234, 77], device=DEVICE)
    assert torch.equal(run(x[picked]), full[picked])
    assert torch.equal(run(x[4000:4001]), full[4000:4001])
    perm = torch.randperm(4096, device=DEVICE)
    assert torch.equal(run(x[perm]), full[perm])
    assert torch.equal(run(x[:333]), full[:333])
    other = torch.randn(9000, hidden, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(run(torch.cat([other, x[:100]]))[9000:], full[:100])
    # the shared expert's GEMMs (one expert, E = 1) take one tile config whatever the token count
    assert get_config(DEVICE, 1, NEXT_SHARED_INTER, hidden, 1, True) == \
        get_config(DEVICE, 1, NEXT_SHARED_INTER, hidden, 9100, True)

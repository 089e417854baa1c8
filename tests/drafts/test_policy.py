"""Selective recompute and torch.compile applied from outside the draft (drafts/policy.py): the same results,
less memory, and one static-shape compiled frame per piece."""

import copy

import pytest
import torch

from eagle_trainer.drafts.policy import apply_compile, apply_recompute, recompute_on
from eagle_trainer.drafts.unroll import unroll_eagle3
from test_unroll import tiny_draft


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_step_keeps_products_not_elementwise_work():
    """Between forward and backward the compiled step under keep_products holds its matrix products and nothing more:
    h (the o projection's addmm over the residual) and the gate/up product, with g_next (down's addmm) the output
    itself; no [T, I] SwiGLU product, no normed copy, no separate [T, H] product terms. Its gradients are those of
    the step compiled without it."""
    from eagle_trainer.drafts.unroll import UNROLL_PIECES
    t, h, i, nh, d = 1024, 256, 768, 4, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1, t, h), (1, nh, t, d), (h, nh * d), (h,), (2 * i, h), (h, i), (h,)]
    base = [torch.randn(*s, device="cuda", generator=g) * (0.05 if len(s) == 2 else 1) for s in shapes]
    base[3], base[6] = 1 + 0.1 * base[3], 1 + 0.1 * base[6]  # norm weights
    grads = {}
    for name, fn in (("selective", torch.compile(UNROLL_PIECES.recomputed.step_out)),
                     ("plain", torch.compile(UNROLL_PIECES.step_out))):
        args = [x.bfloat16().requires_grad_() for x in base]
        fn(*args, 1e-6)  # compile outside the measurement
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        g_next, normed = fn(*args, 1e-6)
        held = torch.cuda.memory_allocated() - before - 2 * g_next.numel() * g_next.element_size()
        if name == "selective":
            products = (t * h + t * 2 * i) * 2
            assert held <= products + 64 * 1024, f"held {held} bytes, the products are {products}"
        (g_next.float().square().mean() + normed.float().mean()).backward()
        grads[name] = [a.grad for a in args]
    for ours, plain in zip(grads["selective"], grads["plain"], strict=True):
        assert ((ours.float() - plain.float()).norm() / plain.float().norm()).item() < 1e-2


@pytest.mark.parametrize("attention,dtype", [("naive", torch.float64), ("fused", torch.float32)])
def test_recompute_changes_memory_not_results(attention, dtype):
    """draft.recompute (keep_products) forms the elementwise work again in backward: the same hidden states and the
    same gradients as keeping it (the same operations run again: equal to rounding)."""
    draft = tiny_draft(seed=3).to(dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, draft.config.vocab_size, (2, 11), generator=g)
    aux = torch.randn(2, 11, 3 * draft.config.target_hidden_size, generator=g, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    results = []
    for recompute in (True, False):
        draft.zero_grad(set_to_none=True)
        model = copy.copy(draft)  # the same parameters; the policy sets the copy's unroll pieces
        if recompute:
            apply_recompute(model)
        normed = unroll_eagle3(model, ids, aux, 3, attention)
        sum((h * (k + 1)).square().mean() for k, h in enumerate(normed)).backward()
        grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
        results.append(([h.detach() for h in normed], grads))
    (on, on_grads), (off, off_grads) = results
    assert on_grads.keys() == off_grads.keys() and len(on_grads) > 5
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for name in on_grads:
        torch.testing.assert_close(on_grads[name], off_grads[name], rtol=tol * 100, atol=tol)


def test_compiled_pieces_trace_with_static_shapes():
    """The unroll's pieces, recomputed then compiled (policy.apply_recompute, apply_compile), each compile as a frame
    of their own, with every size fixed: wrappers sharing one code object were recompiles of one frame, and torch
    2.11 marked the sizes that differed between them (the weights' widths too) dynamic, which made Inductor's
    kernels 2-3x slower on an H100."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    draft = tiny_draft(seed=5).float()
    apply_recompute(draft)
    recomputed = draft.unroll_pieces
    apply_compile(draft, backend=recorder)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, draft.config.vocab_size, (1, 13), generator=g)
    aux = torch.randn(1, 13, 3 * draft.config.target_hidden_size, generator=g)
    sum(h.square().mean() for h in unroll_eagle3(draft, ids, aux, 3, "naive")).backward()
    assert len(recorder.graphs) == 3  # token q/k/v, step q/k/v, step out: once each
    codes = {fn.__code__ for fn in (recomputed.token_qkv, recomputed.step_qkv, recomputed.step_out)}
    assert len(codes) == 3
    for graph in recorder.graphs:
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                value = node.meta["example_value"]
                assert isinstance(value, torch.Tensor), f"{node.name} is a symbolic size: {value}"
                assert all(isinstance(s, int) for s in value.shape), f"{node.name} has a dynamic shape {value.shape}"
    torch._dynamo.reset()


def test_recompute_auto_is_on_a_gpu_only():
    """draft.recompute: as set, or (None) on a GPU, where it saves memory, and off on the CPU."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # only the device's type is read
    assert [recompute_on(None, cpu), recompute_on(None, gpu)] == [False, True]
    assert [recompute_on(True, cpu), recompute_on(False, gpu)] == [True, False]

"""The TTT unroll equals serving-style autoregressive drafting per prefix (DESIGN section 4), and a packed
batch gives what the same documents give right-padded."""

import copy

import pytest
import torch

from batches import documents_of, pack_rows

from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts import eagle3_loss
from eagle_trainer.drafts.eagle3 import DraftKVCache, Eagle3Config, Eagle3Draft
from eagle_trainer.drafts.ttt import (naive_ttt_attention, simulated_acceptance, step_valid_mask, ttt_hidden,
                                      ttt_logits, ttt_loss)
from eagle_trainer.types import TargetOutputs


def tiny_draft(seed=0, **kw) -> Eagle3Draft:
    cfg = dict(hidden_size=32, target_hidden_size=24, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
               vocab_size=50, draft_vocab_size=20, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=256, aux_layer_ids=(1, 2, 3))
    cfg.update(kw)
    torch.manual_seed(seed)
    draft = Eagle3Draft(Eagle3Config(**cfg)).double()
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return draft


@pytest.mark.parametrize("t,steps", [(11, 7), (5, 3), (1, 2)])
def test_ttt_matches_autoregressive_drafting_per_prefix(t, steps):
    draft = tiny_draft()
    b = 2
    ids = torch.randint(0, 50, (b, t))
    aux = torch.randn(b, t, 3 * 24, dtype=torch.float64)
    unrolled = ttt_logits(draft, ids, aux, steps, attention="naive")
    g0 = draft.project(aux)
    checked = 0
    for prefix in range(t):
        cache = DraftKVCache(draft)
        pos = torch.arange(prefix + 1).expand(b, -1)
        tokens = torch.cat([ids[:, 1:prefix + 2], ids.new_zeros(b, 1)], 1)[:, :prefix + 1]  # x[1..prefix+1]
        g = cache.extend(tokens, g0[:, :prefix + 1], pos)[:, -1:]
        for k in range(steps):
            if k > 0:
                nxt = prefix + 1 + k
                tok = ids[:, nxt:nxt + 1] if nxt < t else ids.new_zeros(b, 1)
                g = cache.extend(tok, g, torch.full((b, 1), prefix + k))
            expected = draft.logits(g)[:, 0]
            torch.testing.assert_close(unrolled[k][:, prefix], expected, rtol=1e-9, atol=1e-9)
            checked += 1
    assert checked == t * steps


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


def test_valid_mask_and_loss_normalisation():
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    attn = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    teacher_ok = torch.ones_like(loss_mask)
    valid = step_valid_mask(loss_mask, attn, teacher_ok, 3)
    # step 0 at t predicts token t+2: tokens 2,3,4 are loss tokens -> t = 0,1,2
    assert valid[0].tolist() == [[True, True, True, False, False, False]]
    assert valid[1].tolist() == [[True, True, False, False, False, False]]
    assert valid[2].tolist() == [[True, False, False, False, False, False]]
    vd = 5
    probs = torch.softmax(torch.randn(1, 6, vd), -1)
    perfect = [torch.log(probs).roll(-(1 + k), 1) for k in range(3)]  # logits equal to the labels
    out = ttt_loss(perfect, probs, valid, step_weight=0.8)
    assert out.step_acc == [1.0, 1.0, 1.0]
    assert out.step_count == [3, 2, 1]
    entropy = -(probs * probs.log()).sum(-1)[0]
    expected = [entropy[1:4].mean(), entropy[2:4].mean(), entropy[3:4].mean()]
    torch.testing.assert_close(torch.tensor(out.step_loss), torch.stack(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, sum(0.8**k * e for k, e in enumerate(expected)), rtol=1e-5, atol=1e-6)


def test_valid_mask_keeps_each_chain_in_its_document():
    loss_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ones = torch.ones_like(loss_mask)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    one_row = step_valid_mask(loss_mask, ones, ones, 2)
    packed = step_valid_mask(loss_mask, ones, ones, 2, documents)
    assert one_row[0].tolist() == [[True, True, True, True, True, False, False]]
    # step k at t predicts token t+2+k: it must lie in t's document
    assert packed[0].tolist() == [[True, False, False, True, True, False, False]]
    assert packed[1].tolist() == [[False, False, False, True, False, False, False]]


def random_outputs(padded, packed, aux_dim, vd, dtype, seed=0):
    """TargetOutputs for a padded batch and the same values laid out as the packed batch."""
    g = torch.Generator().manual_seed(seed)
    b, t = padded.input_ids.shape
    aux = torch.randn(b, t, aux_dim, generator=g, dtype=dtype)
    logits = torch.randn(b, t, vd, generator=g, dtype=dtype) * 3
    valid = torch.rand(b, t, generator=g) > 0.1
    final = torch.randn(b, t, aux_dim // 3, generator=g, dtype=dtype)
    return [TargetOutputs(aux_hidden=a, last_hidden=None, final_hidden=f, teacher_logits=p, teacher_valid=v)
            for a, f, p, v in ((aux, final, logits, valid),
                               (pack_rows(aux, padded, packed), pack_rows(final, padded, packed),
                                pack_rows(logits, padded, packed, fill=0), pack_rows(valid, padded, packed)))]


@pytest.mark.parametrize("attention,dtype,tol", [("naive", torch.float64, 1e-10), ("flex", torch.float32, 1e-5)])
def test_packed_batch_equals_padded(attention, dtype, tol):
    """Each step's logits at t equal the padded batch's wherever the chain's inputs stay in t's document
    (t+1+k before its end), and the loss, its per-step terms and counts are the same (the positions that count
    are the same pairs (document, t), and each step is normalised over them)."""
    lengths, steps = (7, 1, 12, 2, 9), 4
    padded, packed = documents_of(lengths, 50, pad_to=8)
    assert packed.input_ids.shape == (1, 32) and packed.cu_seqlens.tolist() == [0, 7, 8, 20, 22, 31, 32]
    draft = tiny_draft().to(dtype)
    out_padded, out_packed = random_outputs(padded, packed, 72, 20, dtype)
    cfg = DraftConfig(ttt_steps=steps, draft_vocab_size=20)
    with torch.set_grad_enabled(attention == "naive"):  # flex has no backward on the CPU
        ref = ttt_logits(draft, padded.input_ids, out_padded.aux_hidden, steps, attention)
        got = ttt_logits(draft, packed.input_ids, out_packed.aux_hidden, steps, attention, packed.position_ids,
                         packed.document_ids())
        for k in range(steps):
            for row, (n, start) in enumerate(zip(lengths, packed.cu_seqlens.tolist())):
                m = max(n - 1 - k, 0)
                torch.testing.assert_close(got[k][0, start:start + m], ref[k][row, :m], rtol=tol, atol=tol)
        a = eagle3_loss(draft, padded, out_padded, cfg, attention)
        b = eagle3_loss(draft, packed, out_packed, cfg, attention)
    assert a.step_count == b.step_count and a.step_count[0] > a.step_count[-1] > 0
    torch.testing.assert_close(torch.tensor(b.step_loss), torch.tensor(a.step_loss), rtol=tol, atol=0)
    torch.testing.assert_close(b.loss, a.loss, rtol=tol, atol=0)
    assert b.step_acc == a.step_acc
    if attention == "naive":
        a.loss.backward()
        grad = draft.fc.weight.grad.clone()
        draft.zero_grad()
        b.loss.backward()
        torch.testing.assert_close(draft.fc.weight.grad, grad, rtol=1e-9, atol=1e-12)


def test_simulated_acceptance():
    assert simulated_acceptance([1.0, 1.0]) == 3.0
    assert simulated_acceptance([0.5, 0.5]) == 1.75
    assert simulated_acceptance([0.0, 1.0]) == 1.0


@pytest.mark.parametrize("t,num_prev", [(37, 3), (5, 0), (130, 6), (1, 2)])
def test_flex_lse_merge_equals_naive_attention(t, num_prev):
    from eagle_trainer.drafts.ttt import flex_ttt_attention

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
    from eagle_trainer.drafts.ttt import flex_ttt_attention

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
    err = lambda a, b: float((a - b).norm() / b.norm())
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

    from eagle_trainer.drafts.ttt import fused_ttt_attention

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
@pytest.mark.parametrize("t,packed", [(300, False), (2048, False), (1000, True)])
def test_fused_path_matches_naive_on_gpu_bf16(t, packed):
    """cuDNN (FlashAttention-2 varlen when packed) step 0 + the merge kernels in bf16, against the naive reference in
    fp32 on the same values: output and every gradient within bf16 rounding (norm-relative 1e-2)."""
    import functools

    from eagle_trainer.drafts.ttt import fused_ttt_attention

    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(1, t, 32, 128, device=dev).transpose(1, 2)  # [B, nh, T, D], strided as the draft makes it
    kv = [torch.randn(1, t, 4, 128, device=dev).transpose(1, 2) for _ in range(8)]
    grad = torch.randn_like(q)
    documents = None
    if packed:
        documents = torch.repeat_interleave(torch.arange(4, device=dev), torch.tensor([1, 400, 99, t - 500],
                                                                                      device=dev))[None]
    leaves = lambda xs, dtype: [x.detach().to(dtype).requires_grad_() for x in xs]
    q16, kv16 = leaves([q], torch.bfloat16)[0], leaves(kv, torch.bfloat16)
    got = attention_grads(functools.partial(fused_ttt_attention, documents=documents), q16, kv16,
                          grad.to(torch.bfloat16))
    want = attention_grads(functools.partial(naive_ttt_attention, documents=documents), leaves([q], torch.float32)[0],
                           leaves(kv, torch.float32), grad)
    for name, a, b in zip(["out", "dq", "dk0", "dv0"] + [f"diag{j}" for j in range(6)], got, want):
        err = float((a.float() - b).norm() / b.norm())
        assert err < 1e-2, (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_fused_unroll_on_gpu_matches_cpu_reference(packed):
    """The GPU unroll as training runs it (compiled step pieces, fused attention, bf16 autocast over fp32 weights)
    against the eager naive unroll in fp64 on the CPU (the truth): every step's logits and the fc gradient no
    further from it than the same eager unroll in bf16 on the CPU is (1.5x + 1e-3)."""
    torch.manual_seed(0)
    draft = tiny_draft(hidden_size=256, target_hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=64,
                       intermediate_size=512, vocab_size=1000, draft_vocab_size=500)
    lengths = (300, 1, 77, 140, 5) if packed else (523,)
    _, batch = documents_of(lengths, 1000, pad_to=1)
    documents = batch.document_ids() if packed else None
    positions = batch.position_ids if packed else None
    aux = torch.randn(1, batch.input_ids.shape[1], 3 * 256)
    runs = []
    for dev, dtype, attention in (("cuda", torch.float32, "fused"), ("cpu", torch.bfloat16, "naive"),
                                  ("cpu", torch.float64, "naive")):
        model = copy.deepcopy(draft).to(dev, dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = ttt_logits(model, batch.input_ids.to(dev), aux.to(dev, dtype), 4, attention,
                                None if positions is None else positions.to(dev),
                                None if documents is None else documents.to(dev))
            sum(x.float().square().mean() for x in logits).backward()
        runs.append((torch.stack(logits).double().cpu(), model.fc.weight.grad.double().cpu()))
    ours, bf16, truth = runs
    for i, name in enumerate(("logits", "fc grad")):
        err = lambda run: float((run[i] - truth[i]).norm() / truth[i].norm())  # noqa: B023
        assert err(ours) <= 1.5 * err(bf16) + 1e-3, (name, err(ours), err(bf16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_step_keeps_products_not_elementwise_work():
    """Between forward and backward the compiled step under keep_products holds its matrix products and nothing more:
    h (the o projection's addmm over the residual) and the gate/up product, with g_next (down's addmm) the output
    itself; no [T, I] SwiGLU product, no normed copy, no separate [T, H] product terms. Its gradients are those of
    the step compiled without it."""
    from eagle_trainer.drafts.ttt import _compiled, _step_out
    t, h, i, nh, d = 1024, 256, 768, 4, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1, t, h), (1, nh, t, d), (h, nh * d), (h,), (2 * i, h), (h, i), (h,)]
    base = [torch.randn(*s, device="cuda", generator=g) * (0.05 if len(s) == 2 else 1) for s in shapes]
    base[3], base[6] = 1 + 0.1 * base[3], 1 + 0.1 * base[6]  # norm weights
    grads = {}
    for name, fn in (("selective", _compiled(_step_out, "cuda")), ("plain", torch.compile(_step_out))):
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
        normed = ttt_hidden(draft, ids, aux, 3, attention, recompute=recompute)
        sum((h * (k + 1)).square().mean() for k, h in enumerate(normed)).backward()
        grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
        results.append(([h.detach() for h in normed], grads))
    (on, on_grads), (off, off_grads) = results
    assert on_grads.keys() == off_grads.keys() and len(on_grads) > 5
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for name in on_grads:
        torch.testing.assert_close(on_grads[name], off_grads[name], rtol=tol * 100, atol=tol)


def test_compiled_pieces_trace_with_static_shapes(monkeypatch):
    """The unroll's compiled pieces under keep_products each compile as a frame of their own, with every size fixed:
    wrappers sharing one code object were recompiles of one frame, and torch 2.11 marked the sizes that differed
    between them (the weights' widths too) dynamic, which made Inductor's kernels 2-3x slower on an H100."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from eagle_trainer.drafts import ttt
    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    monkeypatch.setattr(ttt, "_compiled", lambda fn, device, recompute=True: torch.compile(
        ttt.keep_products(fn) if recompute else fn, backend=recorder))
    draft = tiny_draft(seed=5).float()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, draft.config.vocab_size, (1, 13), generator=g)
    aux = torch.randn(1, 13, 3 * draft.config.target_hidden_size, generator=g)
    sum(h.square().mean() for h in ttt_hidden(draft, ids, aux, 3, "naive", recompute=True)).backward()
    assert len(recorder.graphs) == 3  # token q/k/v, step q/k/v, step out: once each
    codes = {ttt.keep_products(fn).__code__ for fn in (ttt._token_qkv, ttt._step_qkv, ttt._step_out)}
    assert len(codes) == 3
    for graph in recorder.graphs:
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                value = node.meta["example_value"]
                assert isinstance(value, torch.Tensor), f"{node.name} is a symbolic size: {value}"
                assert all(isinstance(s, int) for s in value.shape), f"{node.name} has a dynamic shape {value.shape}"
    torch._dynamo.reset()


def test_row_windows_sum_their_gradients_like_slices():
    """row_windows: K overlapping row windows of one tensor; backward sums their gradients in place into one tensor,
    equal to what slicing gives, and a second backward through the same windows is refused."""
    from eagle_trainer.drafts.ttt import row_windows
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(2, 6, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    windows = row_windows(x, 6, 4)
    assert all(torch.equal(w, x[:, k:k + 6]) for k, w in enumerate(windows))
    loss = sum((w * c).sum() for w, c in zip(windows, weights))
    (ours,) = torch.autograd.grad(loss, x, retain_graph=True)
    (want,) = torch.autograd.grad(sum((x[:, k:k + 6] * c).sum() for k, c in enumerate(weights)), x)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="ran twice"):
        torch.autograd.grad(loss, x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_host_copy_of_the_loss_and_metrics(device):
    from eagle_trainer.drafts.ttt import TTTLoss
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    stats = torch.tensor([[1.5, 0.25, 7.0, 3.0], [2.5, 0.5, 6.0, 4.0]], device=device)
    out = TTTLoss(torch.tensor(0.75, device=device), stats.clone(), extra_names=("feature_loss",))
    out.start_host_copy()
    out.stats.zero_()  # queued after the copy: what was copied is what the loss held then
    out.loss.zero_()
    assert out.host_loss == 0.75
    assert out.step_loss == [1.5, 2.5] and out.step_acc == [0.25, 0.5] and out.step_count == [7, 6]
    assert out.extra == {"feature_loss": [3.0, 4.0]}
    late = TTTLoss(torch.tensor(1.25, device=device), stats)  # without start_host_copy: copied at the first read
    assert late.step_loss == [1.5, 2.5] and late.host_loss == 1.25

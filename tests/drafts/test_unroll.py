"""The TTT unroll equals serving-style autoregressive drafting per prefix (docs/design.md, TTT), and a packed
batch gives what the same documents give right-padded."""

import copy

import pytest
import torch

from batches import documents_of, pack_rows

from drafting import check_against_kv_cache
from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft, eagle3_loss
from eagle_trainer.drafts.policy import apply_compile, apply_recompute
from eagle_trainer.drafts.unroll import unroll_eagle3
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


def ttt_logits(draft: Eagle3Draft, *args, **kwargs) -> list[torch.Tensor]:
    """The unroll's K steps of draft-vocab logits [B, T, Vd]."""
    return [draft.lm_head(h) for h in unroll_eagle3(draft, *args, **kwargs)]


@pytest.mark.parametrize("t,steps", [(11, 7), (5, 3), (1, 2)])
def test_ttt_matches_autoregressive_drafting_per_prefix(t, steps):
    draft = tiny_draft()
    b = 2
    ids = torch.randint(0, 50, (b, t))
    aux = torch.randn(b, t, 3 * 24, dtype=torch.float64)
    unrolled = ttt_logits(draft, ids, aux, steps, attention="naive")
    assert check_against_kv_cache(draft, ids, aux, unrolled, read=lambda d, g: d.logits(g)) == t * steps


def random_outputs(padded, packed, aux_dim, vd, dtype, seed=0):
    """TargetOutputs for a padded batch and the same values laid out as the packed batch."""
    g = torch.Generator().manual_seed(seed)
    b, t = padded.input_ids.shape
    aux = torch.randn(b, t, aux_dim, generator=g, dtype=dtype)
    logits = torch.randn(b, t, vd, generator=g, dtype=dtype) * 3
    valid = torch.rand(b, t, generator=g) > 0.1
    final = torch.randn(b, t, aux_dim // 3, generator=g, dtype=dtype)
    return [TargetOutputs(aux_hidden=a, final_hidden=f, teacher_logits=p, teacher_valid=v)
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
        if dev == "cuda":  # as the trainer applies them
            apply_recompute(model)
            apply_compile(model)
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


def test_row_windows_sum_their_gradients_like_slices():
    """row_windows: K overlapping row windows of one tensor; backward sums their gradients in place into one tensor,
    equal to what slicing gives, and a second backward through the same windows is refused."""
    from eagle_trainer.drafts.unroll import row_windows
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

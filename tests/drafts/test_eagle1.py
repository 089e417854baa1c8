"""The EAGLE-1 draft: its unroll equals serving-style drafting per prefix, its layout matches the engines'
LlamaForCausalLMEagle (no layer-0 input norm, no final norm), and its loss reads the final normed feature."""

import pytest
import torch

from batches import documents_of, draft_vocab, pack_rows

from drafting import check_against_kv_cache
from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts.eagle1 import Eagle1Config, Eagle1Draft, eagle1_loss
from eagle_trainer.drafts.unroll import unroll
from eagle_trainer.types import Batch, TargetOutputs

H, V, VD = 32, 50, 20


def tiny_draft(seed=0, **kw) -> Eagle1Draft:
    cfg = dict(hidden_size=H, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, vocab_size=V,
               draft_vocab_size=VD, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256)
    cfg.update(kw)
    torch.manual_seed(seed)
    draft = Eagle1Draft(Eagle1Config(**cfg)).double()
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.3)
    draft.set_target_weights(torch.randn(V, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64))
    ids, t2d = draft_vocab(V, VD)
    draft.set_vocab_map(ids - torch.arange(VD), t2d)
    return draft


def test_layout_is_llama_eagle():
    names = set(tiny_draft(num_layers=2).trainable_state_dict())
    assert {"fc.weight", "fc.bias", "layers.1.input_layernorm.weight", "d2t", "t2d"} <= names
    assert "layers.0.input_layernorm.weight" not in names
    assert not any(n.startswith(("norm.", "lm_head", "embed_tokens")) for n in names)
    assert "fc.bias" not in tiny_draft(fc_bias=False).trainable_state_dict()


@pytest.mark.parametrize("t,steps,layers", [(11, 3, 2), (6, 1, 1), (1, 2, 1)])
def test_unroll_matches_autoregressive_drafting_per_prefix(t, steps, layers):
    """Step k at t must be what an engine computes drafting k+1 tokens after prefix t with a KV cache."""
    draft = tiny_draft(num_layers=layers)
    b = 2
    ids = torch.randint(0, V, (b, t))
    feats = torch.randn(b, t, H, dtype=torch.float64)
    unrolled = unroll(draft, ids, feats, steps, attention="naive")
    assert check_against_kv_cache(draft, ids, feats, unrolled) == t * steps


def outputs_for(draft, b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(b, t, H, generator=g, dtype=torch.float64)
    logits = torch.randn(b, t, VD, generator=g, dtype=torch.float64) * 3
    valid = torch.ones(b, t, dtype=torch.bool)
    return TargetOutputs(aux_hidden=None, final_hidden=final, teacher_logits=logits,
                         teacher_valid=valid)


def test_loss_regresses_the_next_feature_and_the_teacher():
    draft = tiny_draft()
    b, t = 2, 9
    ids = torch.randint(0, V, (b, t))
    ones = torch.ones(b, t, dtype=torch.bool)
    batch = Batch(ids, ones, ones)
    out = outputs_for(draft, b, t)
    cfg = DraftConfig(algorithm="eagle1", ttt_steps=1, draft_vocab_size=VD, feature_noise=0.0)
    draft.eval()
    loss = eagle1_loss(draft, batch, out, cfg, "naive")
    # by hand: step 0 at t predicts f[t+1]; valid where token t+2 exists (t <= T-3)
    f_hat = unroll(draft, ids, out.final_hidden, 1)[0]
    n = t - 2
    feature = torch.nn.functional.smooth_l1_loss(f_hat[:, :n], out.final_hidden[:, 1:n + 1], reduction="none")
    logits = draft.draft_logits(f_hat[:, :n])
    ce = -(out.teacher_probs()[:, 1:n + 1] * logits.log_softmax(-1)).sum(-1)
    expect = feature.mean(-1).mean() + 0.1 * ce.mean()
    torch.testing.assert_close(loss.loss, expect, rtol=1e-9, atol=1e-12)
    assert loss.step_count == [b * n] and len(loss.extra["feature_loss"]) == 1
    # noise only while training, and only on the inputs (the regression target stays clean)
    draft.train()
    cfg_noisy = DraftConfig(algorithm="eagle1", ttt_steps=1, draft_vocab_size=VD, feature_noise=0.1)
    torch.manual_seed(0)
    noisy = eagle1_loss(draft, batch, out, cfg_noisy, "naive").loss
    assert noisy != loss.loss
    draft.eval()
    assert eagle1_loss(draft, batch, out, cfg_noisy, "naive").loss == loss.loss


def test_unrolled_loss_has_k_steps():
    draft = tiny_draft()
    b, t = 1, 12
    ids = torch.randint(0, V, (b, t))
    ones = torch.ones(b, t, dtype=torch.bool)
    cfg = DraftConfig(algorithm="eagle1", ttt_steps=3, draft_vocab_size=VD)
    loss = eagle1_loss(draft, Batch(ids, ones, ones), outputs_for(draft, b, t), cfg, "naive")
    assert loss.step_count == [t - 2, t - 3, t - 4] and len(loss.step_acc) == 3
    loss.loss.backward()
    assert draft.fc.weight.grad is not None and draft.embed_tokens.weight.grad is None


@pytest.mark.parametrize("attention,dtype,tol", [("naive", torch.float64, 1e-10), ("flex", torch.float32, 1e-5)])
def test_packed_batch_equals_padded(attention, dtype, tol):
    """The unroll on packed documents equals the padded one wherever step k's chain stays in t's document, and
    so does the loss (as the EAGLE-3 unroll; two layers, so every layer's step-0 keys are kept per document)."""
    lengths, steps = (6, 1, 11, 3), 3
    padded, packed = documents_of(lengths, V, seed=1, pad_to=8)
    draft = tiny_draft(num_layers=2).to(dtype)
    draft.eval()  # no feature noise: both runs see the same inputs
    out = outputs_for(draft, *padded.input_ids.shape, seed=2)
    out = TargetOutputs(aux_hidden=None, final_hidden=out.final_hidden.to(dtype),
                        teacher_logits=out.teacher_logits.to(dtype), teacher_valid=out.teacher_valid)
    out_packed = TargetOutputs(aux_hidden=None, 
                               final_hidden=pack_rows(out.final_hidden, padded, packed),
                               teacher_logits=pack_rows(out.teacher_logits, padded, packed, fill=0),
                               teacher_valid=pack_rows(out.teacher_valid, padded, packed))
    cfg = DraftConfig(algorithm="eagle1", ttt_steps=steps, draft_vocab_size=VD)
    with torch.no_grad():
        ref = unroll(draft, padded.input_ids, out.final_hidden, steps, attention)
        got = unroll(draft, packed.input_ids, out_packed.final_hidden, steps, attention, packed.position_ids,
                     packed.document_ids())
        for k in range(steps):  # fp32: relative to the step's whole output (the random layers amplify rounding)
            pairs = [(got[k][0, start:start + n - 1 - k], ref[k][row, :n - 1 - k])
                     for row, (n, start) in enumerate(zip(lengths, packed.cu_seqlens.tolist())) if n - 1 - k > 0]
            x, y = (torch.cat(side) for side in zip(*pairs))
            assert float((x - y).norm() / y.norm()) < tol, k
        a = eagle1_loss(draft, padded, out, cfg, attention)
        b = eagle1_loss(draft, packed, out_packed, cfg, attention)
    assert a.step_count == b.step_count and a.step_count[-1] > 0
    torch.testing.assert_close(b.loss, a.loss, rtol=tol, atol=0)
    torch.testing.assert_close(torch.tensor(b.extra["feature_loss"]), torch.tensor(a.extra["feature_loss"]),
                               rtol=tol, atol=0)


@pytest.mark.gpu
def test_flex_unroll_equals_naive_on_gpu():
    draft = tiny_draft(num_layers=2, head_dim=16).float().cuda()  # compiled flex needs head_dim >= 16
    ids = torch.randint(0, V, (2, 300), device="cuda")
    feats = torch.randn(2, 300, H, device="cuda")
    naive = unroll(draft, ids, feats, 3, attention="naive")
    flex = unroll(draft, ids, feats, 3, attention="flex")
    for k, (a, b) in enumerate(zip(naive, flex)):
        # relative to the whole step's output: compiled flex may take fp32 dots at TF32 precision
        err = float((b - a).norm() / a.norm())
        assert err < 5e-3, (k, err)

"""Which positions each TTT step trains on, the per-step loss normalisation, the simulated acceptance length and
the host copy of the loss."""

import pytest
import torch

from eagle_trainer.drafts.loss import simulated_acceptance, step_valid_mask, ttt_loss


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


def test_simulated_acceptance():
    assert simulated_acceptance([1.0, 1.0]) == 3.0
    assert simulated_acceptance([0.5, 0.5]) == 1.75
    assert simulated_acceptance([0.0, 1.0]) == 1.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_host_copy_of_the_loss_and_metrics(device):
    from eagle_trainer.drafts.loss import TTTLoss
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

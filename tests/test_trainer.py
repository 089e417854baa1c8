"""Trainer pieces that the end-to-end demo test (tests/test_train.py) does not pin down."""

import math

import pytest

from eagle_trainer.config import OptimConfig
from eagle_trainer.trainer import cosine_schedule


def test_cosine_schedule_warmup_then_decay_to_floor():
    f = cosine_schedule(OptimConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("fused", [True, False])
def test_guarded_step_skips_a_non_finite_update_whole(fused):
    import torch

    from eagle_trainer.trainer import guarded_step, skips_on_device
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.AdamW([weight], lr=0.1, fused=fused)
    assert skips_on_device(opt) == fused
    weight.grad = torch.tensor([0.5, 0.5, -1.0])
    guarded_step(opt, torch.tensor(1.2))
    before = weight.detach().clone(), {k: v.clone() for k, v in opt.state[weight].items()}
    assert float(before[1]["step"]) == 1 and not torch.equal(before[0], torch.tensor([1.0, -2.0, 3.0]))
    for bad in (float("nan"), float("inf")):
        weight.grad = torch.tensor([bad, 0.5, -1.0])
        guarded_step(opt, torch.tensor(bad))
        assert torch.equal(weight.detach(), before[0])  # weights, moments and step count as they were
        for name, value in opt.state[weight].items():
            assert torch.equal(value, before[1][name]), name
    assert not hasattr(opt, "found_inf")
    weight.grad = torch.tensor([0.5, 0.5, -1.0])
    guarded_step(opt, torch.tensor(1.2))
    assert float(opt.state[weight]["step"]) == 2 and not torch.equal(weight.detach(), before[0])

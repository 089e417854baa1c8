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

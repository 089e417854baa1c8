"""Random batches, draft vocabularies and loss-curve checks for tests (importable: tests/ is on sys.path via conftest)."""

import pytest
import torch

from eagle_trainer.types import Batch


def make_batch(b, t, vocab, seed=0):
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
    ones = torch.ones(b, t, dtype=torch.bool)
    return Batch(ids, ones, ones)


def draft_vocab(vocab, vd, seed=0):
    """A random sorted draft vocab of `vd` ids and its [vocab] bool membership mask."""
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:vd].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return ids, t2d


def assert_same_curve(got: dict, expect: dict):
    """Bit for bit on the CPU. On a GPU the draft's attention backward is not bitwise deterministic from one
    process to the next (seen on an H200: one step of eight differed in the 6th digit), so only closely."""
    assert sorted(got) == sorted(expect)
    if torch.cuda.is_available():
        assert got == pytest.approx(expect, rel=1e-5)
    else:
        assert got == expect

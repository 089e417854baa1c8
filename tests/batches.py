"""Random batches and draft vocabularies for target tests (importable: tests/ is on sys.path via conftest)."""

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

"""Random batches, draft vocabularies and loss-curve checks for tests (importable: tests/ is on sys.path via conftest)."""

import pytest
import torch

from eagle_trainer.types import Batch


def make_batch(b, t, vocab, seed=0):
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
    ones = torch.ones(b, t, dtype=torch.bool)
    return Batch(ids, ones, ones)


def documents_of(lengths, vocab, seed=0, pad_to=1):
    """Random documents of `lengths` as a padded Batch [B, T] and as the packed Batch [1, N] (padded to a
    multiple of `pad_to`); loss masks random, the first token of each never a loss token."""
    from eagle_trainer.data.dataset import collate

    g = torch.Generator().manual_seed(seed)
    docs = [{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist(),
             "loss_mask": [False] + (torch.rand(n - 1, generator=g) > 0.2).tolist()} for n in lengths]
    return collate(docs, 0), collate(docs, 0, pack=True).pad_to_multiple(pad_to, 0)


def pack_rows(x, padded, packed, fill=0):
    """A per-token tensor of a padded batch x [B, T, ...] laid out as the packed batch's [1, N, ...]."""
    real = x[padded.attention_mask]  # [sum of lengths, ...]
    tail = x.new_full((packed.input_ids.shape[1] - real.shape[0], *x.shape[2:]), fill)
    return torch.cat([real, tail])[None]


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

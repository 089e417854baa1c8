"""The soft cross-entropy row kernel against its plain-torch reference, interpreted on the CPU (fp32) and compiled
on a GPU (fp32 and bf16). Outputs are allocated NaN-poisoned, so an element the kernel does not write fails."""

import pytest
import torch
from kernel_checks import poison, rel_err

from eagle_trainer.kernels.soft_ce import rows as rows_mod
from eagle_trainer.kernels.soft_ce import (row_max, row_max_reference, soft_ce_rows, soft_ce_rows_reference,
                                          teacher_stats, teacher_stats_reference)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    poison(monkeypatch, rows_mod)  # on the CPU the kernel runs interpreted (tests/conftest.py)


def rows(c, v, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(c, v, generator=g) * 3
    t = torch.randn(c, v, generator=g) * 3
    if ties:  # equal maxima in different blocks: the lowest index must win, as torch.argmax
        z[:, 1] = z[:, -1] = z.max() + 1
        t[:, -1] = t[:, 1] = t.max() + 1
    w = torch.rand(c, generator=g) * (torch.rand(c, generator=g) > 0.2)
    return z.to(DEVICE, dtype), t.to(DEVICE, dtype), w.to(DEVICE)


@pytest.mark.parametrize("c,v,block", [(1, 7, 2048), (4, 1000, 1024), (5, 1000, 256), (3, 2049, 512), (9, 300, 64)])
def test_matches_reference_fp32(poisoned, c, v, block):
    z, t, w = rows(c, v, torch.float32, v)
    dz, ce, hit = soft_ce_rows(z, t, w, block=block)
    ref_dz, ref_ce, ref_hit = soft_ce_rows_reference(z, t, w)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz, ref_dz, rtol=1e-5, atol=1e-7)
    assert torch.equal(hit, ref_hit)


def test_ties_take_the_lowest_index_and_dz_may_alias_z(poisoned):
    z, t, w = rows(4, 700, torch.float32, 3, ties=True)
    ref_dz, ref_ce, ref_hit = soft_ce_rows_reference(z, t, w)
    assert ref_hit.eq(1).all()  # both argmaxes are column 1
    z_copy = z.clone()
    dz, ce, hit = soft_ce_rows(z_copy, t, w, out=z_copy, block=128)
    assert dz.data_ptr() == z_copy.data_ptr()
    torch.testing.assert_close(dz, ref_dz, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    assert torch.equal(hit, ref_hit)


@pytest.mark.parametrize("c,v,block", [(3, 7, 2048), (5, 1000, 256), (2, 2049, 512)])
def test_teacher_stats_match_reference(poisoned, c, v, block):
    _, t, _ = rows(c, v, torch.float32, v + 1, ties=True)
    t[0] = torch.linspace(-3, 3, v)  # a row whose maximum is in the last block alone
    lse, arg = teacher_stats(t, block=block)
    ref_lse, ref_arg = teacher_stats_reference(t)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(arg, ref_arg)


@pytest.mark.parametrize("c,v,block", [(3, 7, 2048), (5, 1000, 256), (2, 2049, 512)])
def test_row_max_matches_reference(poisoned, c, v, block):
    x, _, _ = rows(c, v, torch.float32, v + 2, ties=True)  # ties across blocks: the lowest index wins
    x[-1] = torch.linspace(-3, 3, v)  # a row whose maximum is in the last block alone
    value, arg = row_max(x, block=block)
    ref_value, ref_arg = row_max_reference(x)
    assert torch.equal(value, ref_value) and torch.equal(arg, ref_arg)


def test_given_teacher_stats_are_used(poisoned):
    """The row kernel reads the teacher's statistics from `stats` when given (the loss head forms them once per
    batch): the same outputs as forming them itself, and other statistics change ce, dz and hit accordingly."""
    z, t, w = rows(6, 900, torch.float32, 5)
    own = soft_ce_rows(z, t, w, block=256)
    lse, arg = teacher_stats(t, block=256)
    given = soft_ce_rows(z, t, w, stats=(lse, arg), block=256)
    for a, b in zip(own, given, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, shifted_ce, _ = soft_ce_rows(z, t, w, stats=(lse + 1.0, arg), block=256)
    # p = exp(t - lse - 1): every p_v z_v term shrinks by e, so ce rises by (1 - 1/e) sum p z
    expect = own[1] + (1 - torch.e**-1) * (torch.softmax(t, -1) * z).sum(-1)
    torch.testing.assert_close(shifted_ce, expect, rtol=1e-5, atol=1e-5)
    _, _, hit = soft_ce_rows(z, t, w, stats=(lse, z.argmax(-1)), block=256)
    assert hit.eq(1).all()


def test_shape_errors_name_the_shapes():
    z = torch.zeros(3, 5, device=DEVICE)  # on a GPU machine CPU tensors would be refused before the stats check
    with pytest.raises(ValueError, match=r"teacher \(3, 4\)"):
        soft_ce_rows(z, torch.zeros(3, 4, device=DEVICE), torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"teacher stats \(2,\)"):
        soft_ce_rows(z, torch.zeros(3, 5, device=DEVICE), torch.zeros(3, device=DEVICE),
                     stats=(torch.zeros(2, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_rows_of_a_32000_vocab(poisoned):
    """bf16 logits at the draft's size, rows strided as the loss head reads them (a shifted teacher view)."""
    z, t, w = rows(67, 32000, torch.bfloat16, 11)
    teacher = torch.cat([t, t[:2]])[1:68]  # a view whose rows start one row in
    dz, ce, hit = soft_ce_rows(z, teacher, w)
    ref_dz, ref_ce, ref_hit = soft_ce_rows_reference(z, teacher, w)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-4)
    assert rel_err(dz, ref_dz) < 1e-2
    assert torch.equal(hit, ref_hit)

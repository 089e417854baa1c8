"""Shared by the kernel tests: the norm-relative error, and NaN-poisoned output buffers (an element a kernel
does not write then fails the test). Importable: pytest puts tests/kernels/ on sys.path."""

import torch


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def nan_buffer(shape, like, dtype=None):
    """NaN for floating outputs; for integer ones (no NaN) the most negative value, which no index takes."""
    dtype = dtype or like.dtype
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, device=like.device, dtype=dtype)


def poison(monkeypatch, *modules):
    """Make every `new_buffer` of the given kernel modules allocate NaN-filled outputs."""
    for module in modules:
        monkeypatch.setattr(module, "new_buffer", nan_buffer)

"""Helpers shared by the kernels of every kernels/<op>/: where Triton runs, output memory, dot precision."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1; read at call time, so tests may switch it)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device`: a GPU, or the CPU while Triton interprets."""
    return device.type == "cuda" or interpreting()


def new_buffer(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised output memory on like's device, in `dtype` (default like's). Each kernel module imports this
    name itself, so tests swap it there for NaN-filled buffers (tests/kernels/kernel_checks.poison)."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: fp32 ones multiply in full fp32 ("ieee"; Triton's default
    would be tf32), 16-bit ones are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"

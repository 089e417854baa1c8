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


CUDNN_SDPA_ENV = "EAGLE_CUDNN_SDPA"  # 0: never cuDNN's attention; 1: torch's SDPA order; unset: repeated shapes


class RepeatedShapes:
    """The problem shapes seen so far, for a backend worth its per-shape setup only on shapes that come again.

    cuDNN's fused attention builds an execution graph on the host for each new shape (about 7 ms on an H100) and is
    then the fastest attention on Hopper; FlashAttention-2 has no per-shape step. A caller asks `repeated(key)` once
    a round (an unroll, a layer's forward): False the first time it asks for a key, so it runs its other backend;
    True from the next round on. A run whose shapes repeat (packed or fixed-length rows, a benchmark) builds one
    graph per shape and uses it from then on; lengths that never repeat never build one. At most `limit` keys are
    kept; past that, new keys count as never seen. `enabled=False` (EAGLE_CUDNN_SDPA=0) answers False always."""

    def __init__(self, limit: int = 4096, enabled: bool | None = None):
        self.limit, self._seen = limit, set()
        self.enabled = os.environ.get(CUDNN_SDPA_ENV) != "0" if enabled is None else enabled

    def repeated(self, key) -> bool:
        if not self.enabled:
            return False
        if key in self._seen:
            return True
        if len(self._seen) < self.limit:
            self._seen.add(key)
        return False


def layout_key(*tensors: torch.Tensor) -> tuple:
    """What an attention backend's plan depends on: each tensor's shape and strides, the dtype and the device."""
    return (tensors[0].dtype, tensors[0].device, *((tuple(x.shape), x.stride()) for x in tensors))

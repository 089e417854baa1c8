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


# EAGLE_CUDNN_SDPA: "draft" (unset: the default), cuDNN's attention for the draft's step-0 layouts that keep coming
# (RepeatedShapes); 0, no cuDNN attention; "repeated", the draft's and the target's attention layers' layouts that
# keep coming; 1, that and torch's own SDPA backend order for every other call (app/runtime.py)
CUDNN_SDPA_ENV = "EAGLE_CUDNN_SDPA"
CUDNN_SDPA_DEFAULT = "draft"
CUDNN_SDPA_PARTS = {"0": (), "draft": ("draft",), "repeated": ("draft", "target"), "1": ("draft", "target")}


def cudnn_sdpa_on(part: str) -> bool:
    """Whether EAGLE_CUDNN_SDPA lets `part` ("draft": the TTT step 0, "target": the target's attention layers) run
    cuDNN's attention for layouts that keep coming."""
    value = os.environ.get(CUDNN_SDPA_ENV, CUDNN_SDPA_DEFAULT)
    if value not in CUDNN_SDPA_PARTS:
        raise ValueError(f"{CUDNN_SDPA_ENV}={value!r} is not one of {', '.join(CUDNN_SDPA_PARTS)}; unset it for the "
                         f"default ({CUDNN_SDPA_DEFAULT})")
    return part in CUDNN_SDPA_PARTS[value]


class RepeatedShapes:
    """How often each problem shape came, for a backend worth its per-shape setup only on shapes that keep coming.

    cuDNN's fused attention builds an execution graph on the host for each new shape (on an H100 one TTT unroll's
    step-0 calls at a new length took 95.7 ms against FlashAttention-2's 0.57, benchmarks/sdpa_lengths.py) and is
    then the fastest attention on Hopper (Qwen3-Next's attention at T=4096, head dim 256: 0.26 ms against 0.54,
    benchmarks/next_attention.py). A caller asks `repeated(key)` once a round (an unroll, a layer's forward): True
    once the key came in `after` earlier rounds, else False (the caller runs its other backend) and the round is
    counted. A shape that came 32 times (the default) is a frequent one (rows cut at data.max_length, fixed-length
    or benchmark rows): its one graph is paid back by the rounds still to come, while the long tail of lengths seen
    a few times builds none. At most `limit` keys are counted; past that, new keys count as never seen.

    `enabled` (default: whether EAGLE_CUDNN_SDPA turns `part` on, `cudnn_sdpa_on`, read at the first question, not at
    import): on for the draft's step 0 and off for the target's attention unless asked for; off, it answers False
    always. At full depth (Qwen3-Next, 48 layers, B=1 T=4096, one H100, 48 steps timed after 36) the draft's step 0
    on cuDNN took the step from 146.4 ms to 140.2, while the target's attention on it took the step from 157.8 ms to
    176.8, though cuDNN's attention alone is twice as fast there too."""

    def __init__(self, after: int = 32, limit: int = 4096, enabled: bool | None = None, part: str = "draft"):
        self.after, self.limit, self._counts = after, limit, {}
        self.part, self._enabled = part, enabled

    @property
    def enabled(self) -> bool:
        if self._enabled is None:
            self._enabled = cudnn_sdpa_on(self.part)
        return self._enabled

    def repeated(self, key) -> bool:
        if not self.enabled:
            return False
        count = self._counts.get(key)
        if count is None:
            if len(self._counts) >= self.limit:
                return False
            count = 0
        if count >= self.after:
            return True
        self._counts[key] = count + 1
        return False


def layout_key(*tensors: torch.Tensor) -> tuple:
    """What an attention backend's plan depends on: each tensor's shape and strides, the dtype and the device."""
    return (tensors[0].dtype, tensors[0].device, *((tuple(x.shape), x.stride()) for x in tensors))

"""Helpers for tests that compare two models holding the same weights bit for bit."""

import torch


def own_storage(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter and buffer a fresh allocation of its own. Weights loaded from safetensors point into the
    memory-mapped file at the file's offsets, while weights filled shard by shard are fresh (64-byte aligned)
    allocations; on some CPUs (seen on an AMD EPYC with torch's MKL) the matmul kernels round differently for
    operands of another alignment, so two models with equal weights give equal bits only when their weights are
    placed alike."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model

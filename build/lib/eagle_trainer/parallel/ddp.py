"""The draft under data parallelism: one replica per rank, gradients averaged by DDP during backward."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from eagle_trainer.parallel.mesh import ParallelDims


def replicate(module: nn.Module, dims: ParallelDims, device: torch.device) -> nn.Module:
    """`module` under DDP over the data-parallel ranks (its parameters are broadcast from rank 0 first), or itself
    on one process. Frozen parameters (the target's embedding in the draft) take no part in the reduction."""
    if not dims.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   process_group=dims.dp_group(), broadcast_buffers=False)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded target weight (DTensor) gathered whole on every rank; a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

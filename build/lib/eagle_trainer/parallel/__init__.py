"""Device mesh, FSDP2 for the frozen target, expert parallelism, DDP for the draft (docs/design.md, Parallelism).

Works on any nn.Module through what the registry's TargetSpec declares (where the backbone, the decoder
layers and the routed experts live); never names a concrete model.

    mesh.py     the process group and the dp / ep / efsdp meshes (ParallelDims)
    expert.py   routed experts split over `ep`, tokens dispatched and combined all-to-all
    fsdp.py     FSDP2 per decoder block, applied to a target built on the meta device
    ddp.py      the draft replicated under DDP; sharded weights gathered whole
"""

from __future__ import annotations

from torch import nn

from eagle_trainer.parallel.ddp import replicate, whole
from eagle_trainer.parallel.fsdp import apply_fsdp
from eagle_trainer.parallel.mesh import ParallelDims, all_ranks_sum, check_experts, init_parallel


def parallelize_target(model: nn.Module, spec, dims: ParallelDims) -> nn.Module:
    """Shard a frozen target built on the meta device as `dims` says (spec: its registry TargetSpec)."""
    apply_fsdp(model.get_submodule(spec.backbone), model.get_submodule(spec.layers), spec.experts, dims)
    return model


__all__ = ["ParallelDims", "all_ranks_sum", "apply_fsdp", "check_experts", "init_parallel", "parallelize_target",
           "replicate", "whole"]

"""FSDP2 for the frozen target, applied from outside the model (torchtitan's parallelize style).

Order, on a target built on the meta device (weights are loaded after, shard by shard):
  1. expert parallelism: each layer's routed experts cut to this rank's share (expert.py);
  2. with ep < world size, those experts sharded once more over `efsdp` (the ranks holding the same experts);
  3. each decoder block sharded over `dp` (all ranks), its expert-parallel experts left to steps 1-2;
  4. the backbone as the FSDP root, its own parameters (embedding, final norm) left whole on every rank.
Blocks are gathered for their forward and freed after it (reshard_after_forward); with forward_prefetch the gathers
of the next `prefetch_blocks` blocks are issued while this one computes. The target is frozen: no gradients, no
optimizer state.

The embedding, final norm and lm_head stay whole on every rank: the draft holds the target's embedding itself,
and the teacher reads the lm_head rows of the draft vocab and scans all V rows for the argmax every batch.
"""

from __future__ import annotations

import itertools

from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from eagle_trainer.parallel.expert import apply_expert_parallel
from eagle_trainer.parallel.mesh import ParallelDims


def _experts_of(block: nn.Module, experts_path: str | None) -> nn.Module | None:
    """The routed experts of a block, or None (no expert path, or a dense layer in a model that has both)."""
    if experts_path is None:
        return None
    try:
        return block.get_submodule(experts_path)
    except AttributeError:
        return None


def apply_fsdp(backbone: nn.Module, layers: nn.ModuleList, experts_path: str | None, dims: ParallelDims) -> None:
    """Steps 1-4 of this module's docstring on `backbone` (whose decoder blocks are `layers`)."""
    units = {}  # block -> its FSDP units (the block, and its experts when they are sharded on their own)
    for block in layers:
        experts = _experts_of(block, experts_path) if dims.ep > 1 else None
        units[block] = [block]
        ignored = set()
        if experts is not None:
            apply_expert_parallel(experts, dims.ep_mesh, dims.ep_chunks)
            if dims.efsdp > 1:
                fully_shard(experts, mesh=dims.efsdp_mesh, reshard_after_forward=True)
                units[block].append(experts)
            else:
                ignored = set(experts.parameters())
        fully_shard(block, mesh=dims.dp_mesh, reshard_after_forward=True, ignored_params=ignored or None)
    # the root: gathers nothing itself; it makes the blocks one FSDP tree (one lazy init, prefetching between them)
    whole = {p for p in backbone.parameters() if not isinstance(p, DTensor)}
    fully_shard(backbone, mesh=dims.dp_mesh, reshard_after_forward=True, ignored_params=whole or None)
    if dims.forward_prefetch:
        blocks = list(layers)
        for i, here in enumerate(blocks[:-1]):
            ahead = blocks[i + 1:i + 1 + dims.prefetch_blocks]
            here.set_modules_to_forward_prefetch(list(itertools.chain.from_iterable(units[b] for b in ahead)))

"""The process group and device meshes of a run: `dp` over every rank, `ep` and `efsdp` for routed experts.

Ranks are laid out as a grid [world // ep, ep]. An `ep` group is a row: ep consecutive ranks that split the routed
experts of every layer between them and trade tokens all-to-all. An `efsdp` group is a column: the ranks holding
the same experts (world // ep of them), over which those experts are sharded once more with FSDP2. Everything
else (attention, norms, routers, dense MLPs) is sharded over `dp`, all ranks. Data parallelism is over `dp`:
each rank trains on its own part of every global batch.

    world 4, ep 2:   ep groups {0, 1}, {2, 3};  efsdp groups {0, 2}, {1, 3};  dp {0, 1, 2, 3}

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is one process and no group is made.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from eagle_trainer.config import ParallelConfig

TARGET_MODES = ("fsdp", "replicate")


@dataclass(frozen=True)
class ParallelDims:
    """World size and expert-parallel degree, checked; the meshes once the process group is up."""

    world_size: int = 1
    rank: int = 0
    ep: int = 1
    target: str = "fsdp"
    forward_prefetch: bool = True
    prefetch_blocks: int = 1
    ep_chunks: int = 1
    dp_mesh: DeviceMesh | None = None
    ep_mesh: DeviceMesh | None = None
    efsdp_mesh: DeviceMesh | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def efsdp(self) -> int:
        return self.world_size // self.ep

    def dp_group(self):
        return None if self.dp_mesh is None else self.dp_mesh.get_group()


def resolve_ep(cfg: ParallelConfig, world_size: int) -> int:
    """parallel.ep as a degree (0 = the world size), checked against the world size."""
    ep = world_size if cfg.ep == 0 else cfg.ep
    if ep < 1 or world_size % ep:
        raise ValueError(f"parallel.ep={cfg.ep} does not divide the world size {world_size}; use a divisor of it "
                         f"(1 for no expert parallelism, 0 for ep = world size)")
    if cfg.target not in TARGET_MODES:
        raise ValueError(f"parallel.target={cfg.target!r} is not one of {TARGET_MODES}")
    if cfg.prefetch_blocks < 1:
        raise ValueError(f"parallel.prefetch_blocks={cfg.prefetch_blocks} must be at least 1 (turn prefetching off "
                         "with parallel.forward_prefetch=false)")
    if cfg.ep_chunks < 1:
        raise ValueError(f"parallel.ep_chunks={cfg.ep_chunks} must be at least 1 (1: each MoE layer's tokens at once)")
    if ep > 1 and cfg.target != "fsdp":
        raise ValueError(f"parallel.ep={ep} needs parallel.target=fsdp (experts are split over ranks; a replicated "
                         "target holds all of them on every rank)")
    return ep


def check_experts(ep: int, num_experts: int | None) -> None:
    """ep must divide the routed-expert count of the target (a dense target takes ep=1 only)."""
    if ep == 1:
        return
    if not num_experts:
        raise ValueError(f"parallel.ep={ep} but the target has no routed experts; use parallel.ep=1")
    if num_experts % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the target's {num_experts} routed experts; pick an ep "
                         f"that divides both {num_experts} and the world size")


def backend_for(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name not in ("nccl", "gloo"):
        raise ValueError(f"parallel.backend={name!r} is not one of auto, nccl, gloo")
    return name


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) that torchrun set, or (0, 1, 0)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def init_parallel(cfg: ParallelConfig, device: torch.device) -> ParallelDims:
    """Join the process group torchrun set up (if any) and build the meshes."""
    _, world, _ = launched_world()
    ep = resolve_ep(cfg, world)
    if world == 1:
        return ParallelDims(ep=1, target=cfg.target, forward_prefetch=cfg.forward_prefetch)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(cfg.backend, device), timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return build_dims(cfg, device, ep)


def build_dims(cfg: ParallelConfig, device: torch.device, ep: int) -> ParallelDims:
    """The meshes over an initialised process group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    grid = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return ParallelDims(world_size=world, rank=rank, ep=ep, target=cfg.target, forward_prefetch=cfg.forward_prefetch,
                        prefetch_blocks=cfg.prefetch_blocks, ep_chunks=cfg.ep_chunks, dp_mesh=dp,
                        ep_mesh=grid["ep"], efsdp_mesh=grid["efsdp"])


def all_ranks_sum(x: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """x summed over the data-parallel ranks (a new tensor; x itself on one process)."""
    if not dims.distributed:
        return x
    out = x.clone()
    dist.all_reduce(out, group=dims.dp_group())
    return out

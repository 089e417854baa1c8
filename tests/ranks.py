"""Running a function on several ranks of a gloo process group on the CPU (torch.multiprocessing, spawn)."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    fn(rank, *args)


def run_ranks(world: int, fn, *args) -> None:
    """fn(rank, *args) in `world` fresh processes that torchrun's environment variables make one group; raises if
    any of them fails. fn must be importable (a module-level function) and open the group itself."""
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, start_method="spawn", join=True)

"""Running a function on several ranks of a gloo process group on the CPU (torch.multiprocessing).

The ranks are forked from a forkserver that imported torch, transformers and eagle_trainer once for the whole test
process: spawned ranks imported them again each, about 5 s of CPU a rank, which on CI's two cores was most of a
short multi-rank test's time. The server is a fresh single-threaded process (no thread pools or GPU state to fork).
"""

from __future__ import annotations

import multiprocessing
import os
import socket

import torch.multiprocessing as mp

PRELOAD = ["torch", "transformers", "eagle_trainer.app.train", "eagle_trainer.app.evaluate", "eagle_trainer.app.data",
           "eagle_trainer.app.regenerate", "eagle_trainer.app.synthesize"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, env: dict, cwd: str, fn, args) -> None:
    # the caller's environment and directory as they are now, not as they were when the server started
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.chdir(cwd)
    import torch
    torch.set_num_threads(1)
    fn(rank, *args)


def run_ranks(world: int, fn, *args) -> None:
    """fn(rank, *args) in `world` fresh processes that torchrun's environment variables make one group; raises if
    any of them fails. fn must be importable (a module-level function) and open the group itself."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    mp.start_processes(_entry, args=(world, _free_port(), dict(os.environ), os.getcwd(), fn, args), nprocs=world,
                       start_method="forkserver", join=True)

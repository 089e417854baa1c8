"""How a command runs as a process, decided once here for every console script.

    pick_device(name)            auto | cpu | cuda | cuda:N; plain cuda under torchrun is this rank's GPU; on a GPU
                                 that GPU made current, and `sdpa_without_cudnn()`
    sdpa_without_cudnn()         torch's scaled_dot_product_attention never picks cuDNN in this process (below)
    process_group(device)        torchrun's process group for the body of a command (joined, then left)
    rank_zero_first(fn, ...)     fn on rank 0, then on the others (which find what rank 0 cached)
    rank_logs(run_dir, ...)      each rank's output into <run_dir>/logs/rank_N.log; rank 0's also to the console
    check_shared_dir(path, ...)  every rank sees the directory rank 0 writes (several nodes: a shared filesystem)
    pad_id(tokenizer)            the id batches are padded with
    reported_errors()            a user error ends the process with `error: <message>` and status 2; Ctrl-C with 130
    command(main)                a console script's main(argv): errors reported when run as a command (argv None)
    parallel_options(overrides)  `parallel=fsdp_ep parallel.ep=2`: a recipe's parallel group for the other commands
    add_parallel_argument(p)     those overrides as the trailing arguments of an argparse command

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a command is one process and no group is made.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from eagle_trainer import registry
from eagle_trainer.config import ParallelConfig
from eagle_trainer.kernels.utils import CUDNN_SDPA_ENV, cudnn_sdpa_on  # =1: leave torch's SDPA order as it is
from eagle_trainer.parallel.mesh import backend_for, launched_world

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # package data: found in a wheel too
DEFAULT_PARALLEL = "single"  # the training recipe's default group (recipes/config.yaml)


def pick_device(name: str, option: str = "train.device") -> torch.device:
    """The device `option`=`name` asks for: auto (cuda when one is visible, else cpu), cpu, cuda (under torchrun the
    GPU of this rank, cuda:LOCAL_RANK) or cuda:N. A bad EAGLE_CUDNN_SDPA is refused here, before any work."""
    cudnn_sdpa_on("draft")  # raises ValueError naming the values it takes
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option}={name!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={name} but no CUDA device is visible; use {option}=cpu")
    if device.type == "cuda":
        sdpa_without_cudnn()
        if device.index is None:
            device = torch.device("cuda", launched_world()[2])
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{option}={name} is {device} but this process sees {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); check CUDA_VISIBLE_DEVICES and "
                             "torchrun's --nproc-per-node")
        # current from here on, and CUDA initialised (torch.cuda's calls that take an explicit index, e.g.
        # reset_peak_memory_stats, do not initialise it themselves)
        torch.cuda.set_device(device)
    return device


def sdpa_without_cudnn() -> None:
    """Take cuDNN out of the backends torch's scaled_dot_product_attention picks from, for this process (the
    others stay in torch's order: flash, then memory-efficient for calls with a mask, then math).

    Why: on Hopper and Blackwell recent torch builds try cuDNN attention first, and cuDNN builds an execution graph
    on the host for every new problem shape (batch, query and key lengths) before its kernel runs. Our shapes change
    at nearly every call: each training batch has its own length (unpacked batches are padded to their longest row
    only), and each speculative-decoding round in eagle-eval verifies against a longer KV cache. Flash and
    memory-efficient attention run any shape without a per-shape step. Packed batches go through flex_attention
    (targets/packed_attention.py) and are not affected. EAGLE_CUDNN_SDPA=1 keeps torch's own order."""
    if os.environ.get(CUDNN_SDPA_ENV) != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)


@contextlib.contextmanager
def process_group(device: torch.device, backend: str = "auto") -> Iterator[tuple[int, int]]:
    """Yields (rank, world size). A command torchrun launched on several ranks joins the process group here (nccl
    on GPUs, gloo on the CPU, unless `backend` names one) and leaves it after; a group that is already up is
    used as it is, and left to whoever made it. One process: (0, 1) and no group."""
    rank, world, _ = launched_world()
    own = world > 1 and not dist.is_initialized()
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(backend, device), timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    try:
        yield rank, world
    finally:
        if own:
            dist.destroy_process_group()


def rank_zero_first(fn: Callable, rank: int, world_size: int):
    """fn() on rank 0, then on the other ranks (which then find what rank 0 cached: tokenised data, vocab map)."""
    if rank == 0:
        out = fn()
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        out = fn()
    return out


def check_shared_dir(path: Path, rank: int, world_size: int, option: str) -> None:
    """Refuse a run whose ranks do not all see `path` as rank 0 does. Rank 0 writes every shared file (the
    tokenised data, the checkpoints' draft and optimizer state, metrics) and the others read them back, so on several
    nodes `path` must be on a filesystem every node mounts (or the same value of `option` pointed at different
    directories). Rank 0 writes a fresh token, every rank reads it back; collective."""
    if world_size == 1:
        return
    import secrets
    import socket

    probe = path / ".shared_probe"
    token = [secrets.token_hex(8) if rank == 0 else None]
    if rank == 0:
        probe.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    try:
        seen = probe.read_text() == token[0]
    except FileNotFoundError:
        seen = False
    views = [None] * world_size
    dist.all_gather_object(views, (rank, socket.gethostname(), seen))
    dist.barrier()
    if rank == 0:
        probe.unlink()
    blind = [f"rank {r} on {host}" for r, host, ok in views if not ok]
    if blind:
        raise ValueError(f"{option}={str(path)!r} is not shared: {', '.join(blind)} cannot see what rank 0 writes "
                         "there; on several nodes put it on a filesystem every node mounts (the same path on each)")


@contextlib.contextmanager
def rank_logs(run_dir: Path, rank: int, world_size: int):
    """Each rank's output into <run_dir>/logs/rank_N.log; rank 0's also to the console. One process: no files."""
    if world_size == 1:
        yield
        return
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "logs" / f"rank_{rank}.log", "a", buffering=1) as log:
        streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = (_Tee(log, *(streams[:1] if rank == 0 else ())),
                                  _Tee(log, *(streams[1:] if rank == 0 else ())))
        try:
            yield
        finally:
            sys.stdout, sys.stderr = streams


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 when it has none (padding is masked out, so any id serves)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# Bad input (a recipe value, a path, a file's contents, a name no plugin registered): the message names the value
# and the fix.
USER_ERRORS = (ValueError, FileNotFoundError, registry.UnknownName)


@contextlib.contextmanager
def reported_errors():
    """The body of a command: a user error (USER_ERRORS) ends it with one line, `error: <message>`, on stderr and
    exit status 2 (EAGLE_DEBUG=1 shows the traceback too); Ctrl-C ends it with status 130 and no traceback. Any
    other exception is a bug and keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:  # the command has said what it leaves behind (e.g. Trainer.fit: the last checkpoint)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if os.environ.get("EAGLE_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A console script's `main(argv)`: run as a command (argv None: the arguments are sys.argv's) its errors are
    reported (`reported_errors`); called from Python with an argv list, they are raised to the caller."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        if argv is not None:
            return main(argv)
        with reported_errors():
            return main(argv)
    return run


def parallel_options(overrides: list[str]) -> ParallelConfig:
    """The parallel settings of a command other than training, typed as training takes them: a group of the recipes'
    parallel/ directory (`parallel=fsdp_ep`, default `single`) and keys over it (`parallel.ep=2`), so that a user types
    one set of options for every job."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    groups = sorted(p.stem for p in (RECIPES / "parallel").glob("*.yaml"))
    group, keys = DEFAULT_PARALLEL, []
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not (name == "parallel" or name.startswith("parallel.")):
            raise ValueError(f"{item!r} is not a parallel option; use parallel=<group> (one of {groups}) and "
                             "parallel.<key>=<value>, e.g. parallel=fsdp_ep parallel.ep=2")
        if name == "parallel":
            if value not in groups:
                raise ValueError(f"parallel={value} is not one of the recipe groups {groups}")
            group = value
        else:
            keys.append(f"{name.removeprefix('parallel.')}={value}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ParallelConfig), OmegaConf.load(RECIPES / "parallel" / f"{group}.yaml"),
                              OmegaConf.from_dotlist(keys))
    except OmegaConfBaseException as e:
        raise ValueError(f"parallel options {overrides}: {e}".splitlines()[0] + "; the keys are "
                         f"{[f.name for f in fields(ParallelConfig)]}") from None
    return OmegaConf.to_object(cfg)


def add_parallel_argument(parser) -> None:
    parser.add_argument("parallel", nargs="*", metavar="parallel=GROUP parallel.KEY=VALUE",
                        help=f"under torchrun, how the target is spread, as training takes it: parallel=fsdp_ep "
                             f"parallel.ep=2 (default parallel={DEFAULT_PARALLEL}: the whole target on every rank)")

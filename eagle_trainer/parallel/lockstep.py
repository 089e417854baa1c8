"""Ranks with different amounts of work, kept in step through the collective forwards of a sharded model.

A forward of a target sharded over ranks (FSDP2 gathers, expert-parallel all-to-alls) is a collective: every rank
must run one, in the same order, with inputs of any shape. Decoding jobs (regeneration, speculative decoding) run
a number of forwards no rank knows in advance, so each rank decodes its own prompts and the ranks are kept in
step like this:

    with lock_step(module, idle_forward, group):   # module: the sharded model's root, e.g. its backbone
        ... this rank's work, calling module(...) as often as it needs ...
    # leaving: this rank idles (idle_forward(), one real collective forward on a token of its own) for as long as
    # another rank still works; everyone leaves together

Before each forward of `module` a rank adds 1 to an all-reduce; an idle rank adds 0 and runs `idle_forward` when
the sum says someone is working. Every rank so issues the same sequence [all-reduce, forward, all-reduce,
forward, ...], and the last all-reduce, summing to 0, ends the block on all of them together. The cost is one
all-reduce of one integer per forward.

On one process, or with group=None for a model that is not sharded, lock_step does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn


class LockStep:
    """The counting hook of `lock_step`; `forwards` counts this rank's own forwards, `idle_forwards` its idle ones."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self.idle = False
        self.forwards = self.idle_forwards = 0

    def _working(self, mine: int) -> int:
        flag = torch.tensor([mine], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, group=self.group)
        return int(flag.item())

    def before_forward(self, module: nn.Module, args, kwargs) -> None:
        if self.idle:  # the idle forward itself: counted by drain()
            return
        self._working(1)
        self.forwards += 1

    def drain(self, idle_forward: Callable[[], None]) -> None:
        """Idle forwards until no rank works any longer."""
        self.idle = True
        while self._working(0):
            idle_forward()
            self.idle_forwards += 1


@contextlib.contextmanager
def lock_step(module: nn.Module, idle_forward: Callable[[], None], group=None) -> Iterator[LockStep | None]:
    """Keep the ranks of `group` in step through `module`'s forwards for the body (module docstring); yields the
    LockStep (None when there is nothing to keep in step: no group, or a group of one)."""
    if group is None or dist.get_world_size(group) == 1:
        yield None
        return
    device = next(module.parameters()).device
    step = LockStep(group, device)
    # prepended: the count must come before any collective of the module's own pre-forward hooks (FSDP's)
    handle = module.register_forward_pre_hook(step.before_forward, prepend=True, with_kwargs=True)
    try:
        yield step
        with torch.no_grad():
            step.drain(idle_forward)
    finally:
        handle.remove()

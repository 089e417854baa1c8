"""Expert parallelism: each rank of an `ep` group keeps E / ep of a layer's routed experts, and tokens travel.

Works on any experts module in HF transformers' experts interface: `forward(hidden [T, H], ids [T, k],
weights [T, k]) -> [T, H]`, with its experts stacked on dim 0 of its parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) and their count in `num_experts`. Whatever implementation is bound to the module (our
Triton core, HF's own loop or its grouped_mm) computes the local experts; `ExpertAllToAll` takes the module's
forward over and moves the tokens around it:

    dispatch    each token's hidden row goes once to every rank that holds one of its k experts (a unit: token t,
                rank r); each (token, slot) pair p = t*k + j goes to the rank holding expert ids[t, j] as metadata
                only: the index of its unit's row there, its expert id (local to that rank) and its routing
                weight; two all-to-alls (rows, metadata)
    experts     the receiver expands the rows it got to its pairs (a local gather) and runs the module's own
                forward over them, one slot each: [R, H]
    combine     the weighted outputs go back (all-to-all), are put in pair order, and each token's k outputs are
                summed in fp32 in slot order j = 0..k-1, as the MoE core sums them; then the call's `shared_out`
                [T, H], if it passed one (a shared expert's gated output, computed by the caller on its own
                tokens: a shared expert is dense and whole on every rank), as the last term, as the core adds it

A pair's output is its expert's output times its weight, rounded to the model dtype, whichever rank computes it;
the sum over slots is the MoE core's fixed-order fp32 sum. The module sees the same pairs in the same order as if
every pair had carried its own row, so with the core's batch-invariant configs the tokens of a rank get the same
bits under any ep.

Chunks (`parallel.ep_chunks`): a layer's tokens are cut into that many runs, each dispatched, computed and
combined on its own. Every all-to-all is started without waiting (async; NCCL runs it on its own stream) and waited
for only where its output is read, so the exchange of one chunk runs while the experts of another compute. The
chunks' split sizes are exchanged together and read on the host once: one sync per layer, whatever the chunk
count. Chunking changes no bits where the module's outputs do
not depend on which pairs share a GEMM (the core's batch-invariant configs).

Rows sent per layer: U = sum over tokens of the ranks its experts sit on, at most min(k, ep) * T (was P = k * T);
with k = 8 experts spread evenly, U ~ ep * (1 - (1 - 1/ep)^k) * T: 1.99 T at ep 2, 3.6 T at ep 4, 5.3 T at ep 8.
The combine still returns one row per pair (the core's sum needs every term).

Shapes: T tokens, k experts per token, P = T*k pairs, U units (rows) sent, R pairs received, H hidden, E experts,
C chunks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

ARG_NAMES = ("hidden_states", "top_k_index", "top_k_weights")


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group):
    """Start an all-to-all of x's rows (send[r] to rank r, recv[r] from it) without waiting for it (NCCL runs it on
    its own stream) -> (output, work: wait() before reading the output)."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group,
                                  async_op=True)
    return out, work


def _bound_args(args: tuple, kwargs: dict) -> list:
    """(hidden, ids, weights) from a call made with positional or keyword arguments."""
    values = list(args) + [kwargs[name] for name in ARG_NAMES[len(args):]]
    return values[:3]


@dataclass
class _Chunk:
    """One run of a layer's tokens on its way through dispatch, experts and combine."""

    num_tokens: int
    order: torch.Tensor  # [P] pairs grouped by destination rank, pair order within each
    counts: torch.Tensor  # [ep, 2] rows and pairs for each destination
    hidden: torch.Tensor  # [T, H] the chunk's rows
    row_token: torch.Tensor  # [>= U] the token of each row to send, grouped by destination, token order within
    meta: torch.Tensor  # [P, 3] each pair's unit row (in its destination's rows), local expert id, weight
    send: list[int] | None = None  # pairs for each rank; recv: from each
    recv: list[int] | None = None
    received: torch.Tensor | None = None  # [ep, 2] rows and pairs from each rank, on the device
    pending: tuple = ()  # the chunk's all-to-alls in flight: (output, work) ...


class ExpertAllToAll:
    """The token exchange of one experts module: `forward(module, ...)` replaces the module's forward and calls
    `compute(module, ...)` (its class's forward) on the pairs this rank received. Nothing here holds the module: a
    reference cycle through its forward would keep it, and the process group, alive until the interpreter's exit
    (where gloo's teardown aborts the process)."""

    def __init__(self, group, ep: int, num_local: int, compute: Callable, chunks: int = 1):
        self.group, self.ep, self.num_local, self.compute, self.chunks = group, ep, num_local, compute, chunks
        self.rows_sent = (0, 0)  # the last call's (hidden rows dispatched, pairs routed): the traffic, for tests

    def _plan(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> _Chunk:
        """What one chunk sends, built on the device with no op whose output size depends on the data (nonzero,
        bincount, boolean masks): none of them waits for the GPU."""
        num_tokens, top_k = ids.shape
        device = ids.device
        dest = ids.long() // self.num_local  # [T, k] the rank that holds each pair's expert
        hit = torch.zeros(self.ep, num_tokens, dtype=torch.bool, device=device)  # [ep, T] units (rank, token)
        hit[dest, torch.arange(num_tokens, device=device)[:, None].expand_as(dest)] = True
        unit_counts = hit.sum(1)  # [ep] rows for each rank
        unit_start = unit_counts.cumsum(0) - unit_counts
        unit_pos = hit.reshape(-1).cumsum(0).view(self.ep, num_tokens) - 1  # each unit's row in the send buffer
        # the token of each row to send: units scattered to their rows, the rest to one spare slot at the end
        slot = torch.where(hit, unit_pos, self.ep * num_tokens).reshape(-1)
        tokens = torch.arange(num_tokens, device=device).expand(self.ep, num_tokens).reshape(-1)
        row_token = torch.zeros(self.ep * num_tokens + 1, dtype=torch.long, device=device).scatter_(0, slot, tokens)
        flat_dest = dest.reshape(-1)
        order = torch.argsort(flat_dest, stable=True)
        pair_dest, pair_token = flat_dest[order], order // top_k
        unit_of_pair = (unit_pos[pair_dest, pair_token] - unit_start[pair_dest]).to(torch.int32)
        local_ids = (ids.reshape(-1).long()[order] - pair_dest * self.num_local).to(torch.int32)
        # each pair's unit row and expert id (their int32 bits as float32) travel with its weight
        meta = torch.stack([unit_of_pair.view(torch.float32), local_ids.view(torch.float32),
                            weights.reshape(-1)[order].to(torch.float32)], dim=1)
        pair_counts = torch.zeros(self.ep, dtype=torch.long, device=device).scatter_add_(
            0, flat_dest, torch.ones_like(flat_dest))
        return _Chunk(num_tokens, order, torch.stack([unit_counts, pair_counts], dim=1), hidden, row_token, meta)

    def _exchange_counts(self, chunks: list[_Chunk]) -> None:
        """Every chunk's split sizes to and from every rank, in one all-to-all and one host read."""
        counts = torch.stack([c.counts for c in chunks], dim=1)  # [ep, C, 2]: what each destination gets
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        sent, got = counts.tolist(), recv.tolist()  # the host sync
        for i, chunk in enumerate(chunks):
            units_out, units_in = [r[i][0] for r in sent], [r[i][0] for r in got]
            chunk.send, chunk.recv, chunk.received = [r[i][1] for r in sent], [r[i][1] for r in got], recv[:, i]
            rows = chunk.hidden[chunk.row_token[:sum(units_out)]]  # [U, H]
            chunk.pending = (_all_to_all(rows, units_out, units_in, self.group),
                             _all_to_all(chunk.meta, chunk.send, chunk.recv, self.group))
        self.rows_sent = (sum(r[i][0] for r in sent for i in range(len(chunks))),
                          sum(r[i][1] for r in sent for i in range(len(chunks))))

    def _experts(self, module: nn.Module, chunk: _Chunk, dtypes: tuple[torch.dtype, torch.dtype]) -> None:
        """Wait for a chunk's rows, run the local experts on its pairs, start sending their outputs back."""
        (rows, rows_work), (meta, meta_work) = chunk.pending
        rows_work.wait()
        meta_work.wait()
        # a pair's unit index counts within the rows its sender sent: offset by where that sender's rows start here.
        # From the counts already on the device (a tensor made from the host's lists would be a blocking copy)
        units, pairs = chunk.received.unbind(1)
        offset = torch.repeat_interleave(units.cumsum(0) - units, pairs, output_size=sum(chunk.recv))
        unit = meta[:, 0].contiguous().view(torch.int32).long() + offset
        ids_r = meta[:, 1].contiguous().view(torch.int32).to(dtypes[0])[:, None]
        weights_r = meta[:, 2:].to(dtypes[1])
        out = self.compute(module, rows[unit], ids_r, weights_r)  # [R, H]
        chunk.pending = (_all_to_all(out, chunk.recv, chunk.send, self.group),)

    def _combine(self, chunk: _Chunk, top_k: int) -> torch.Tensor:
        """A chunk's pair outputs back in pair order, summed over each token's slots in order, fp32: [T, H]."""
        ((back, work),) = chunk.pending
        work.wait()
        pairs = torch.empty_like(back)
        pairs[chunk.order] = back
        pairs = pairs.view(chunk.num_tokens, top_k, -1)
        total = pairs[:, 0].float()
        for j in range(1, top_k):  # fixed order, fp32: the MoE core's top-k sum
            total += pairs[:, j].float()
        return total

    def forward(self, module: nn.Module, *args, **kwargs) -> torch.Tensor:
        """The experts module's forward under expert parallelism (the module docstring)."""
        hidden, ids, weights = _bound_args(args, kwargs)
        shared_out = kwargs.get("shared_out")  # stays here: the local experts see only the pairs they received
        top_k = ids.shape[1]
        num = ids.shape[0]
        parts = max(1, min(self.chunks, num))
        sizes = [num // parts + (i < num % parts) for i in range(parts)]  # as even as can be, the longer first
        chunks = [self._plan(*piece) for piece in zip(hidden.split(sizes), ids.split(sizes), weights.split(sizes))]
        self._exchange_counts(chunks)
        for chunk in chunks:  # chunk i's experts run while the exchanges of the others are in flight
            self._experts(module, chunk, (ids.dtype, weights.dtype))
        total = torch.cat([self._combine(chunk, top_k) for chunk in chunks])
        if shared_out is not None:
            total += shared_out.float()
        return total.to(hidden.dtype)


def expert_params(experts: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters of `experts` stacked over its experts (dim 0 = num_experts)."""
    num = experts.num_experts
    return [(name, p) for name, p in experts.named_parameters(recurse=False) if p.dim() and p.shape[0] == num]


def shard_experts(experts: nn.Module, ep_rank: int, ep: int) -> None:
    """Keep experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of a module on the meta device (weights come later).
    `expert_range` records the (first, count, total) global experts for the loader."""
    total = experts.num_experts
    local = total // ep
    for name, p in expert_params(experts):
        if p.device.type != "meta":
            raise ValueError(f"expert parallelism splits a target built on the meta device; {name} is on {p.device}")
        setattr(experts, name, nn.Parameter(torch.empty((local, *p.shape[1:]), dtype=p.dtype, device="meta"),
                                            requires_grad=p.requires_grad))
    experts.num_experts = local
    experts.expert_range = (ep_rank * local, local, total)


def apply_expert_parallel(experts: nn.Module, ep_mesh, chunks: int = 1) -> ExpertAllToAll:
    """Split `experts` over the ranks of `ep_mesh` and route its calls through them: its forward becomes
    `ExpertAllToAll.forward` around its own (an instance attribute; the class and its implementation switch stay)."""
    ep, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    shard_experts(experts, ep_rank, ep)
    exchange = ExpertAllToAll(ep_mesh.get_group(), ep, experts.num_experts, type(experts).forward, chunks)
    module = weakref.ref(experts)  # no cycle module -> forward -> module: the module (and the group) go when let go
    experts.forward = lambda *args, **kwargs: exchange.forward(module(), *args, **kwargs)
    return exchange

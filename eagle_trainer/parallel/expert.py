"""Expert parallelism: each rank of an `ep` group keeps E / ep of a layer's routed experts, and tokens travel.

Works on any experts module in HF transformers' experts interface: `forward(hidden [T, H], ids [T, k],
weights [T, k]) -> [T, H]`, with its experts stacked on dim 0 of its parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) and their count in `num_experts`. Whatever implementation is bound to the module (our
Triton core, HF's own loop or its grouped_mm) computes the local experts; two hooks move the tokens:

    dispatch (pre-hook)   each token's hidden row goes once to every rank that holds one of its k experts (a unit:
                          token t, rank r); each (token, slot) pair p = t*k + j goes to the rank holding expert
                          ids[t, j] as metadata only: the index of its unit's row there, its expert id (local to
                          that rank) and its routing weight; two all-to-alls (rows, metadata)
    local experts         the receiver expands the rows it got to its pairs (a local gather) and runs the module's
                          own forward over them, one slot each: [R, H]
    combine (hook)        the weighted outputs go back (all-to-all), are put in pair order, and each token's k
                          outputs are summed in fp32 in slot order j = 0..k-1, as the MoE core sums them; then the
                          call's `shared_out` [T, H], if it passed one (a shared expert's gated output, computed by
                          the caller on its own tokens: a shared expert is dense and whole on every rank), as the
                          last term, as the core adds it

A pair's output is its expert's output times its weight, rounded to the model dtype, whichever rank computes it;
the sum over slots is the MoE core's fixed-order fp32 sum. The module sees the same pairs in the same order as if
every pair had carried its own row, so with the core's batch-invariant configs the tokens of a rank get the same
bits under any ep. The split sizes are read on the host: one sync per layer.

Rows sent per layer: U = sum over tokens of the ranks its experts sit on, at most min(k, ep) * T (was P = k * T);
with k = 8 experts spread evenly, U ~ ep * (1 - (1 - 1/ep)^k) * T: 1.99 T at ep 2, 3.6 T at ep 4, 5.3 T at ep 8.
The combine still returns one row per pair (the core's sum needs every term).

Shapes: T tokens, k experts per token, P = T*k pairs, U units (rows) sent, R pairs received, H hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

ARG_NAMES = ("hidden_states", "top_k_index", "top_k_weights")


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def _bound_args(args: tuple, kwargs: dict) -> list:
    """(hidden, ids, weights) from a call made with positional or keyword arguments."""
    values = list(args) + [kwargs[name] for name in ARG_NAMES[len(args):]]
    return values[:3]


class ExpertAllToAll:
    """The dispatch and combine hooks of one experts module; `state` holds one call's routing between them."""

    def __init__(self, group, ep: int, num_local: int):
        self.group, self.ep, self.num_local = group, ep, num_local
        self.state = None
        self.rows_sent = (0, 0)  # the last call's (hidden rows dispatched, pairs routed): the traffic, for tests

    def dispatch(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden, ids, weights = _bound_args(args, kwargs)
        shared_out = kwargs.get("shared_out")  # stays here: the local experts see only the pairs they received
        num_tokens, top_k = ids.shape
        device, group = ids.device, self.group
        dest = ids.long() // self.num_local  # [T, k] the rank that holds each pair's expert
        hit = torch.zeros(self.ep, num_tokens, dtype=torch.bool, device=device)  # [ep, T] units (rank, token)
        hit[dest, torch.arange(num_tokens, device=device)[:, None].expand_as(dest)] = True
        unit_counts = hit.sum(1)  # [ep] rows for each rank
        unit_start = unit_counts.cumsum(0) - unit_counts
        unit_pos = hit.reshape(-1).cumsum(0).view(self.ep, num_tokens) - 1  # each unit's row in the send buffer
        flat_dest = dest.reshape(-1)
        order = torch.argsort(flat_dest, stable=True)  # pairs grouped by destination, in pair order within each
        counts = torch.stack([unit_counts, torch.bincount(flat_dest, minlength=self.ep)], dim=1)  # [ep, 2]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
        (send_units, send), (recv_units, recv) = counts.t().tolist(), recv_counts.t().tolist()  # the host sync
        pair_dest, pair_token = flat_dest[order], order // top_k
        unit_of_pair = (unit_pos[pair_dest, pair_token] - unit_start[pair_dest]).to(torch.int32)  # in its rank's rows
        local_ids = (ids.reshape(-1).long()[order] - pair_dest * self.num_local).to(torch.int32)
        # each pair's unit row and expert id (their int32 bits as float32) travel with its weight
        meta = torch.stack([unit_of_pair.view(torch.float32), local_ids.view(torch.float32),
                            weights.reshape(-1)[order].to(torch.float32)], dim=1)
        rows = _all_to_all(hidden[hit.nonzero()[:, 1]], send_units, recv_units, group)  # [U received, H]
        meta = _all_to_all(meta, send, recv, group)  # [R, 3], grouped by the rank that sent them
        source = torch.repeat_interleave(torch.arange(self.ep, device=device), torch.tensor(recv, device=device))
        recv_start = torch.tensor(recv_units, device=device).cumsum(0) - torch.tensor(recv_units, device=device)
        unit = meta[:, 0].contiguous().view(torch.int32).long() + recv_start[source]
        ids_r = meta[:, 1].contiguous().view(torch.int32).to(ids.dtype)[:, None]
        weights_r = meta[:, 2:].to(weights.dtype)
        self.state = (order, send, recv, num_tokens, top_k, hidden.dtype, shared_out)
        self.rows_sent = (sum(send_units), sum(send))
        return (rows[unit], ids_r, weights_r), {}

    def combine(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        order, send, recv, num_tokens, top_k, dtype, shared_out = self.state
        self.state = None
        back = _all_to_all(output, recv, send, self.group)  # [P, H], pairs grouped by the rank that computed them
        pairs = torch.empty_like(back)
        pairs[order] = back
        pairs = pairs.view(num_tokens, top_k, -1)
        total = pairs[:, 0].float()
        for j in range(1, top_k):  # fixed order, fp32: the MoE core's top-k sum
            total += pairs[:, j].float()
        if shared_out is not None:
            total += shared_out.float()
        return total.to(dtype)


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


def apply_expert_parallel(experts: nn.Module, ep_mesh) -> ExpertAllToAll:
    """Split `experts` over the ranks of `ep_mesh` and route its calls through them (all-to-all hooks)."""
    ep, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    shard_experts(experts, ep_rank, ep)
    hooks = ExpertAllToAll(ep_mesh.get_group(), ep, experts.num_experts)
    experts.register_forward_pre_hook(hooks.dispatch, with_kwargs=True)
    experts.register_forward_hook(hooks.combine, with_kwargs=True)
    return hooks

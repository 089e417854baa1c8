"""Expert parallelism: each rank of an `ep` group keeps E / ep of a layer's routed experts, and tokens travel.

Works on any experts module in HF transformers' experts interface: `forward(hidden [T, H], ids [T, k],
weights [T, k]) -> [T, H]`, with its experts stacked on dim 0 of its parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) and their count in `num_experts`. Whatever implementation is bound to the module (our
Triton core, HF's own loop or its grouped_mm) computes the local experts; two hooks move the tokens:

    dispatch (pre-hook)   each (token, slot) pair p = t*k + j goes to the rank holding expert ids[t, j], with its
                          hidden row, its expert id (local to that rank) and its routing weight; all-to-all
    local experts         the module's own forward over the pairs it received, one slot each: [R, H]
    combine (hook)        the weighted outputs go back (all-to-all), are put in pair order, and each token's k
                          outputs are summed in fp32 in slot order j = 0..k-1, as the MoE core sums them; then the
                          call's `shared_out` [T, H], if it passed one (a shared expert's gated output, computed by
                          the caller on its own tokens: a shared expert is dense and whole on every rank), as the
                          last term, as the core adds it

A pair's output is its expert's output times its weight, rounded to the model dtype, whichever rank computes it;
the sum over slots is the MoE core's fixed-order fp32 sum. So with the core's batch-invariant configs the tokens of
a rank get the same bits under any ep. The split sizes are read on the host: one sync per layer.

Shapes: T tokens, k experts per token, P = T*k pairs sent, R pairs received, H hidden, E experts.
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

    def dispatch(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden, ids, weights = _bound_args(args, kwargs)
        shared_out = kwargs.get("shared_out")  # stays here: the local experts see only the pairs they received
        num_tokens, top_k = ids.shape
        dest = ids.reshape(-1).long() // self.num_local  # [P] the rank that holds each pair's expert
        order = torch.argsort(dest, stable=True)  # pairs grouped by destination, in pair order within each
        send_counts = torch.bincount(dest, minlength=self.ep)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        # expert id (local to the receiver) and weight travel together: the id's int32 bits as a float32
        local_ids = (ids.reshape(-1).long()[order] - dest[order] * self.num_local).to(torch.int32)
        meta = torch.stack([local_ids.view(torch.float32), weights.reshape(-1)[order].to(torch.float32)], dim=1)
        x = _all_to_all(hidden[order // top_k], send, recv, self.group)  # [R, H]
        meta = _all_to_all(meta, send, recv, self.group)  # [R, 2]
        ids_r = meta[:, 0].contiguous().view(torch.int32).to(ids.dtype)[:, None]
        weights_r = meta[:, 1:].to(weights.dtype)
        self.state = (order, send, recv, num_tokens, top_k, hidden.dtype, shared_out)
        return (x, ids_r, weights_r), {}

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

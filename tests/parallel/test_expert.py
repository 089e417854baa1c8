"""Expert parallelism's dispatch and combine (parallel/expert.py) around a plain experts module, on 2 and 4 gloo
ranks: the sharded call returns the unsharded module's bits, in one piece or in chunks, and each token's row travels
once per rank that holds one of its experts, not once per (token, slot) pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ranks import run_ranks

E, H, K = 8, 16, 4


class Experts(nn.Module):
    """The experts interface (HF's): forward(hidden [T, H], ids [T, k], weights [T, k]) -> [T, H]; expert e scales
    its rows by a matrix of its own, each pair's output rounded to the model dtype, summed over slots in order."""

    def __init__(self):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, H, H, generator=torch.Generator().manual_seed(0)))

    def forward(self, hidden, ids, weights):
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for j in range(ids.shape[1]):
            w = self.gate_up_proj[ids[:, j]]  # [T, H, H]
            out += (torch.einsum("th,tgh->tg", hidden, w) * weights[:, j:j + 1]).to(hidden.dtype).float()
        return out.to(hidden.dtype)


class DataDependentOps(TorchDispatchMode):
    """The ops called under it whose output size depends on tensor values: on a GPU each waits for the device to
    catch up (a host sync)."""

    NAMES = ("nonzero", "bincount", "unique", "masked_select", "_local_scalar_dense")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if any(n in name for n in self.NAMES):
            self.found.append(name)
        if name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.found.append("repeat_interleave without output_size")
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.found.append(f"{name} by a boolean mask")
        return func(*args, **kwargs)


def routing(rank: int, tokens: int):
    g = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    return hidden, ids, torch.rand(tokens, K, generator=g)


def shard_and_call(rank: int, ep: int, out: str, chunks: int = 1) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from eagle_trainer.parallel.expert import apply_expert_parallel
    dist.init_process_group("gloo")
    experts = Experts()
    whole = experts.gate_up_proj.detach().clone()
    experts.gate_up_proj = nn.Parameter(whole.to("meta"))
    exchange = apply_expert_parallel(experts, init_device_mesh("cpu", (dist.get_world_size(),)), chunks)
    first, count, _ = experts.expert_range
    experts.gate_up_proj = nn.Parameter(whole[first:first + count])
    hidden, ids, weights = routing(rank, 5 + 3 * rank)
    with DataDependentOps() as ops:
        got = experts(hidden, ids, weights)
    units = len({(t, e // count) for t in range(len(ids)) for e in ids[t].tolist()})
    torch.save({"out": got, "rows_sent": exchange.rows_sent, "syncing_ops": ops.found, "units": units,
                "pairs": ids.numel()},
               Path(out) / f"rank_{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world, chunks", [(2, 1), (4, 1), (2, 3)])
def test_dispatch_sends_a_row_once_per_rank_and_combines_to_the_same_bits(tmp_path, world, chunks):
    """chunks 3: rank 0's 5 tokens as 2 + 2 + 1, rank 1's 8 as 3 + 3 + 2, each chunk exchanged on its own."""
    run_ranks(world, shard_and_call, world, str(tmp_path), chunks)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank_{rank}.pt")
        hidden, ids, weights = routing(rank, 5 + 3 * rank)
        assert torch.equal(got["out"], Experts()(hidden, ids, weights))
        assert got["rows_sent"] == (got["units"], got["pairs"])
        assert got["units"] < got["pairs"]  # K = 4 experts of 8 over 2 or 4 ranks: rows shared by a token's slots
        # one host read of the split sizes a call (tolist, not an op); nothing else waits for the device
        assert got["syncing_ops"] == [], got["syncing_ops"]

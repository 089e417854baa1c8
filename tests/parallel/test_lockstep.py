"""parallel.lock_step: ranks that run different numbers of forwards of a sharded target stay in step, and each gets
what the whole target gives for its own inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from eagle_trainer.config import ParallelConfig, TargetConfig
from eagle_trainer.targets.loading import load_target
from ranks import run_ranks


def inputs(rank: int, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + i)
    return torch.randint(0, 1024, (1, 3 + i + rank), generator=g)


def forwards_on_rank(rank: int, path: str, ep: int, counts: list[int], out: str) -> None:
    from eagle_trainer.parallel import init_parallel
    from eagle_trainer.targets.sharded import open_target, target_lock_step
    device = torch.device("cpu")
    dims = init_parallel(ParallelConfig(target="fsdp", ep=ep), device)
    opened = open_target(TargetConfig(path=path, dtype="float32"), device, dims)
    assert opened.sharded and opened.how_it_ran() == {"world_size": dims.world_size, "ep": ep, "sharded": True}
    logits = []
    with torch.no_grad(), target_lock_step(opened.model, opened.spec) as step:
        for i in range(counts[rank]):  # an uneven number of forwards per rank, some none at all
            logits.append(opened.model(input_ids=inputs(rank, i)).logits)
    torch.save({"logits": logits, "forwards": step.forwards, "idle": step.idle_forwards}, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world, ep, counts", [(2, 2, [3, 1]), (4, 2, [0, 2, 5, 1])])
def test_uneven_work_stays_in_step(tiny_qwen3_moe_path, tmp_path, world, ep, counts):
    run_ranks(world, forwards_on_rank, str(tiny_qwen3_moe_path), ep, counts, str(tmp_path))
    model = load_target(TargetConfig(path=str(tiny_qwen3_moe_path), dtype="float32"), torch.device("cpu"))[0]
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt")
        # every rank ran as many forwards as the busiest one: its own, then idle ones
        assert got["forwards"] == counts[rank] and got["forwards"] + got["idle"] == max(counts)
        for i, logits in enumerate(got["logits"]):
            torch.testing.assert_close(logits, model(input_ids=inputs(rank, i)).logits, rtol=1e-5, atol=1e-5)


def test_nothing_to_keep_in_step_on_one_process(tiny_qwen3_moe_path):
    from eagle_trainer.targets.sharded import target_lock_step
    model, _, spec, _ = load_target(TargetConfig(path=str(tiny_qwen3_moe_path), dtype="float32"), torch.device("cpu"))
    with target_lock_step(model, spec) as step:
        assert step is None

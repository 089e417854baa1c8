"""The target sharded over ranks (FSDP2, expert parallelism) captures what the whole target captures.

Each rank runs its own batch (of its own length) through the sharded target; the aux and final hidden states must
equal those of the unsharded target loaded by load_target on the same batch. The checkpoint is a tiny Qwen3-MoE in
the per-expert layout save_pretrained writes, or the same weights fused into [E, 2I, H] / [E, H, I].
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from eagle_trainer.config import ParallelConfig, TargetConfig
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target
from eagle_trainer.types import Batch
from ranks import run_ranks

AUX = (1, 3, 6)


def rank_batch(rank: int) -> Batch:
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 1024, (2, 7 + 3 * rank), generator=g)
    ones = torch.ones_like(ids, dtype=torch.bool)
    return Batch(ids, ones, ones)


def frozen(model, spec) -> FrozenTarget:
    return FrozenTarget(model, spec, AUX, torch.arange(0, 1024, 4), torch.ones(1024, dtype=torch.bool))


def capture_on_rank(rank: int, path: str, ep: int, out: str) -> None:
    from eagle_trainer.parallel import init_parallel
    from eagle_trainer.train import load_sharded_target
    dims = init_parallel(ParallelConfig(target="fsdp", ep=ep), torch.device("cpu"))
    model, _, spec, info, report = load_sharded_target(TargetConfig(path=path, dtype="float32"), torch.device("cpu"), dims)
    states = frozen(model, spec).capture(rank_batch(rank))
    blocks = model.get_submodule(spec.layers).parameters()
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in blocks)
    torch.save({"aux": states.aux_hidden, "final": states.final_hidden, "valid": states.argmax_valid,
                "local": local, "report": report}, Path(out) / f"rank_{rank}.pt")
    dist.destroy_process_group()


def fuse_experts(src: Path, dst: Path) -> Path:
    """The checkpoint at src with each layer's per-expert tensors stacked into the fused HF layout."""
    shutil.copytree(src, dst)
    (file,) = dst.glob("*.safetensors")
    tensors = load_file(file)
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    prefixes = sorted({k.split(".experts.")[0] + ".experts" for k in tensors if ".experts." in k})
    for prefix in prefixes:
        count = len([k for k in tensors if k.startswith(prefix + ".") and k.endswith("down_proj.weight")])
        fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"],
                                                                  tensors[f"{prefix}.{e}.up_proj.weight"]])
                                                       for e in range(count)])
        fused[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(count)])
    save_file(fused, file, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("world, ep, layout", [(2, 2, "per_expert"), (2, 1, "fused"), (4, 2, "fused")])
def test_sharded_target_captures_what_the_whole_target_captures(tiny_qwen3_moe_path, tmp_path, world, ep, layout):
    path = Path(tiny_qwen3_moe_path) if layout == "per_expert" else fuse_experts(Path(tiny_qwen3_moe_path),
                                                                                tmp_path / "fused")
    run_ranks(world, capture_on_rank, str(path), ep, str(tmp_path))
    model, _, spec, _ = load_target(TargetConfig(path=str(path), dtype="float32"), torch.device("cpu"))
    whole = frozen(model, spec)
    total = sum(p.numel() for p in model.get_submodule(spec.layers).parameters())
    for rank in range(world):
        got = torch.load(tmp_path / f"rank_{rank}.pt", weights_only=False)
        want = whole.capture(rank_batch(rank))
        # fp32; the experts' outputs are summed over a token's experts in slot order (the MoE core's order), HF's
        # eager loop sums them in expert order
        torch.testing.assert_close(got["aux"], want.aux_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["final"], want.final_hidden, rtol=1e-5, atol=1e-5)
        assert torch.equal(got["valid"], want.argmax_valid)
        # each rank holds 1/world of the decoder blocks (FSDP's row split rounds up): attention and norms over all
        # ranks, experts over ep and then over world/ep. The embedding and lm_head are whole on every rank.
        assert got["local"] <= total / world * 1.05, (got["local"], total)

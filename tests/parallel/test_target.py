"""The target sharded over ranks (FSDP2, expert parallelism) captures what the whole target captures.

Each rank runs its own batch (of its own length) through the sharded target; the aux and final hidden states must
equal those of the unsharded target loaded by load_target on the same batch. The checkpoint is a tiny Qwen3-MoE in
the per-expert layout save_pretrained writes, or the same weights with the experts fused ([E, 2I, H] / [E, H, I]);
and a tiny Qwen3-Next (gated delta net layers, a shared expert beside the routed ones), with HF's MoE code and with
our MoE core (interpreted on the CPU), whose shared expert joins the expert-parallel combine's sum.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from eagle_trainer.config import ParallelConfig, TargetConfig
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target, read_target_tensors
from eagle_trainer.types import Batch
from ranks import run_ranks

AUX = (1, 3, 6)
QPROJ = "model.layers.3.self_attn.q_proj.weight"  # layer 3 has full attention in both tiny targets


def rank_batch(rank: int) -> Batch:
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 1024, (2, 7 + 3 * rank), generator=g)
    ones = torch.ones_like(ids, dtype=torch.bool)
    return Batch(ids, ones, ones)


def frozen(model, spec) -> FrozenTarget:
    return FrozenTarget(model, spec, AUX, torch.arange(0, 1024, 4), torch.ones(1024, dtype=torch.bool))


def capture_on_rank(rank: int, path: str, ep: int, out: str, device_type: str = "cpu", dtype: str = "float32",
                    moe_impl: str = "auto", ep_chunks: int = 1, attn_layer_impl: str = "auto") -> None:
    from eagle_trainer.parallel import init_parallel, whole
    from eagle_trainer.app.runtime import pick_device
    from eagle_trainer.targets.sharded import load_sharded_target
    device = pick_device(device_type)
    dims = init_parallel(ParallelConfig(target="fsdp", ep=ep, ep_chunks=ep_chunks), device)
    cfg = TargetConfig(path=path, dtype=dtype, moe_impl=moe_impl, attn_layer_impl=attn_layer_impl)
    model, _, spec, info, report = load_sharded_target(cfg, device, dims)
    if attn_layer_impl == "triton":  # our attention-layer forward reads the norm weights inside the sharded layer
        assert sum("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "Qwen3NextAttention") == 2
    states = frozen(model, spec).capture(rank_batch(rank).to(device))
    q_proj = model.get_submodule(spec.layers)[3].self_attn.q_proj.weight
    assert isinstance(q_proj, DTensor)  # a shard; whole() gathers it for whoever needs the whole weight
    assert torch.equal(whole(q_proj).cpu(), read_target_tensors(path, [QPROJ])[QPROJ].to(q_proj.dtype))
    blocks = model.get_submodule(spec.layers).parameters()
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in blocks)
    torch.save({"aux": states.aux_hidden.cpu(), "final": states.final_hidden.cpu(), "valid": states.argmax_valid.cpu(),
                "local": local, "report": report}, Path(out) / f"rank_{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world, ep, checkpoint, ep_chunks, attn_layer_impl", [
    (2, 2, "tiny_qwen3_moe_path", 2, "auto"), (2, 1, "tiny_qwen3_moe_path", 1, "auto"),
    (4, 2, "tiny_qwen3_moe_fused_path", 1, "auto"), (2, 2, "tiny_qwen3_next_path", 1, "auto"),
    (2, 2, "tiny_qwen3_next_path", 1, "triton")])
def test_sharded_target_captures_what_the_whole_target_captures(request, tmp_path, world, ep, checkpoint, ep_chunks,
                                                                attn_layer_impl):
    """ep_chunks 2: each MoE layer's tokens exchanged and computed in two chunks (parallel/expert.py). The whole
    target runs HF's attention layers (auto on the CPU); attn_layer_impl=triton binds ours, interpreted, into the
    sharded one."""
    path = request.getfixturevalue(checkpoint)
    run_ranks(world, capture_on_rank, str(path), ep, str(tmp_path), "cpu", "float32", "auto", ep_chunks,
              attn_layer_impl)
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


def test_expert_parallel_core_adds_the_shared_expert_last(tiny_qwen3_next_path, tmp_path):
    """Qwen3-Next with our MoE core (moe_impl=triton) at ep 2: each rank computes the shared expert on its own tokens
    and the combine adds it after the routed terms, in fp32, as the core's sum does. The expert outputs do not
    depend on which tokens share a GEMM and the order of the sum is the unsharded core's, so the captured states
    are the unsharded core's bits."""
    path = str(tiny_qwen3_next_path)
    run_ranks(2, capture_on_rank, path, 2, str(tmp_path), "cpu", "float32", "triton")
    model, _, spec, _ = load_target(TargetConfig(path=path, dtype="float32", moe_impl="triton"), torch.device("cpu"))
    whole = frozen(model, spec)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank_{rank}.pt", weights_only=False)
        want = whole.capture(rank_batch(rank))
        assert torch.equal(got["aux"], want.aux_hidden) and torch.equal(got["final"], want.final_hidden)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("ep, checkpoint, ep_chunks", [(1, "tiny_qwen3_moe_path", 1), (2, "tiny_qwen3_moe_path", 1),
                                                       (2, "tiny_qwen3_moe_path", 2), (2, "tiny_qwen3_next_path", 1)])
def test_sharded_target_on_gpus_captures_the_same_bits(request, tmp_path, ep, checkpoint, ep_chunks):
    """bf16 on 2 GPUs (NCCL), our MoE core, router and RMSNorm: with batch-invariant tile configs a pair's expert output
    does not depend on which tokens share its GEMM, and the all-to-all combine sums in the core's order (Qwen3-Next's
    shared expert last), so the sharded target gives the unsharded one's bits; in two chunks too, their all-to-alls
    in flight on NCCL's stream while the other chunk's experts compute."""
    path = request.getfixturevalue(checkpoint)
    run_ranks(2, capture_on_rank, str(path), ep, str(tmp_path), "cuda", "bfloat16", "auto", ep_chunks)
    model, _, spec, _ = load_target(TargetConfig(path=str(path), dtype="bfloat16"), torch.device("cuda"))
    whole = frozen(model, spec)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank_{rank}.pt", weights_only=False)
        want = whole.capture(rank_batch(rank).to("cuda"))
        assert torch.equal(got["aux"], want.aux_hidden.cpu())
        assert torch.equal(got["final"], want.final_hidden.cpu())


class GatheredBytes(TorchDispatchMode):
    """Bytes every all-gather of the calls made under it brought to this rank (its output tensors)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.calls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "allgather" in str(func):
            outputs = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.bytes += sum(t.numel() * t.element_size() for t in outputs)
            self.calls += 1
        return func(*args, **(kwargs or {}))


def gather_volume_on_rank(rank: int, path: str, ep: int, out: str, prefetch_blocks: int = 1) -> None:
    from eagle_trainer.app.runtime import pick_device
    from eagle_trainer.parallel import init_parallel
    from eagle_trainer.parallel.expert import expert_params
    from eagle_trainer.targets.sharded import load_sharded_target
    device = pick_device("cpu")
    dims = init_parallel(ParallelConfig(target="fsdp", ep=ep, prefetch_blocks=prefetch_blocks), device)
    model, _, spec, _, _ = load_sharded_target(TargetConfig(path=path, dtype="float32"), device, dims)
    world = dims.world_size
    # what FSDP2 gathers: each sharded parameter's dim 0 padded to a multiple of the world size, every rank's shard
    sharded = [p for p in model.get_submodule(spec.layers).parameters() if isinstance(p, DTensor)]
    expected = sum(-(-p.shape[0] // world) * world * p[0].numel() * p.element_size() for p in sharded)
    experts = sum(p.numel() * p.element_size() for block in model.get_submodule(spec.layers)
                  for m in block.modules() if hasattr(m, "gate_up_proj") for _, p in expert_params(m))
    counted = []
    for _ in range(2):  # the second forward: prefetching set up by the first
        with GatheredBytes() as mode:
            states = frozen(model, spec).capture(rank_batch(rank))
        counted.append((mode.bytes, mode.calls))
    whole_model, _, _, _ = load_target(TargetConfig(path=path, dtype="float32"), device)
    want = frozen(whole_model, spec).capture(rank_batch(rank))
    torch.testing.assert_close(states.final_hidden, want.final_hidden, rtol=1e-5, atol=1e-5)
    torch.save({"counted": counted, "expected": expected, "experts": experts,
                "blocks": len(model.get_submodule(spec.layers))}, Path(out) / f"rank_{rank}.pt")
    del model
    dist.destroy_process_group()


@pytest.mark.parametrize("ep, prefetch_blocks", [(1, 1), (2, 1), (1, 2)])
def test_a_forward_gathers_each_blocks_weights_once(tiny_qwen3_moe_path, tmp_path, ep, prefetch_blocks):
    """FSDP2 moves each decoder block's shards once a forward, prefetching one block ahead or two: the bytes
    all-gathered equal the blocks' sharded weights (dim 0 padded to the world size), and the states are the whole
    target's. Under expert parallelism the routed experts stay put: nothing of them is gathered."""
    run_ranks(2, gather_volume_on_rank, str(tiny_qwen3_moe_path), ep, str(tmp_path), prefetch_blocks)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank_{rank}.pt", weights_only=False)
        for volume, calls in got["counted"]:
            assert volume == got["expected"], (volume, got["expected"])
            assert calls == got["blocks"]  # one all-gather a block
        if ep == 2:
            assert got["experts"] > 0  # they exist, are local, and are not in `expected` (not DTensors)

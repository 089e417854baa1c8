"""Our MoE core bound into HF's Qwen3-MoE modeling code gives what HF's own implementations give.

On the CPU the bound core runs interpreted (fp32) against HF `eager`; on the GPU in bf16 for a whole tiny
Qwen3-MoE target (aux hidden states and teacher) and for one Qwen3-30B-A3B-shaped layer.
"""

from dataclasses import replace

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from eagle_trainer.config import TargetConfig
from eagle_trainer.targets import bind_qwen3_moe, moe as moe_binding
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target
from eagle_trainer.types import Batch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def capture(model, spec, info, batch):
    ids = torch.arange(0, info.vocab_size, 3, device=DEVICE)
    t2d = torch.zeros(info.vocab_size, dtype=torch.bool, device=DEVICE)
    t2d[ids] = True
    target = FrozenTarget(model, spec, spec.aux_layers(info.num_layers), ids, t2d)
    return target.forward(batch.to(DEVICE))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bound_core_matches_hf_eager_on_a_tiny_target(tiny_qwen3_moe_path):
    cfg = TargetConfig(path=str(tiny_qwen3_moe_path), moe_impl="hf", norm_impl="hf")
    model, _, spec, info = load_target(cfg, DEVICE)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (2, 45), generator=g)
    ones = torch.ones_like(ids, dtype=torch.bool)
    batch = Batch(ids, ones, ones)
    ref = capture(model, spec, info, batch)
    bound = bind_qwen3_moe(model, replace(cfg, moe_impl="triton", norm_impl="triton"))
    assert bound == {"moe": "triton", "norm": "triton"}
    assert all("forward" in r.__dict__ for r in moe_binding._routers(model))
    assert "forward" in model.model.norm.__dict__ and "forward" in model.model.layers[0].self_attn.q_norm.__dict__
    out = capture(model, spec, info, batch)
    if DEVICE.type == "cpu":  # fp32 on both sides: the same function to rounding
        for name in ("aux_hidden", "final_hidden", "teacher_logits"):
            assert rel_err(getattr(out, name), getattr(ref, name)) < 1e-5, name
    else:  # bf16: ours must be as close to the fp32 truth as HF's own bf16 forward is
        model32, _, _, _ = load_target(replace(cfg, dtype="float32"), DEVICE)
        truth = capture(model32, spec, info, batch)
        for name in ("aux_hidden", "final_hidden", "teacher_logits"):
            ours = rel_err(getattr(out, name), getattr(truth, name))
            hf = rel_err(getattr(ref, name), getattr(truth, name))
            assert ours < 1.5 * hf + 1e-3, (name, ours, hf)
    agree = (out.teacher_logits.argmax(-1) == ref.teacher_logits.argmax(-1)).float().mean().item()
    assert agree > (0.999 if DEVICE.type == "cpu" else 0.95)
    # and back: binding hf again restores HF's router and norms
    assert bind_qwen3_moe(model, cfg) == {"moe": "hf", "norm": "hf"}
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(capture(model, spec, info, batch).aux_hidden, ref.aux_hidden, rtol=0, atol=0)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_real_shape_layer_matches_hf_eager():
    config = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                            norm_topk_prob=True)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config).to(DEVICE, torch.bfloat16)
    for p in block.parameters():
        p.normal_(0, 0.02)
    x = torch.randn(1, 2999, 2048, device=DEVICE, dtype=torch.bfloat16)
    block.experts.config._experts_implementation = "eager"
    ref = block(x)
    from eagle_trainer.kernels.moe import moe_forward
    out = moe_forward(x[0], block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, 8, True)
    assert rel_err(out, ref[0]) < 1e-2


def test_norm_impl_choices():
    from eagle_trainer.targets.norms import resolve_norm_impl
    assert resolve_norm_impl("auto", torch.device("cpu")) == "hf"
    assert resolve_norm_impl("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="norm_impl='fused'"):
        resolve_norm_impl("fused", torch.device("cpu"))

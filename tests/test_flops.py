"""The FLOP counter against counts taken from the models themselves: every projection a token goes through is
a Linear (or the conv1d) of the real HF module, counted at 2 FLOPs per weight, plus the hand-written attention
and delta-rule terms; and one tiny dense config counted fully by hand."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle_trainer.drafts.eagle1 import Eagle1Config, Eagle1Draft
from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft
from eagle_trainer import registry
from eagle_trainer.flops import TargetFlops, draft_forward, peak_tflops, step_flops
from eagle_trainer.targets.tiny import tiny_qwen3_config, tiny_qwen3_moe_config, tiny_qwen3_next_config


def target_flops(config) -> TargetFlops:
    """The target side as training counts it: through the TargetInfo a registered TargetSpec reads."""
    return TargetFlops.from_target(registry.TargetSpec(architectures=("test",)).read_info("test", config), config)


def linear_weights(module, skip=()) -> int:
    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(s in name for s in skip))


def test_tiny_dense_by_hand():
    # H 8, 2 heads x D 4, 1 kv head, I 16, V 32, 2 layers; T = 3, Vd = 4, argmax mask on
    cfg = tiny_qwen3_config(vocab_size=32, hidden_size=8, num_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=4, intermediate_size=16)
    f = target_flops(cfg)
    proj = 8 * (8 + 4 + 4) + 8 * 8  # q, k, v, o weights
    core = 2 * 2 * 8 * (3 + 1) / 2  # QK^T and PV, 2 FLOPs each per q-dim per key, (T+1)/2 = 2 keys, q = 8
    mlp = 3 * 8 * 16
    per_token = 2 * (2 * (proj + mlp) + core) + 2 * 8 * (4 + 32)  # 2 layers, then the teacher (Vd + V rows)
    assert f.forward(3, 4) == pytest.approx(3 * per_token)


@pytest.mark.parametrize("make", [
    lambda: tiny_qwen3_config(vocab_size=64, hidden_size=32, num_layers=4),
    lambda: tiny_qwen3_moe_config(vocab_size=64, hidden_size=32, num_layers=4, num_experts=8, top_k=2),
    lambda: tiny_qwen3_next_config(vocab_size=64, hidden_size=32, num_layers=4, num_experts=8, top_k=2),
])
def test_target_projections_equal_the_models_weights(make):
    cfg = make()
    model = AutoModelForCausalLM.from_config(cfg)
    f = target_flops(cfg)
    t, vd = 5, 16
    expect = 0.0
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn"):
            q = f.num_heads * f.head_dim
            expect += 2 * linear_weights(layer.self_attn) + 2 * 2 * q * (t + 1) / 2
        else:  # gated delta net: its Linears, the depthwise conv (K weights per channel), the delta rule
            attn = layer.linear_attn
            expect += 2 * linear_weights(attn) + 2 * attn.conv1d.weight.numel()
            expect += 2 * 4 * f.linear_value_heads * f.linear_value_head_dim**2
        mlp = layer.mlp
        if hasattr(mlp, "experts"):  # router + top-k of E experts' weights + shared expert and its gate (Linears)
            router = mlp.gate.weight.numel()  # HF's *TopKRouter holds a bare [E, H] weight, not a Linear
            assert not isinstance(mlp.gate, torch.nn.Linear)
            experts = mlp.experts.gate_up_proj.numel() + mlp.experts.down_proj.numel()
            expect += 2 * (router + linear_weights(mlp, skip=("experts",)) + experts * f.top_k / f.num_experts)
        else:
            expect += 2 * linear_weights(mlp)
    expect += 2 * cfg.hidden_size * (vd + cfg.vocab_size)
    assert f.forward(t, vd) == pytest.approx(expect * t)
    assert f.layer_types.count("linear_attention") == (3 if cfg.model_type == "qwen3_next" else 0)


def tiny_draft_configs():
    shape = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, vocab_size=64,
                 draft_vocab_size=16, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=128)
    return (Eagle3Config(**shape, target_hidden_size=32, aux_layer_ids=(1, 2, 3)),
            Eagle1Config(**shape, num_layers=2))


@pytest.mark.parametrize("which", [0, 1])
def test_draft_projections_equal_the_drafts_weights(which):
    cfg = tiny_draft_configs()[which]
    draft = (Eagle3Draft if which == 0 else Eagle1Draft)(cfg)
    t, k = 7, 3
    q = cfg.num_heads * cfg.head_dim
    if which == 0:  # fc once; each step the midlayer's Linears and lm_head
        expect = 2 * draft.fc.weight.numel() * t + k * t * 2 * linear_weights(draft, skip=("fc",))
    else:  # fc and the layers every step; logits over the Vd rows of the target lm_head
        expect = k * t * 2 * (linear_weights(draft) + cfg.draft_vocab_size * cfg.hidden_size)
    for step in range(k):
        expect += cfg.num_layers * 2 * 2 * q * t * ((t + 1) / 2 + step)
    assert draft_forward(cfg, t, k) == pytest.approx(expect)


def test_step_is_target_forward_plus_three_draft_forwards():
    target = target_flops(tiny_qwen3_config(vocab_size=64, hidden_size=32, num_layers=4))
    draft = tiny_draft_configs()[0]
    got = step_flops(target, draft, [5, 9], 7, argmax_mask=False)
    expect = sum(target.forward(n, 16, False) + 3 * draft_forward(draft, n, 7) for n in (5, 9))
    assert got == pytest.approx(expect)
    assert step_flops(None, draft, [5], 7, True) == pytest.approx(3 * draft_forward(draft, 5, 7))


def test_peak_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H20") == 148.0 and peak_tflops("cpu") is None

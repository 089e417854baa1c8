"""Qwen3-MoE targets: both expert layouts load through the real loader to the same model; the MoE switch."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from batches import draft_vocab, make_batch
from weights import own_storage

from eagle_trainer import registry
from eagle_trainer.config import TargetConfig
from eagle_trainer.targets import bind_qwen3_moe
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target
from eagle_trainer.targets.moe import bind_moe
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_moe_config

CPU = torch.device("cpu")
NUM_LAYERS, NUM_EXPERTS, INTER = 6, 8, 32


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same seeded tiny model written once per expert layout."""
    config = tiny_qwen3_moe_config(vocab_size=512, num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS,
                                   moe_intermediate_size=INTER)
    root = tmp_path_factory.mktemp("moe_layouts")
    return {layout: save_tiny_checkpoint(root / layout, config, seed=3, logit_std=6.0, expert_layout=layout)
            for layout in ("fused", "per_expert")}


def test_files_hold_the_asked_layout(layouts):
    fused = load_file(layouts["fused"] / "model.safetensors")
    per_expert = load_file(layouts["per_expert"] / "model.safetensors")
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (NUM_EXPERTS, 2 * INTER, 64)
    assert fused["model.layers.0.mlp.experts.down_proj"].shape == (NUM_EXPERTS, 64, INTER)
    assert not any(".experts.0." in k for k in fused)
    assert per_expert["model.layers.0.mlp.experts.7.gate_proj.weight"].shape == (INTER, 64)
    assert per_expert["model.layers.0.mlp.experts.7.down_proj.weight"].shape == (64, INTER)
    assert not any(k.endswith("gate_up_proj") for k in per_expert)
    assert len(per_expert) == len(fused) + NUM_LAYERS * (3 * NUM_EXPERTS - 2)


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_loaded_weights_equal_saved(layouts, layout):
    model, _, _, _ = load_target(TargetConfig(path=str(layouts[layout]), moe_impl="hf"), CPU)
    saved = load_file(layouts[layout] / "model.safetensors")
    params = dict(model.named_parameters())
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}.mlp.experts"
        if layout == "per_expert":  # fuse as the docs say: gate rows then up rows; experts stacked on dim 0
            saved[f"{p}.gate_up_proj"] = torch.stack(
                [torch.cat([saved.pop(f"{p}.{e}.gate_proj.weight"), saved.pop(f"{p}.{e}.up_proj.weight")])
                 for e in range(NUM_EXPERTS)])
            saved[f"{p}.down_proj"] = torch.stack([saved.pop(f"{p}.{e}.down_proj.weight") for e in range(NUM_EXPERTS)])
    assert set(saved) == set(params)
    for name, tensor in saved.items():
        assert torch.equal(params[name], tensor), name


def test_both_layouts_give_identical_targets(layouts):
    loaded = {k: load_target(TargetConfig(path=str(p), moe_impl="hf"), CPU) for k, p in layouts.items()}
    (m_f, _, spec, info), (m_p, _, _, _) = loaded["fused"], loaded["per_expert"]
    assert spec is registry.target_spec("Qwen3MoeForCausalLM")
    assert (info.num_experts, info.num_experts_per_tok, info.moe_intermediate_size) == (NUM_EXPERTS, 2, INTER)
    for (name, a), (_, b) in zip(m_f.named_parameters(), m_p.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    ids, t2d = draft_vocab(info.vocab_size, 100)
    aux = spec.aux_layers(info.num_layers)
    batch = make_batch(2, 17, info.vocab_size)
    out_f = FrozenTarget(own_storage(m_f), spec, aux, ids, t2d).forward(batch)
    out_p = FrozenTarget(own_storage(m_p), spec, aux, ids, t2d).forward(batch)
    assert torch.equal(out_f.aux_hidden, out_p.aux_hidden)
    assert torch.equal(out_f.teacher_logits, out_p.teacher_logits)
    assert torch.equal(out_f.teacher_valid, out_p.teacher_valid)


def test_hf_and_grouped_mm_agree(tiny_qwen3_moe_path):
    model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_moe_path)), CPU)
    assert model.config._experts_implementation == "eager"  # auto on the CPU: hf, HF's own "eager" experts
    ids, t2d = draft_vocab(info.vocab_size, 200)
    target = FrozenTarget(model, spec, spec.aux_layers(info.num_layers), ids, t2d)
    batch = make_batch(2, 23, info.vocab_size, seed=1)
    hf = target.forward(batch)
    assert bind_moe(model, TargetConfig(path="-", moe_impl="grouped_mm")) == "grouped_mm"
    assert model.config._experts_implementation == "grouped_mm"
    grouped = target.forward(batch)
    torch.testing.assert_close(grouped.aux_hidden, hf.aux_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.teacher_probs(), hf.teacher_probs(), rtol=1e-5, atol=1e-6)


def test_bad_moe_impl(tiny_qwen3_moe_path, monkeypatch):
    with pytest.raises(ValueError, match="'cutlass'"):
        load_target(TargetConfig(path=str(tiny_qwen3_moe_path), moe_impl="cutlass"), CPU)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="moe_impl=triton.*moe_impl=hf.*TRITON_INTERPRET=1"):
        load_target(TargetConfig(path=str(tiny_qwen3_moe_path), moe_impl="triton"), CPU)
    with pytest.raises(ValueError, match="moe_impl='eager'.*use target.moe_impl=hf"):  # HF's own code is `hf`
        load_target(TargetConfig(path=str(tiny_qwen3_moe_path), moe_impl="eager"), CPU)


def test_registry_resolves_qwen3_moe():
    spec = registry.resolve("Qwen3MoeForCausalLM", "eagle3")
    assert spec.target.experts == "mlp.experts" and spec.target.bind_kernels is bind_qwen3_moe
    assert spec.target.layers == "model.layers" and spec.algorithm.name == "eagle3"


def test_checkpoint_missing_a_tensor_is_refused(layouts, tmp_path):
    """A router left at its random init would route silently wrong: the loader refuses, naming the key."""
    d = tmp_path / "no_router"
    shutil.copytree(layouts["fused"], d)
    state = load_file(d / "model.safetensors")
    del state["model.layers.2.mlp.gate.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys \(1\).*model\.layers\.2\.mlp\.gate\.weight"):
        load_target(TargetConfig(path=str(d), moe_impl="hf"), CPU)

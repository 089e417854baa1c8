"""Building a target on the meta device and filling it from safetensors gives load_target's weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from weights import own_storage

from eagle_trainer import registry
from eagle_trainer.config import TargetConfig
from eagle_trainer.targets.loading import load_target, read_config
from eagle_trainer.targets.sharded import build_on_meta, fill_from_safetensors, materialize

CPU = torch.device("cpu")


def built_and_filled(path):
    """What the sharded loader does on one rank: build on meta, fill, bind the entry's kernels (as load_target)."""
    cfg = TargetConfig(path=str(path))
    _, arch, hf_config = read_config(cfg)
    model = build_on_meta(hf_config, torch.float32, "sdpa")
    assert all(p.is_meta for p in model.parameters())
    materialize(model, CPU)
    fill_from_safetensors(model, path)
    spec = registry.target_spec(arch)
    if spec.bind_kernels is not None:
        spec.bind_kernels(model, cfg)
    return model


@pytest.mark.parametrize("fixture", ["tiny_qwen3_path", "tiny_qwen3_moe_path", "tiny_qwen3_next_path"])
def test_meta_build_and_fill_equals_load_target(fixture, request):
    path = request.getfixturevalue(fixture)
    model = built_and_filled(path)
    want, _, _, _ = load_target(TargetConfig(path=str(path), dtype="float32"), CPU)
    got_state, want_state = model.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for name, tensor in want_state.items():  # buffers too (RoPE frequencies are not in the checkpoint)
        assert torch.equal(got_state[name], tensor), name
    ids = torch.randint(0, 1024, (2, 9))
    assert torch.equal(own_storage(model)(ids).logits, own_storage(want)(ids).logits)


def test_fused_expert_layout_fills_the_same_weights(tiny_qwen3_moe_path, tiny_qwen3_moe_fused_path):
    fused = built_and_filled(tiny_qwen3_moe_fused_path)
    per_expert = built_and_filled(tiny_qwen3_moe_path)
    for (name, a), (_, b) in zip(fused.named_parameters(), per_expert.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_refuses_missing_and_unused_tensors(tiny_qwen3_moe_path, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_qwen3_moe_path, bad)
    (file,) = bad.glob("*.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.extra.weight"] = tensors.pop("model.layers.1.self_attn.q_proj.weight")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(1\) \['model.layers.1.self_attn.q_proj.weight'\]; not used "
                                         r"\(1\) \['model.layers.0.extra.weight'\]"):
        built_and_filled(bad)


def test_refuses_a_tensor_of_another_shape(tiny_qwen3_path, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_qwen3_path, bad)
    (file,) = bad.glob("*.safetensors")
    tensors = load_file(file)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.norm.weight is \(63,\) but .* has \(64,\)"):
        built_and_filled(bad)

"""vLLM speculators export: exact tensors and config, aux ids in vLLM's convention, same logits read back,
refusals, CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle_trainer.app.export import main
from eagle_trainer.drafts.io import save_draft
from eagle_trainer import registry
from eagle_trainer.export import export_vllm, read_vllm
from eagle_trainer.export.sglang import SGLANG_TENSORS
from eagle_trainer.export.vllm import VLLM_TENSORS
from export_cases import (HT, V, VD, tiny_draft, vllm_captures,
                          vllm_speculators_hf_config)


@pytest.fixture
def checkpoint(tmp_path):
    draft = tiny_draft()
    save_draft(tmp_path / "ckpt", draft)
    return draft, tmp_path / "ckpt"


def read_config(out) -> dict:
    return json.loads((out / "config.json").read_text())


def test_writer_is_registered():
    assert registry.export_formats()["vllm"].write is export_vllm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_equal_the_checkpoint_and_no_embedding(checkpoint, tmp_path, dtype):
    draft, ckpt = checkpoint
    out = export_vllm(ckpt, tmp_path / "out", dtype=dtype)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(VLLM_TENSORS)
    assert not any("embed" in k or "midlayer" in k for k in exported)
    renamed = dict(zip(SGLANG_TENSORS, VLLM_TENSORS))
    assert renamed["midlayer.hidden_norm.weight"] == "layers.0.hidden_norm.weight"
    assert renamed["fc.weight"] == "fc.weight" and renamed["d2t"] == "d2t"
    for name, value in draft.trainable_state_dict().items():
        got = exported[renamed[name]]
        if name in ("d2t", "t2d"):
            assert got.dtype == value.dtype and torch.equal(got, value), name
        else:
            assert got.dtype == dtype, name
            assert torch.equal(got, value.to(dtype)), name


def test_config_declares_exactly_the_draft(checkpoint, tmp_path):
    draft, ckpt = checkpoint
    cfg = draft.config
    config = read_config(export_vllm(ckpt, tmp_path / "out"))
    assert config == {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": {
            "model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "num_hidden_layers": 1, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": None, "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": V,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        "draft_vocab_size": VD,
        "target_hidden_size": HT,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "eagle_aux_hidden_state_layer_ids": [2, 6, 10],
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5, "verifier_accept_k": 1,
                                  "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": None, "architectures": ["Qwen3ForCausalLM"]},
        },
        "eagle_trainer": {"target_architecture": "Qwen3ForCausalLM",
                          "target": {"fingerprint": None, "vocab_size": V, "aux_layer_ids": [1, 5, 9]}, "extra": {}},
    }
    # vLLM parses a config as speculators only when it has no top-level model_type
    assert "model_type" not in config
    assert read_vllm(tmp_path / "out").config == cfg


def test_aux_ids_in_vllms_convention(tmp_path):
    """Trained on layer outputs (1, 3, 4) = HF hidden_states[2, 4, 5], which vLLM's key names."""
    save_draft(tmp_path / "ckpt", tiny_draft(aux_layer_ids=(1, 3, 4)))
    config = read_config(export_vllm(tmp_path / "ckpt", tmp_path / "out"))
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert vllm_captures(vllm_speculators_hf_config(config)) == [2, 4, 5]
    assert read_vllm(tmp_path / "out").config.aux_layer_ids == (1, 3, 4)


def test_config_parses_as_vllm_builds_it(tmp_path):
    """vLLM's draft config is transformer_layer_config plus the EAGLE-3 keys; it must be a LlamaConfig of the draft
    with its norm placement (vLLM's own default for norm_before_residual is true)."""
    from transformers import LlamaConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    draft = tiny_draft(rope_scaling=scaling, rope_theta=1e6)
    save_draft(tmp_path / "ckpt", draft)
    hf_dict = vllm_speculators_hf_config(read_config(export_vllm(tmp_path / "ckpt", tmp_path / "out")))
    assert hf_dict["norm_before_residual"] is False and hf_dict["norm_before_fc"] is False
    hf = LlamaConfig(**hf_dict)
    assert (hf.head_dim, hf.num_key_value_heads, hf.draft_vocab_size, hf.target_hidden_size) == (8, 2, VD, HT)
    assert (hf.num_hidden_layers, hf.vocab_size, hf.tie_word_embeddings) == (1, V, False)
    rope = getattr(hf, "rope_parameters", None) or {**(hf.rope_scaling or {}), "rope_theta": hf.rope_theta}
    assert rope["rope_theta"] == 1e6 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert read_vllm(tmp_path / "out").config == draft.config


def test_reader_refuses_what_is_not_this_draft(checkpoint, tmp_path):
    _, ckpt = checkpoint
    out = export_vllm(ckpt, tmp_path / "out")
    config = read_config(out)
    for key, value, message in [("norm_before_residual", True, "norm flags"),
                                ("eagle_aux_hidden_state_layer_ids", [0, 5, 9], "index < 1"),
                                ("speculators_model_type", "eagle", "speculators_model_type")]:
        (out / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            read_vllm(out)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(out / "model.safetensors"))
    tensors["layers.1.hidden_norm.weight"] = tensors.pop("layers.0.hidden_norm.weight")
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.hidden_norm\.weight"):
        read_vllm(out)


def test_cli_format_vllm_and_verifier(checkpoint, tmp_path, capsys):
    draft, ckpt = checkpoint
    assert main(["--checkpoint", str(ckpt), "--format", "vllm", "--out", str(tmp_path / "out"),
                 "--dtype", "float32", "--verifier", "/models/Qwen3-8B"]) == 0
    assert "as vllm (float32)" in capsys.readouterr().out
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(exported["layers.0.self_attn.q_proj.weight"], draft.midlayer.self_attn.q_proj.weight.detach())
    verifier = read_config(tmp_path / "out")["speculators_config"]["verifier"]
    assert verifier == {"name_or_path": "/models/Qwen3-8B", "architectures": ["Qwen3ForCausalLM"]}


def test_cli_verifier_only_for_vllm(checkpoint, tmp_path):
    _, ckpt = checkpoint
    with pytest.raises(ValueError, match="--verifier is written only by --format vllm"):
        main(["--checkpoint", str(ckpt), "--format", "sglang", "--out", str(tmp_path / "out"), "--verifier", "x"])
    assert not (tmp_path / "out").exists()

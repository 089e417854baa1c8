"""SGLang EAGLE-3 export: exact tensors and config, no embedding, same logits read back, refusals, CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from eagle_trainer.app.export import main
from eagle_trainer.checkpoint import resolve_checkpoint
from eagle_trainer.drafts.io import save_draft
from eagle_trainer.export import export_sglang, read_sglang
from eagle_trainer.export.sglang import SGLANG_TENSORS
from export_cases import HT, V, VD, edit_checkpoint, sglang_captures, tiny_draft, vllm_captures


@pytest.fixture
def checkpoint(tmp_path):
    draft = tiny_draft()
    save_draft(tmp_path / "ckpt", draft)
    return draft, tmp_path / "ckpt"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_equal_the_checkpoint_and_no_embedding(checkpoint, tmp_path, dtype):
    draft, ckpt = checkpoint
    out = export_sglang(ckpt, tmp_path / "out", dtype=dtype)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(SGLANG_TENSORS)
    assert not any("embed" in k for k in exported)
    for name, value in draft.trainable_state_dict().items():
        if name in ("d2t", "t2d"):
            assert exported[name].dtype == value.dtype and torch.equal(exported[name], value), name
        else:
            assert exported[name].dtype == dtype, name
            assert torch.equal(exported[name], value.to(dtype)), name
    assert exported["d2t"].dtype == torch.int64 and exported["t2d"].dtype == torch.bool


def test_config_declares_exactly_the_draft(checkpoint, tmp_path):
    draft, ckpt = checkpoint
    cfg = draft.config
    config = json.loads((export_sglang(ckpt, tmp_path / "out") / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "num_hidden_layers": 1,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": V, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "draft_vocab_size": VD, "target_hidden_size": HT,
        "norm_before_residual": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 5, 9], "use_aux_hidden_state": True},
        "eagle_aux_hidden_state_layer_ids": [2, 6, 10],
    }
    assert {k: config[k] for k in expected} == expected
    assert read_sglang(tmp_path / "out").config == cfg


def test_aux_ids_in_each_engines_convention(tmp_path):
    """Trained on layer outputs (1, 3, 4) = HF hidden_states[2, 4, 5]: SGLang's key holds the layer outputs, vLLM's
    (read first, so its fallback to the nested key never happens) the hidden_states indices."""
    save_draft(tmp_path / "ckpt", tiny_draft(aux_layer_ids=(1, 3, 4)))
    config = json.loads((export_sglang(tmp_path / "ckpt", tmp_path / "out") / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert sglang_captures(config) == vllm_captures(config) == [2, 4, 5]
    assert read_sglang(tmp_path / "out").config.aux_layer_ids == (1, 3, 4)


def test_config_without_target_hidden_size_reads_the_drafts_width(tmp_path):
    """SpecForge's export writes no target_hidden_size; the engines then take the draft's hidden size."""
    save_draft(tmp_path / "ckpt", tiny_draft(target_hidden_size=32))
    out = export_sglang(tmp_path / "ckpt", tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config["target_hidden_size"]
    (out / "config.json").write_text(json.dumps(config))
    assert read_sglang(out).config.target_hidden_size == 32


def test_aux_keys_naming_different_layers_are_refused(checkpoint, tmp_path):
    _, ckpt = checkpoint
    out = export_sglang(ckpt, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="name different layers"):
        read_sglang(out)


def test_config_loads_as_hf_llama_config(tmp_path):
    """SGLang builds its model from transformers' LlamaConfig: the keys must survive that parse."""
    from transformers import AutoConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    draft = tiny_draft(rope_scaling=scaling, rope_theta=1e6)
    save_draft(tmp_path / "ckpt", draft)
    hf = AutoConfig.from_pretrained(export_sglang(tmp_path / "ckpt", tmp_path / "out"))
    assert type(hf).__name__ == "LlamaConfig"
    assert (hf.head_dim, hf.num_key_value_heads, hf.draft_vocab_size, hf.target_hidden_size) == (8, 2, VD, HT)
    assert hf.tie_word_embeddings is False
    rope = getattr(hf, "rope_parameters", None) or {**(hf.rope_scaling or {}), "rope_theta": hf.rope_theta}
    assert rope["rope_theta"] == 1e6 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert read_sglang(tmp_path / "out").config == draft.config


def test_wrong_shape_or_vocab_map_is_refused(checkpoint, tmp_path):
    _, ckpt = checkpoint
    edit_checkpoint(ckpt, lambda t: t.update({"lm_head.weight": torch.zeros(VD + 1, 32)}))
    with pytest.raises(ValueError, match=r"lm_head\.weight \(21, 32\)"):
        export_sglang(ckpt, tmp_path / "out")
    draft = tiny_draft()
    draft.t2d[draft.t2d.nonzero()[0]] = False  # t2d no longer marks the ids d2t maps to
    save_draft(tmp_path / "bad_map", draft)
    with pytest.raises(ValueError, match="vocab map"):
        export_sglang(tmp_path / "bad_map", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_is_kept_unless_overwrite(checkpoint, tmp_path):
    _, ckpt = checkpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        export_sglang(ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "keep").exists()
    export_sglang(ckpt, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_cli_checkpoint_dir(checkpoint, tmp_path, capsys):
    draft, ckpt = checkpoint
    assert main(["--checkpoint", str(ckpt), "--format", "sglang", "--out", str(tmp_path / "out"),
                 "--dtype", "float32"]) == 0
    assert "exported" in capsys.readouterr().out
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(exported["fc.weight"], draft.fc.weight.detach())


def test_cli_run_dir_takes_the_newest_step(tmp_path):
    run = tmp_path / "run"
    for step, seed in [(900, 1), (1000, 2), (200, 3)]:  # numeric, not lexicographic, order
        save_draft(run / "checkpoints" / f"step_{step}", tiny_draft(seed=seed))
    (run / "checkpoints" / "step_latest").mkdir()  # not a step number: ignored
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_1000"
    main(["--checkpoint", str(run), "--format", "sglang", "--out", str(tmp_path / "out")])
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(exported["lm_head.weight"], tiny_draft(seed=2).lm_head.weight.detach().bfloat16())


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "nope"), "--format", "sglang", "--out", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither draft_config.json nor checkpoints/step_<N>"):
        main(["--checkpoint", str(tmp_path / "empty"), "--format", "sglang", "--out", str(tmp_path / "out")])
    (tmp_path / "run" / "checkpoints" / "step_5").mkdir(parents=True)
    with pytest.raises(ValueError, match="step 5"):
        main(["--checkpoint", str(tmp_path / "run"), "--format", "sglang", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--format", "tensorrt", "--out", str(tmp_path / "out")])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

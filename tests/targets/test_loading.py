"""Loading a target from a local directory: clear refusals for what is not a usable checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle_trainer.config import TargetConfig
from eagle_trainer.targets.loading import load_target, read_target_tensors, resolve_dtype, target_fingerprint
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_config


def test_refuses_missing_dir_and_missing_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_target(TargetConfig(path=str(tmp_path / "nope")), torch.device("cpu"))
    with pytest.raises(ValueError, match="no config.json"):
        load_target(TargetConfig(path=str(tmp_path)), torch.device("cpu"))


def test_refuses_pickle_only_weights(tiny_qwen3_path, tmp_path):
    d = tmp_path / "bin_only"
    shutil.copytree(tiny_qwen3_path, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_target(TargetConfig(path=str(d)), torch.device("cpu"))


def test_unknown_architecture_lists_registered(tiny_qwen3_path, tmp_path):
    d = tmp_path / "other"
    shutil.copytree(tiny_qwen3_path, d)
    cfg = (d / "config.json").read_text().replace("Qwen3ForCausalLM", "MysteryForCausalLM")
    (d / "config.json").write_text(cfg)
    with pytest.raises(KeyError, match="MysteryForCausalLM.*Qwen3ForCausalLM"):
        load_target(TargetConfig(path=str(d)), torch.device("cpu"))


def test_dtype_choice():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_read_target_tensors_untied_and_sharded(tiny_qwen3_path, tmp_path):
    model, _, _, _ = load_target(TargetConfig(path=str(tiny_qwen3_path)), torch.device("cpu"))
    names = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    got = read_target_tensors(tiny_qwen3_path, names)
    assert list(got) == names and not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    for name in names:
        assert torch.equal(got[name], params[name]), name
    # the same checkpoint split over two files with an index, as large checkpoints are stored
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_qwen3_path, sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for k, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({key: state[key] for key in part}, str(sharded / file), metadata={"format": "pt"})
        weight_map.update({key: file for key in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    again = read_target_tensors(sharded, names)
    assert all(torch.equal(again[n], got[n]) for n in names)
    with pytest.raises(ValueError, match=f"{sharded}.*'model.norm.bias'"):
        read_target_tensors(sharded, ["model.norm.bias"])


def test_read_target_tensors_tied_lm_head(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "tied", tiny_qwen3_config(vocab_size=512, hidden_size=32, num_layers=5,
                                                                      tie_word_embeddings=True))
    model, _, _, _ = load_target(TargetConfig(path=str(path)), torch.device("cpu"))
    got = read_target_tensors(path, ["lm_head.weight", "model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="no tensor 'lm_head.weight' .config tie_word_embeddings=False"):
        read_target_tensors(path, ["lm_head.weight"])


def test_target_fingerprint_names_config_and_weight_files(tiny_qwen3_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_qwen3_path, copy)
    assert target_fingerprint(copy) == target_fingerprint(tiny_qwen3_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    changed_config = target_fingerprint(copy)
    assert changed_config != target_fingerprint(tiny_qwen3_path)
    with open(copy / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert target_fingerprint(copy) != changed_config


def test_refuses_a_tokenizer_with_more_ids_than_the_target_vocab(tiny_qwen3_path, tmp_path):
    d = tmp_path / "small_vocab"
    shutil.copytree(tiny_qwen3_path, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(ValueError, match="tokenizer .* has 1024 ids but the target's vocab_size is 100.*do not belong"):
        load_target(TargetConfig(path=str(d)), torch.device("cpu"))


def test_custom_code_is_not_run_unless_trusted(tiny_qwen3_path, tmp_path):
    d = tmp_path / "custom"
    shutil.copytree(tiny_qwen3_path, d)
    marker = tmp_path / "code_ran"
    (d / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"custom code.*configuration_evil.EvilConfig.*target.trust_remote_code=true"):
        load_target(TargetConfig(path=str(d)), torch.device("cpu"))
    assert not marker.exists()

"""Loading a target from a local directory: clear refusals for what is not a usable checkpoint."""

import shutil

import pytest
import torch

from eagle_trainer.config import TargetConfig
from eagle_trainer.targets.loading import load_target, resolve_dtype


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

"""Startup validation: a bad recipe fails before any target weights are read, naming the key, value and fix."""

import json
import time

import pytest
from hydra import compose, initialize_config_dir

import eagle_trainer.app.train as train_module
from eagle_trainer.app.train import RECIPES, run, to_config


def compose_cfg(target, run_dir, *extra):
    (run_dir / "unread.jsonl").touch()  # the paths are resolved at startup; the data is read after these checks
    overrides = ["demo.enabled=false", f"target.path={target}", f"data.path={run_dir / 'unread.jsonl'}",
                 f"train.run_dir={run_dir}", "train.progress=false", *extra]
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


@pytest.fixture
def no_weights(monkeypatch):
    """Any read of the target's weights (whole, sharded or offline) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the target's weights were read before the recipe was checked")

    for name in ("open_target", "load_tokenizer"):
        monkeypatch.setattr(train_module, name, refuse)


def test_eagle1_with_the_default_export_formats_fails_at_once(tiny_qwen3_path, tmp_path, no_weights):
    cfg = compose_cfg(tiny_qwen3_path, tmp_path, "draft=eagle1")
    assert cfg.train.export_formats == ["sglang", "vllm"]
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"train.export_formats has 'sglang', which an eagle1 draft cannot be "
                                         r"written as; use \[eagle1-sglang, eagle1-vllm\]"):
        run(cfg)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("override, message", [
    ("draft.algorithm=eagle9", r"draft.algorithm='eagle9' is not a registered draft algorithm.*eagle3"),
    ("draft.ttt_steps=0", r"draft.ttt_steps=0 is out of range; set it to at least 1"),
    ("optim.batch_size=0", r"optim.batch_size=0 is out of range; set it to at least 1"),
    ("train.max_steps=-1", r"train.max_steps=-1 is out of range; set it to at least 1"),
    ("optim.lr=0", r"optim.lr=0.0 is out of range; set a positive learning rate"),
    ("accept.modes=[chain,beam]", r"accept.modes=\['chain', 'beam'\] has \['beam'\]"),
    ("target.aux_layer_ids=[1,3,8]", r"target.aux_layer_ids=\[1, 3, 8\] has \[8\], outside the target's 8 decoder "
                                     r"layers; use 0-based ids below 8"),
    ("draft.draft_vocab_size=4096", r"draft.draft_vocab_size=4096 exceeds the target's vocab of 1024"),
])
def test_bad_recipe_values_fail_before_the_target_is_loaded(tiny_qwen3_path, tmp_path, no_weights, override,
                                                             message):
    with pytest.raises(ValueError, match=message):
        run(compose_cfg(tiny_qwen3_path, tmp_path, override))


def test_an_unregistered_architecture_fails_from_config_json(tiny_qwen3_path, tmp_path, no_weights):
    target = tmp_path / "target"
    target.mkdir()
    config = json.loads((tiny_qwen3_path / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    (target / "model.safetensors").symlink_to(tiny_qwen3_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"target.path=.*unknown target architecture 'FooForCausalLM'.*register_target"):
        run(compose_cfg(target, tmp_path))

"""The extension API: lookups, errors, and a target registered from outside the package that trains."""

import json

import pytest
from transformers import LlamaConfig

from eagle_trainer import registry
from eagle_trainer.config import Config, DataConfig, DraftConfig, OptimConfig, TargetConfig, TrainConfig
from eagle_trainer.data.chat import write_chat_jsonl
from eagle_trainer.app.demo import synthetic_prompts
from eagle_trainer.targets.tiny import save_tiny_checkpoint
from eagle_trainer.app.train import run


def test_resolve_builtin():
    spec = registry.resolve("Qwen3ForCausalLM", "eagle3")
    assert spec.target.layers == "model.layers" and spec.algorithm.name == "eagle3"


def test_every_builtin_target_resolves_every_algorithm():
    targets = registry.known_targets()
    assert {"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM"} <= set(targets)
    for arch in targets:
        for name in ("eagle1", "eagle2", "eagle3"):
            spec = registry.resolve(arch, name)
            assert spec.algorithm.name == name and spec.algorithm.needs_aux_hidden == (name == "eagle3")
    # eagle2 is eagle1's training: the same builder and loss, only the name (the intended decoding) differs
    e1, e2 = registry.algorithm_spec("eagle1"), registry.algorithm_spec("eagle2")
    assert e1.loss is e2.loss


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="Qwen3ForCausalLM"):
        registry.resolve("NoSuchForCausalLM", "eagle3")
    with pytest.raises(KeyError, match="eagle3"):
        registry.resolve("Qwen3ForCausalLM", "eagle9")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_target(registry.TargetSpec(architectures=("Qwen3ForCausalLM",)))
    with pytest.raises(ValueError, match="already registered"):
        registry.register_algorithm(registry.resolve("Qwen3ForCausalLM", "eagle3").algorithm)


def test_default_aux_layers():
    assert registry.default_aux_layers(36) == (1, 17, 32)
    assert registry.default_aux_layers(48) == (1, 23, 44)
    with pytest.raises(ValueError, match="aux_layer_ids"):
        registry.default_aux_layers(4)


def write_chat(path, n=24):
    convs = []
    for i, conv in enumerate(synthetic_prompts(n, seed=1)):
        convs.append(conv + [{"role": "assistant", "content": f"Kalo mine su {i % 5} ta ri po."}])
    write_chat_jsonl(path, convs)
    return path


def test_llama_target_registered_from_outside_trains(tmp_path):
    """No package edit: register LlamaForCausalLM here, then train a few EAGLE-3 steps on a tiny Llama."""
    arch = "LlamaForCausalLM"
    if arch not in registry.known_targets():
        registry.register_target(registry.TargetSpec(architectures=(arch,)))
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    target = save_tiny_checkpoint(tmp_path / "llama", config, logit_std=6.0)
    assert json.loads((target / "config.json").read_text())["architectures"] == [arch]
    cfg = Config(
        target=TargetConfig(path=str(target)),
        draft=DraftConfig(draft_vocab_size=128, ttt_steps=3),
        data=DataConfig(path=str(write_chat(tmp_path / "chat.jsonl")), max_length=128),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, batch_size=4),
        train=TrainConfig(run_dir=str(tmp_path / "run"), max_steps=4, epochs=10, log_every=1, save_every=0,
                          eval_batches=0, progress=False),
    )
    summary = run(cfg)
    assert summary.steps == 4
    assert len(summary.train_acc) == 3
    # the run records its target: eagle-eval refuses the export with any other one
    from eagle_trainer.export import target_fingerprint_of
    from eagle_trainer.targets.loading import target_fingerprint
    assert target_fingerprint_of(tmp_path / "run/export/sglang") == target_fingerprint(target)
    assert target_fingerprint_of(tmp_path / "run") == target_fingerprint(target)
    draft_cfg = json.loads((tmp_path / "run/export/sglang/config.json").read_text())
    assert draft_cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]

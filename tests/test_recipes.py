"""Every recipe composes against the schemas, and its target and draft build on the meta device."""

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from transformers import AutoConfig, AutoModelForCausalLM

from eagle_trainer import registry
from eagle_trainer.targets.loading import target_info
from eagle_trainer.app.train import RECIPES, to_config

FIXTURES = Path(__file__).parent / "fixtures"
EXPERIMENTS = sorted(p.stem for p in (RECIPES / "experiment").glob("*.yaml"))
# Real configs (config.json only, no weights) of the targets the experiments are written for.
TARGET_CONFIGS = {"qwen3_8b_eagle3": "qwen3_8b_config.json", "qwen3_30b_a3b_eagle3": "qwen3_30b_a3b_config.json",
                  "qwen3_30b_a3b_eagle1": "qwen3_30b_a3b_config.json",
                  "qwen3_next_80b_a3b_eagle3": "qwen3_next_80b_a3b_config.json",
                  "qwen3_235b_a22b_eagle3": "qwen3_235b_a22b_config.json"}


def compose_recipe(overrides):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def fake_checkpoint(tmp_path, config_file):
    """A directory that passes the checkpoint checks: the real config.json and an empty safetensors file."""
    d = tmp_path / "target"
    d.mkdir()
    shutil.copy(FIXTURES / config_file, d / "config.json")
    (d / "model.safetensors").write_bytes(b"")
    return d


def test_default_recipe_is_the_demo():
    cfg = compose_recipe([])
    assert cfg.demo.enabled and cfg.draft.algorithm == "eagle3" and cfg.train.run_dir == "runs/demo"


def test_unknown_keys_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_recipe(["draft.no_such_key=1"])
    with pytest.raises(ConfigCompositionException):
        compose_recipe(["+experiment=no_such_experiment"])


def test_chat_template_keys_compose_from_the_command_line():
    assert (compose_recipe([]).data.chat_template_kwargs, compose_recipe([]).data.empty_think) == ({}, "auto")
    cfg = compose_recipe(["+data.chat_template_kwargs.enable_thinking=false", "data.empty_think=mask",
                          "data.chat_template=tpl.jinja"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert (cfg.data.empty_think, cfg.data.chat_template) == ("mask", "tpl.jinja")


def test_every_experiment_has_a_target_config():
    assert set(EXPERIMENTS) == set(TARGET_CONFIGS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_on_meta(name, tmp_path):
    ckpt = fake_checkpoint(tmp_path, TARGET_CONFIGS[name])
    cfg = compose_recipe([f"+experiment={name}", f"target.path={ckpt}", "data.path=chat.jsonl"])
    assert not cfg.demo.enabled
    spec, info = target_info(cfg.target)
    algo = registry.resolve(info.architecture, cfg.draft.algorithm).algorithm
    aux = tuple(cfg.target.aux_layer_ids or spec.aux_layers(info.num_layers))
    assert aux == spec.aux_layers(info.num_layers)  # the recipe's explicit ids are the documented default
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
        draft = algo.build_draft(info, cfg.draft, aux)
    assert len(target.get_submodule(spec.layers)) == info.num_layers
    q_shape = (info.num_heads * info.head_dim,)
    if cfg.draft.algorithm == "eagle3":
        assert draft.fc.weight.shape == (info.hidden_size, 3 * info.hidden_size)
        assert draft.lm_head.weight.shape == (cfg.draft.draft_vocab_size, info.hidden_size)
        assert draft.midlayer.self_attn.q_proj.weight.shape == (*q_shape, 2 * info.hidden_size)
    else:  # EAGLE-1/2: fc over [embed, feature] with bias, the target's lm_head (not a draft parameter)
        assert cfg.draft.algorithm == "eagle1" and not algo.needs_aux_hidden
        assert draft.fc.weight.shape == (info.hidden_size, 2 * info.hidden_size) and draft.fc.bias is not None
        assert draft.layers[0].self_attn.q_proj.weight.shape == (*q_shape, info.hidden_size)
        assert draft.layers[0].input_layernorm is None and not hasattr(draft, "lm_head")


def test_qwen3_8b_shapes():
    cfg = AutoConfig.from_pretrained(FIXTURES / "qwen3_8b_config.json")
    info = registry.info_from_hf_config("Qwen3ForCausalLM", cfg)
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads, info.head_dim) == (36, 4096, 32, 8, 128)
    assert info.rope_theta == 1e6 and info.rope_scaling is None and info.vocab_size == 151936


def test_qwen3_30b_a3b_shapes():
    cfg = AutoConfig.from_pretrained(FIXTURES / "qwen3_30b_a3b_config.json")
    info = registry.info_from_hf_config("Qwen3MoeForCausalLM", cfg)
    shape = (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads, info.head_dim)
    assert shape == (48, 2048, 32, 4, 128)
    assert (info.num_experts, info.num_experts_per_tok, info.moe_intermediate_size) == (128, 8, 768)
    assert info.intermediate_size == 6144 and info.rope_theta == 1e6 and info.vocab_size == 151936
    assert registry.target_spec("Qwen3MoeForCausalLM").aux_layers(info.num_layers) == (1, 23, 44)


def test_moe_experiment_picks_the_moe_target_group():
    overrides = ["+experiment=qwen3_30b_a3b_eagle3", "target.path=x", "data.path=chat.jsonl"]
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        composed = compose("config", overrides=overrides, return_hydra_config=True)
    assert composed.hydra.runtime.choices.target == "qwen3_moe"
    cfg = compose_recipe(overrides)
    assert cfg.target.moe_impl == "auto" and cfg.target.moe_batch_invariant
    assert cfg.target.aux_layer_ids == [1, 23, 44] and cfg.train.run_dir == "runs/qwen3_30b_a3b_eagle3"
    cfg = compose_recipe(["+experiment=qwen3_30b_a3b_eagle3", "target.path=x", "data.path=chat.jsonl",
                          "target.moe_impl=grouped_mm"])
    assert cfg.target.moe_impl == "grouped_mm"


def test_parallel_groups():
    single = compose_recipe([])
    assert (single.parallel.target, single.parallel.ep) == ("replicate", 1)
    moe = compose_recipe(["+experiment=qwen3_30b_a3b_eagle3", "target.path=x", "data.path=chat.jsonl"])
    assert (moe.parallel.target, moe.parallel.ep) == ("fsdp", 0)  # ep 0: every rank
    big = compose_recipe(["+experiment=qwen3_235b_a22b_eagle3", "target.path=x", "data.path=chat.jsonl"])
    assert (big.parallel.target, big.parallel.ep) == ("fsdp", 8)
    fsdp = compose_recipe(["+experiment=qwen3_30b_a3b_eagle3", "target.path=x", "data.path=chat.jsonl", "parallel=fsdp"])
    assert (fsdp.parallel.target, fsdp.parallel.ep) == ("fsdp", 1)

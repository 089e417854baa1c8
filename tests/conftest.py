"""Shared fixtures: tiny HF checkpoints written to disk once per session and loaded back like real ones."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

# Without a GPU the Triton kernels run in Triton's interpreter; it is chosen when a kernel is defined (at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from eagle_trainer.targets.tiny import (save_tiny_checkpoint, tiny_qwen3_config, tiny_qwen3_moe_config,
                                       tiny_qwen3_next_config)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory):
    """A tiny random Qwen3ForCausalLM checkpoint (8 layers, hidden 64, vocab 1024) with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_qwen3")
    return save_tiny_checkpoint(path, tiny_qwen3_config(vocab_size=1024, hidden_size=64, num_layers=8), logit_std=6.0)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_path(tmp_path_factory):
    """A tiny random Qwen3MoeForCausalLM checkpoint (8 layers, hidden 64, vocab 1024, 8 experts, top-2)."""
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    config = tiny_qwen3_moe_config(vocab_size=1024, hidden_size=64, num_layers=8, num_experts=8, top_k=2)
    return save_tiny_checkpoint(path, config, logit_std=6.0)


@pytest.fixture(scope="session")
def tiny_qwen3_next_path(tmp_path_factory):
    """A tiny random Qwen3NextForCausalLM checkpoint (8 layers: full attention at 3 and 7, gated delta net
    elsewhere; hidden 64, vocab 1024, 8 experts, top-2, a shared expert), as save_pretrained writes it."""
    path = tmp_path_factory.mktemp("tiny_qwen3_next")
    config = tiny_qwen3_next_config(vocab_size=1024, hidden_size=64, num_layers=8, num_experts=8, top_k=2)
    return save_tiny_checkpoint(path, config, logit_std=6.0)


def compose_demo(config_name, run_dir, max_steps, save_every, extra=()):
    """A shortened demo recipe (`config`, `demo_moe`, `demo_eagle1`) writing into run_dir."""
    from eagle_trainer.train import RECIPES, to_config
    overrides = [f"train.run_dir={run_dir}", "demo.num_prompts=96", "demo.num_eval_prompts=16",
                 f"train.max_steps={max_steps}", f"train.save_every={save_every}", "train.progress=false",
                 "accept.num_prompts=4", "accept.max_new_tokens=32", *extra]
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose(config_name, overrides=overrides))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo job, shortened: (run_dir, Summary) of a draft trained on a tiny dense Qwen3 target."""
    from eagle_trainer.train import run
    run_dir = tmp_path_factory.mktemp("demo")
    return run_dir, run(compose_demo("config", run_dir, max_steps=60, save_every=30))


@pytest.fixture(scope="session")
def demo_moe_run(tmp_path_factory):
    """The demo_moe job, shortened: a draft trained on a tiny Qwen3-MoE target."""
    from eagle_trainer.train import run
    run_dir = tmp_path_factory.mktemp("demo_moe")
    cfg = compose_demo("demo_moe", run_dir, max_steps=40, save_every=40)
    assert cfg.demo.architecture == "qwen3_moe" and cfg.target.moe_impl == "auto"
    return run_dir, run(cfg)


def on_demo_assets(demo_dir):
    """Overrides that train on an earlier demo run's target and data instead of building new ones."""
    return ["demo.enabled=false", f"target.path={demo_dir / 'target'}", f"data.path={demo_dir / 'data/train.jsonl'}",
            f"data.eval_path={demo_dir / 'data/eval.jsonl'}", f"data.cache_dir={demo_dir / 'cache'}"]


@pytest.fixture(scope="session")
def demo_eagle1_run(demo_run, tmp_path_factory):
    """The demo_eagle1 recipe (an EAGLE-1 draft), shortened, on the dense demo's target and data:
    (demo_dir, run_dir, Summary)."""
    from eagle_trainer.train import run
    demo_dir, _ = demo_run
    run_dir = tmp_path_factory.mktemp("demo_eagle1")
    return demo_dir, run_dir, run(compose_demo("demo_eagle1", run_dir, 60, 60, on_demo_assets(demo_dir)))

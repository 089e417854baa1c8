"""Shared fixtures: tiny HF checkpoints written to disk once per session and loaded back like real ones."""

import os
import pickle
import shutil

import pytest
import torch
from filelock import FileLock
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
def tiny_qwen3_moe_fused_path(tmp_path_factory):
    """The tiny_qwen3_moe_path weights with the experts written fused ([E, 2I, H] / [E, H, I]), not per expert."""
    path = tmp_path_factory.mktemp("tiny_qwen3_moe_fused")
    config = tiny_qwen3_moe_config(vocab_size=1024, hidden_size=64, num_layers=8, num_experts=8, top_k=2)
    return save_tiny_checkpoint(path, config, logit_std=6.0, expert_layout="fused")


@pytest.fixture(scope="session")
def tiny_qwen3_next_path(tmp_path_factory):
    """A tiny random Qwen3NextForCausalLM checkpoint (8 layers: full attention at 3 and 7, gated delta net
    elsewhere; hidden 64, vocab 1024, 8 experts, top-2, a shared expert), as save_pretrained writes it."""
    path = tmp_path_factory.mktemp("tiny_qwen3_next")
    config = tiny_qwen3_next_config(vocab_size=1024, hidden_size=64, num_layers=8, num_experts=8, top_k=2)
    return save_tiny_checkpoint(path, config, logit_std=6.0)


@pytest.fixture(scope="session")
def tiny_chat_target_path(tmp_path_factory):
    """A tiny random Qwen3ForCausalLM (2 layers, hidden 64, vocab 1024, ChatML template) that ends its turns: residual
    dimension 0 holds the constant 0.02 (embedding column 0; no attention or MLP output writes to it) and lm_head
    reads the `<|im_end|>` logit from that dimension alone, so a sampled reply or user message stops after about 10
    tokens (a random target's logits would almost never pick one id of 1024)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_chat")
    save_tiny_checkpoint(path, tiny_qwen3_config(vocab_size=1024, num_layers=2), logit_std=6.0)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    end = AutoTokenizer.from_pretrained(str(path)).convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.02  # about the residual's RMS: after the norm, dim 0 is 0.4-0.9
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        model.lm_head.weight[:, 0] = 0
        model.lm_head.weight[end] = 0
        model.lm_head.weight[end, 0] = 24.0  # a logit of 10-22, where the top ids' are (logit_std 6, 1024 ids)
    model.save_pretrained(str(path))
    return path


def compose_demo(config_name, run_dir, max_steps, save_every, extra=()):
    """A shortened demo recipe (`config`, `demo_moe`, `demo_eagle1`) writing into run_dir."""
    from eagle_trainer.app.train import RECIPES, to_config
    overrides = [f"train.run_dir={run_dir}", "demo.num_prompts=96", "demo.num_eval_prompts=16",
                 f"train.max_steps={max_steps}", f"train.save_every={save_every}", "train.progress=false",
                 "accept.num_prompts=4", "accept.max_new_tokens=32", *extra]
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose(config_name, overrides=overrides))


def built_once(tmp_path_factory, name, build):
    """build(directory) for a session fixture, run once for the whole test run. Under pytest-xdist each worker is its
    own session and would train the same demo draft again: the first worker to ask builds it under a file lock in
    the directory all workers share, and the others wait and read its pickled result. Tests only read these
    directories (the tokenisation cache they may add to is written by rename)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory, result = root / name, root / f"{name}.pkl"
    with FileLock(str(root / f"{name}.lock")):
        if result.is_file():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(directory, ignore_errors=True)  # a build that failed in another worker
        directory.mkdir()
        value = build(directory)
        result.write_bytes(pickle.dumps(value))
        return value


def run_demo(config_name, max_steps, save_every, extra=()):
    """A builder for built_once: the demo recipe `config_name`, shortened, trained in the directory given."""
    def build(run_dir):
        from eagle_trainer.app.train import run
        return run_dir, run(compose_demo(config_name, run_dir, max_steps, save_every, extra))
    return build


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo job, shortened: (run_dir, Summary) of a draft trained on a tiny dense Qwen3 target."""
    return built_once(tmp_path_factory, "demo", run_demo("config", max_steps=60, save_every=30))


@pytest.fixture(scope="session")
def demo_moe_run(tmp_path_factory):
    """The demo_moe job (its recipe picks the qwen3_moe demo target), shortened: a draft trained on a tiny
    Qwen3-MoE target."""
    return built_once(tmp_path_factory, "demo_moe", run_demo("demo_moe", max_steps=40, save_every=40))


def on_demo_assets(demo_dir):
    """Overrides that train on an earlier demo run's target and data instead of building new ones."""
    return ["demo.enabled=false", f"target.path={demo_dir / 'target'}", f"data.path={demo_dir / 'data/train.jsonl'}",
            f"data.eval_path={demo_dir / 'data/eval.jsonl'}", f"data.cache_dir={demo_dir / 'cache'}"]


@pytest.fixture(scope="session")
def demo_eagle1_run(demo_run, tmp_path_factory):
    """The demo_eagle1 recipe (an EAGLE-1 draft), shortened, on the dense demo's target and data:
    (demo_dir, run_dir, Summary)."""
    demo_dir, _ = demo_run
    build = run_demo("demo_eagle1", 60, 60, on_demo_assets(demo_dir))
    return (demo_dir, *built_once(tmp_path_factory, "demo_eagle1", build))


@pytest.fixture(scope="session")
def demo_next_run(tmp_path_factory):
    """The demo (EAGLE-3) on a tiny Qwen3-Next target with its data regenerated by that target, shortened."""
    return built_once(tmp_path_factory, "demo_next", run_demo("config", 60, 60, ["demo.architecture=qwen3_next"]))

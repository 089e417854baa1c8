"""Shared fixtures: tiny HF checkpoints written to disk once per session and loaded back like real ones."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it is chosen when a kernel is defined (at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_config, tiny_qwen3_moe_config


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

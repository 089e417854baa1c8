"""The draft interface every registered kind implements (drafts/llama.py): its entry's reference unroll equals
drafting each prefix with its entry's serving cache, and its checkpoint round trip gives the same draft."""

import pytest
import torch

import aux_chain  # noqa: F401 (registers a kind from outside the package, so it is checked too)
from drafting import check_against_kv_cache
from eagle_trainer import registry
from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts.io import load_draft, save_draft
from eagle_trainer.types import TargetInfo

INFO = TargetInfo(architecture="Qwen3ForCausalLM", hidden_size=32, vocab_size=50, num_layers=8, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=10000.0,
                  rope_scaling=None, max_position_embeddings=256)
AUX = (1, 3, 4)


def tiny(spec: registry.AlgorithmSpec, dtype=torch.float64, seed: int = 0):
    """A random draft of the kind, with target weights and a vocab map, and features of the shape it reads."""
    torch.manual_seed(seed)
    draft = spec.build_draft(INFO, DraftConfig(algorithm=spec.name, draft_vocab_size=20), AUX).to(dtype)
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.3)
    v, h = INFO.vocab_size, INFO.hidden_size
    head = torch.randn(v, h, dtype=dtype) if spec.needs_target_head else None
    draft.set_target_weights(torch.randn(v, h, dtype=dtype), head)
    ids = torch.randperm(v)[:20].sort().values
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_map(ids - torch.arange(20), t2d)
    width = len(AUX) * h if spec.feature == "aux_hidden" else h
    return draft, width


@pytest.mark.parametrize("name", registry.known_algorithms())
def test_every_kind_unrolls_as_its_cache_drafts(name):
    spec = registry.algorithm_spec(name)
    draft, width = tiny(spec)
    ids = torch.randint(0, INFO.vocab_size, (2, 7))
    features = torch.randn(2, 7, width, dtype=torch.float64)
    unrolled = spec.unroll(draft, ids, features, 3)
    assert check_against_kv_cache(draft, ids, features, unrolled) == 7 * 3


@pytest.mark.parametrize("name", registry.known_algorithms())
def test_every_kind_round_trips_its_checkpoint(name, tmp_path):
    spec = registry.algorithm_spec(name)
    draft, _ = tiny(spec, torch.float32)  # checkpoints hold the fp32 master weights
    save_draft(tmp_path, draft)
    back = load_draft(tmp_path)
    assert type(back) is spec.draft_class and back.config == draft.config
    assert registry.algorithm_of(back.config) is spec
    for key, value in draft.trainable_state_dict().items():
        assert torch.equal(back.trainable_state_dict()[key], value), key

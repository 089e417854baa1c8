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


def drive(cache, draft, width: int, device="cpu"):
    """A decode-like sequence on `cache`, reset first: a prefill of 6, a tree step of 4 nodes under an ancestor
    mask, truncation back, an accepted run of 2, a reset and a second prefill -> every step's output."""
    torch.manual_seed(1)
    cache.reset()
    dtype = next(p for p in draft.parameters() if p.requires_grad).dtype
    features = torch.randn(1, 6, width, dtype=dtype, device=device)
    tok = lambda n: torch.randint(0, INFO.vocab_size, (1, n), device=device)
    pos = lambda start, n: torch.arange(start, start + n, device=device)[None]
    outs = [cache.extend(tok(6), draft.project(features), pos(0, 6))]
    fed = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool, device=device)
    allowed = torch.cat([torch.ones(4, 6, dtype=torch.bool, device=device), fed], 1)
    outs.append(cache.extend(tok(4), outs[-1][:, -4:], torch.tensor([[6, 7, 7, 6]], device=device), allowed))
    cache.truncate(6)
    assert len(cache) == 6
    outs.append(cache.extend(tok(2), outs[-1][:, :2], pos(6, 2)))
    cache.reset()
    outs.append(cache.extend(tok(3), draft.project(features[:, :3]), pos(0, 3)))
    return outs


@pytest.mark.parametrize("name", registry.known_algorithms())
def test_every_kind_drafts_the_same_from_a_preallocated_cache(name):
    """KVCache(capacity=...) writes keys at their index and masks the unused tail: the outputs of a prefill, a tree
    step, truncation, an accepted run and a reset equal the growing cache's (fp64)."""
    spec = registry.algorithm_spec(name)
    draft, width = tiny(spec)
    grown = drive(spec.cache_class(draft), draft, width)
    static = drive(spec.cache_class(draft, capacity=13), draft, width)
    for a, b in zip(grown, static):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_a_preallocated_cache_names_its_capacity_when_it_overflows():
    spec = registry.algorithm_spec("eagle3")
    draft, width = tiny(spec)
    with pytest.raises(ValueError, match=r"holds 9 positions; extending 6 by 4"):
        drive(spec.cache_class(draft, capacity=9), draft, width)


@pytest.mark.gpu
@pytest.mark.parametrize("name", registry.known_algorithms())
def test_graphed_steps_equal_eager_steps_on_the_gpu(name):
    """On a GPU a step shape seen twice is captured as a CUDA graph and replayed: the same decode run three times
    (the second captures, the third replays) gives the eager outputs bit for bit, in fp32 and bf16."""
    spec = registry.algorithm_spec(name)
    for dtype in (torch.float32, torch.bfloat16):
        draft, width = tiny(spec, torch.float32)
        draft = draft.to("cuda", dtype).eval()
        with torch.no_grad():
            eager = drive(spec.cache_class(draft, capacity=13, graphs=False), draft, width, "cuda")
            cache = spec.cache_class(draft, capacity=13)
            runs = [drive(cache, draft, width, "cuda") for _ in range(3)]
        assert cache.num_graphs == 4, "each of the four step shapes, seen twice, is captured"
        for outs in runs:
            for a, b in zip(eager, outs):
                assert torch.equal(a, b), (dtype, (a - b).abs().max())

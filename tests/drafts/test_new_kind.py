"""A draft kind registered from outside the package (tests/drafts/aux_chain.py, the walk-through of
docs/new_draft.md): its unroll equals serving-style drafting, and the trainer, checkpoints and the evaluator take it
through the registry alone."""

import json

import pytest
import torch

from aux_chain import AuxChainConfig, AuxChainDraft, register
from drafting import check_against_kv_cache
from eagle_trainer import registry
from eagle_trainer.config import AcceptConfig, Config, DataConfig, DraftConfig, OptimConfig, TargetConfig, TrainConfig
from eagle_trainer.drafts.io import load_draft
from eagle_trainer.drafts.unroll import unroll

V, VD, HT = 50, 20, 24


def tiny_draft(num_layers=2) -> AuxChainDraft:
    cfg = AuxChainConfig(hidden_size=32, target_hidden_size=HT, num_heads=4, num_kv_heads=2, head_dim=8,
                         intermediate_size=48, vocab_size=V, draft_vocab_size=VD, rms_norm_eps=1e-6,
                         rope_theta=10000.0, max_position_embeddings=256, aux_layer_ids=(1, 2, 3),
                         num_layers=num_layers)
    torch.manual_seed(0)
    draft = AuxChainDraft(cfg).double()
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return draft


@pytest.mark.parametrize("t,steps", [(9, 4), (1, 2)])
def test_unroll_matches_kv_cache_drafting_per_prefix(t, steps):
    """The generic unroll over the new kind's `step` equals drafting every prefix with llama.KVCache, in fp64."""
    draft = tiny_draft()
    b = 2
    ids = torch.randint(0, V, (b, t))
    aux = torch.randn(b, t, 3 * HT, dtype=torch.float64)
    unrolled = unroll(draft, ids, aux, steps)
    assert check_against_kv_cache(draft, ids, aux, unrolled) == t * steps


def test_new_kind_trains_checkpoints_and_decodes(tmp_path, tiny_qwen3_path):
    """draft.algorithm=aux_chain trains, measures real acceptance by speculative decoding and writes checkpoints
    that load back as the new kind, with no package edit; asking for an export it has none of fails at startup."""
    from test_registry import write_chat

    from eagle_trainer.app.train import run
    spec = register()
    assert registry.algorithm_spec("aux_chain") is spec and not spec.exporters
    data = write_chat(tmp_path / "chat.jsonl", n=40)
    cfg = Config(
        target=TargetConfig(path=str(tiny_qwen3_path)),
        draft=DraftConfig(algorithm="aux_chain", num_layers=2, draft_vocab_size=128, ttt_steps=3),
        data=DataConfig(path=str(data), max_length=128, eval_holdout=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, batch_size=4),
        train=TrainConfig(run_dir=str(tmp_path / "run"), max_steps=12, epochs=10, log_every=1, save_every=6,
                          eval_batches=2, progress=False, export_formats=[]),
        accept=AcceptConfig(num_prompts=2, max_new_tokens=8, modes=["chain", "tree"]),
    )
    summary = run(cfg)
    assert summary.steps == 12 and len(summary.train_acc) == 3
    assert summary.eval_after["loss"] < summary.eval_before["loss"]
    assert set(summary.accept_after) == {"chain", "tree"} and all(tau >= 1 for tau in summary.accept_after.values())
    draft = load_draft(summary.checkpoint)
    assert isinstance(draft, AuxChainDraft) and draft.config.num_layers == 2
    assert json.loads((tmp_path / "run/checkpoints" / "step_0000012" / "draft_config.json").read_text())[
        "algorithm"] == "aux_chain"
    bad = Config(**{**vars(cfg), "train": TrainConfig(**{**vars(cfg.train), "run_dir": str(tmp_path / "run2"),
                                                         "export_formats": ["sglang"]})})
    with pytest.raises(ValueError, match="sglang"):
        run(bad)

"""Checkpoints: complete or absent, retention, RNG, and draft + optimizer state across world sizes (gloo)."""

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eagle_trainer.checkpoint import (check_checkpoint, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                      rng_state, save_checkpoint, set_rng_state)
from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft


def tiny_setup(seed: int):
    torch.manual_seed(seed)
    cfg = Eagle3Config(hidden_size=16, target_hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                       intermediate_size=24, vocab_size=40, draft_vocab_size=12, rms_norm_eps=1e-6, rope_theta=1e4,
                       max_position_embeddings=64, aux_layer_ids=(1, 2, 3))
    draft = Eagle3Draft(cfg)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return draft, optimizer, scheduler


def train_steps(draft, optimizer, scheduler, n: int):
    for _ in range(n):
        loss = sum((p.float() ** 2).sum() for p in draft.parameters() if p.requires_grad)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def assert_same_state(a, b):
    (da, oa, sa), (db, ob, sb) = a, b
    for (name, x), (_, y) in zip(da.state_dict().items(), db.state_dict().items()):
        if not name.startswith("embed_tokens."):
            assert torch.equal(x, y), name
    for pa, pb in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa.state[pa][key], ob.state[pb][key]), key
    assert sa.state_dict() == sb.state_dict()


def test_save_load_restores_everything_and_training_continues_identically(tmp_path):
    ref = tiny_setup(0)
    train_steps(*ref, 3)
    path = save_checkpoint(tmp_path / "step_0000003", *ref, {"step": 3, "epoch": 0, "examples_in_epoch": 24})
    assert sorted(p.name for p in path.iterdir()) == ["draft.safetensors", "draft_config.json", "rng", "state",
                                                      "trainer_state.json"]
    assert not (tmp_path / "step_0000003.tmp").exists()
    restored = tiny_setup(1)  # other weights, fresh optimizer
    state = load_checkpoint(path, *restored)
    assert state["step"] == 3 and state["examples_in_epoch"] == 24
    assert_same_state(ref, restored)
    train_steps(*ref, 2)
    train_steps(*restored, 2)
    assert_same_state(ref, restored)
    # the frozen target embedding is neither saved nor restored
    assert not torch.equal(ref[0].embed_tokens.weight, restored[0].embed_tokens.weight)


def test_rng_states_round_trip():
    state = json.loads(json.dumps(rng_state()))
    expect = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expect[:2] == got[:2] and torch.equal(expect[2], got[2])


def test_latest_ignores_incomplete_and_prune_keeps_last_n(tmp_path):
    root = tmp_path / "checkpoints"
    setup = tiny_setup(0)
    for step in (10, 20, 30):
        save_checkpoint(root / f"step_{step:07d}", *setup, {"step": step})
    save_checkpoint(root / "best", *setup, {"step": 20})
    (root / "step_0000040.tmp").mkdir()  # a save killed half way
    (root / "step_0000050").mkdir()  # not a checkpoint (no trainer_state.json)
    assert latest_checkpoint(root).name == "step_0000030"
    with pytest.raises(ValueError, match="not a complete training checkpoint.*step_N.tmp"):
        check_checkpoint(root / "step_0000050")
    with pytest.raises(ValueError, match="does not exist.*train.resume=latest"):
        check_checkpoint(root / "step_0000099")
    deleted = prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_0000010", "step_0000040.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["best", "step_0000020", "step_0000030", "step_0000050"]
    assert prune_checkpoints(root, keep_last=0) == []


def _worker(rank: int, world: int, init_file: str, load_from: str, save_to: str, seed: int):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        setup = tiny_setup(seed + rank)  # each rank starts from different weights
        load_checkpoint(load_from, *setup)
        train_steps(*setup, 1)
        save_checkpoint(save_to, *setup, {"step": 4})
    finally:
        dist.destroy_process_group()


def test_world_size_changes_1_to_2_to_1(tmp_path):
    """A single-process checkpoint loads on 2 gloo ranks; their checkpoint loads back in one process."""
    ref = tiny_setup(0)
    train_steps(*ref, 3)
    one = save_checkpoint(tmp_path / "one", *ref, {"step": 3})
    two = tmp_path / "two"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(one), str(two), 7), nprocs=2,
                       start_method="spawn", join=True)
    assert sorted(p.name for p in (two / "rng").iterdir()) == ["rank_00000.json", "rank_00001.json"]
    assert json.loads((two / "trainer_state.json").read_text())["world_size"] == 2
    train_steps(*ref, 1)  # what both ranks did
    back = tiny_setup(3)
    load_checkpoint(two, *back)
    assert_same_state(ref, back)


def test_resume_into_another_draft_shape_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "step_0000001", *tiny_setup(0), {"step": 1})
    draft, optimizer, scheduler = tiny_setup(0)
    other = Eagle3Draft(Eagle3Config(**{**vars(draft.config), "intermediate_size": 32}))
    opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="intermediate_size: checkpoint 24, this run 32"):
        load_checkpoint(path, other, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))

"""Data-parallel training under torchrun's environment gives the losses of one process on the same global batch.

Rank r of W trains on the r-th part of every global batch of B*W examples (the target sharded with FSDP2 and
expert parallelism, the draft under DDP); one process trains on the whole global batch. The step losses are
normalised by all ranks' tokens and DDP sums the ranks' gradients, so both take the same updates: the logged
losses, per-step losses and accuracies agree to fp32 rounding at every step, and so do the eval metrics.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from eagle_trainer.metrics import read_metrics
from eagle_trainer.app.train import RECIPES, run, to_config
from ranks import run_ranks

STEPS = 4


def compose_cfg(demo_dir, run_dir, batch_size: int, parallel: list[str], accept: bool = False):
    overrides = {
        "demo.enabled": "false", "target.path": demo_dir / "target", "data.path": demo_dir / "data/train.jsonl",
        "data.eval_path": demo_dir / "data/eval.jsonl", "data.cache_dir": demo_dir / "cache",
        "train.run_dir": run_dir, "train.max_steps": STEPS, "train.save_every": 0, "train.log_every": 1,
        "train.eval_batches": 1, "train.progress": "false", "train.export_formats": "[]",
        "accept.enabled": str(accept).lower(), "accept.num_prompts": 5, "accept.max_new_tokens": 12,
        # measured on the demo's trained draft (warm start), whose drafts the target accepts
        **({"draft.init_from": demo_dir} if accept else {}),
        "optim.batch_size": batch_size, "optim.warmup_steps": 1,
    }
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose("config", overrides=[f"{k}={v}" for k, v in overrides.items()] + parallel))


def train_on_rank(rank: int, cfg) -> None:
    run(cfg)


def curves(run_dir) -> tuple[list, list]:
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"], *r["step_loss"], *r["acc"]) for r in records if r["split"] == "train"]
    evals = [(r["step"], r["loss"], *r["acc"]) for r in records if r["split"] == "eval"]
    return train, evals


def acceptance(run_dir) -> list:
    return [(r["step"], r["accept_len"], r["histogram"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if r["split"] == "accept"]


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 2)])
def test_data_parallel_training_matches_one_process(demo_moe_run, tmp_path, world, ep):
    demo_dir, _ = demo_moe_run
    per_rank = 2
    run_ranks(world, train_on_rank, compose_cfg(demo_dir, tmp_path / "ranks", per_rank,
                                                ["parallel=fsdp", f"parallel.ep={ep}"]))
    run(compose_cfg(demo_dir, tmp_path / "one", per_rank * world, []))
    (train, evals), (want_train, want_evals) = curves(tmp_path / "ranks"), curves(tmp_path / "one")
    assert [r[0] for r in train] == list(range(1, STEPS + 1)) and len(evals) == len(want_evals) == 2
    for got, want in zip(train + evals, want_train + want_evals, strict=True):
        assert got[0] == want[0]
        # fp32 on the CPU; what differs is the order of float sums (experts summed in slot order under expert
        # parallelism, the ranks' gradients summed by DDP) and the batch shapes the matmuls see
        assert got[1:] == pytest.approx(want[1:], rel=2e-5, abs=1e-6), (got, want)
    logs = sorted(p.name for p in (tmp_path / "ranks" / "logs").iterdir())
    assert logs == [f"rank_{r}.log" for r in range(world)]
    assert "holds" in (tmp_path / "ranks" / "logs" / f"rank_{world - 1}.log").read_text()


# Qwen3-Next: the tree mode alone (its verification with the gated delta net states; halves the test's time)
@pytest.mark.parametrize("demo, modes", [("demo_moe_run", ["chain", "tree"]), ("demo_next_run", ["tree"])])
def test_in_loop_acceptance_of_a_sharded_run_equals_one_process(request, tmp_path, demo, modes):
    """Two ranks (target sharded, ep 2) share the 5 held-out prompts (3 and 2: the rank done first idles in the
    target's collectives) and log the acceptance one process measures on the same prompts, at the start (the same
    draft) and at the end (drafts equal to fp32 rounding); Qwen3-MoE, and Qwen3-Next."""
    demo_dir, _ = request.getfixturevalue(demo)
    modes_option = f"accept.modes=[{','.join(modes)}]"
    run_ranks(2, train_on_rank, compose_cfg(demo_dir, tmp_path / "ranks", 2, ["parallel=fsdp_ep", modes_option],
                                            accept=True))
    run(compose_cfg(demo_dir, tmp_path / "one", 4, [modes_option], accept=True))
    got, want = acceptance(tmp_path / "ranks"), acceptance(tmp_path / "one")
    assert [r[0] for r in want] == [0, STEPS] and set(want[0][1]) == set(modes)
    assert want[0][1]["tree"] > 1.2, want  # drafts are accepted: the histograms have more than one bar
    assert got == want

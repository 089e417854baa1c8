"""Two torchrun "nodes" on this host (`--nnodes 2 --node-rank 0|1`, one process each, gloo, static rendezvous at
127.0.0.1) train the demo's draft as the README's two-node launch does: 6 steps with checkpoints, whose losses are one
process's on the same global batch, and a resume of both nodes from step 4's checkpoint gives steps 5 and 6 again
exactly. A node whose run_dir is not the one rank 0 writes is refused with a message naming the option.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from eagle_trainer.metrics import read_metrics
from eagle_trainer.app.train import RECIPES, run, to_config
from hydra import compose, initialize_config_dir

PER_RANK = 2


def overrides(demo_dir, run_dir, **extra) -> list[str]:
    base = {
        "demo.enabled": "false", "target.path": demo_dir / "target", "data.path": demo_dir / "data/train.jsonl",
        "data.eval_path": demo_dir / "data/eval.jsonl", "data.cache_dir": demo_dir / "cache",
        "train.run_dir": run_dir, "train.max_steps": 6, "train.save_every": 2, "train.log_every": 1,
        "train.eval_batches": 0, "train.progress": "false", "accept.enabled": "false", "train.export_formats": "[]",
        "optim.batch_size": PER_RANK, "optim.warmup_steps": 1, "train.device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(node_overrides: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --node-rank N --nproc-per-node 1 ... -m eagle_trainer.train <overrides of node N>`,
    both nodes at once; their results once both have exited."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "eagle_trainer.train", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node, args in enumerate(node_overrides)]
    out = [p.communicate(timeout=600)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, text) for p, text in zip(procs, out)]


def train_losses(run_dir) -> dict[int, list[float]]:
    return {r["step"]: [r["loss"], *r["step_loss"]] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["split"] == "train"}


def test_two_nodes_train_checkpoint_and_resume(demo_run, tmp_path):
    demo_dir, _ = demo_run
    run_dir = tmp_path / "shared"  # one directory both "nodes" see, as a shared filesystem gives them
    first = launch_two_nodes([overrides(demo_dir, run_dir)] * 2)
    assert all(r.returncode == 0 for r in first), first[0].stdout[-3000:] + first[1].stdout[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002", "step_0000004",
                                                                           "step_0000006"]
    assert sorted(p.name for p in (run_dir / "checkpoints/step_0000004/rng").iterdir()) == \
        ["rank_00000.json", "rank_00001.json"]  # each node's rank its own RNG; rank 0 the rest
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank_0.log", "rank_1.log"]

    # resumed from step 4 on both nodes, into a new run dir: steps 5 and 6 again, exactly
    resumed_dir = tmp_path / "resumed"
    second = launch_two_nodes([overrides(demo_dir, resumed_dir,
                                         **{"train.resume": run_dir / "checkpoints/step_0000004"})] * 2)
    assert all(r.returncode == 0 for r in second), second[0].stdout[-3000:] + second[1].stdout[-3000:]
    got, resumed = train_losses(run_dir), train_losses(resumed_dir)
    assert sorted(resumed) == [5, 6] and all(resumed[s] == got[s] for s in resumed), (resumed, got)

    # and the two nodes train as one process does on the same global batch
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        one = to_config(compose("config", overrides=overrides(
            demo_dir, tmp_path / "one", **{"optim.batch_size": 2 * PER_RANK})))
    run(one)
    want = train_losses(tmp_path / "one")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:  # fp32; the ranks' gradients summed by DDP in another order than one process sums them
        assert got[step] == pytest.approx(want[step], rel=2e-5, abs=1e-6), (step, got[step], want[step])


def test_a_run_dir_that_only_one_node_sees_is_refused(demo_run, tmp_path):
    demo_dir, _ = demo_run
    results = launch_two_nodes([overrides(demo_dir, tmp_path / "node0"), overrides(demo_dir, tmp_path / "node1")])
    for r in results:
        assert r.returncode != 0
    assert "train.run_dir=" in results[0].stdout and "rank 1 on" in results[0].stdout
    assert "is not shared" in results[0].stdout and "filesystem every node mounts" in results[0].stdout
    assert not (tmp_path / "node0" / "checkpoints").exists()

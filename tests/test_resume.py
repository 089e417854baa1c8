"""Exact resume, a save killed half way, retention, and non-finite losses, on the demo's tiny target and data.

Each run trains a few steps of the demo recipe (EAGLE-3 on the tiny dense Qwen3 of the `demo_run` fixture)
in a fresh run directory, reusing the demo's target, data and tokenisation cache.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from batches import assert_same_curve

from eagle_trainer.metrics import read_metrics
from eagle_trainer.app.train import RECIPES, run, to_config
from eagle_trainer.trainer import NonFiniteLossError, Trainer


def overrides(demo_dir, run_dir, **extra):
    base = {
        "demo.enabled": "false", "target.path": demo_dir / "target", "data.path": demo_dir / "data/train.jsonl",
        "data.eval_path": demo_dir / "data/eval.jsonl", "data.cache_dir": demo_dir / "cache",
        "train.run_dir": run_dir, "train.max_steps": 8, "train.save_every": 3, "train.log_every": 1,
        "train.eval_batches": 1, "train.progress": "false", "accept.enabled": "false", "train.export_formats": "[]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def compose_cfg(demo_dir, run_dir, **extra):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose("config", overrides=overrides(demo_dir, run_dir, **extra)))


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"}


def final_weights(run_dir):
    return load_file(str(run_dir / "checkpoints/step_0000008/draft.safetensors"))


@pytest.fixture(scope="module")
def straight_run(demo_run, tmp_path_factory):
    """8 uninterrupted steps, checkpoints at 3 and 6."""
    demo_dir, _ = demo_run
    run_dir = tmp_path_factory.mktemp("straight")
    run(compose_cfg(demo_dir, run_dir))
    return run_dir


class Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(demo_run, straight_run, tmp_path, monkeypatch):
    demo_dir, _ = demo_run
    save = Trainer.save_checkpoint

    def save_then_stop(self, name=None):
        path = save(self, name)
        if self.step == 6:
            raise Interrupt  # the job dies right after the step-6 checkpoint
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupt):
        run(compose_cfg(demo_dir, tmp_path))
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    summary = run(compose_cfg(demo_dir, tmp_path, **{"train.resume": "latest"}))
    assert summary.steps == 8
    expect, got = train_losses(straight_run), train_losses(tmp_path)
    assert sorted(got) == list(range(1, 9))  # steps 1-6 kept from before the interrupt, 7-8 after it
    assert_same_curve(got, expect)
    if not torch.cuda.is_available():
        for name, tensor in final_weights(straight_run).items():
            assert torch.equal(final_weights(tmp_path)[name], tensor), name
    # the resumed run reports the start-of-run eval of the run it continues
    assert summary.eval_before["loss"] == read_metrics(straight_run / "metrics.jsonl")[0]["loss"]


def test_retention_keeps_the_last_n(straight_run, demo_run, tmp_path):
    assert sorted(p.name for p in (straight_run / "checkpoints").iterdir()) == [
        "step_0000003", "step_0000006", "step_0000008"]
    demo_dir, _ = demo_run
    run(compose_cfg(demo_dir, tmp_path, **{"train.keep_last": 1, "train.max_steps": 4, "train.save_every": 1}))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004"]


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed.checkpoint as dcp
    from hydra import compose, initialize_config_dir
    from eagle_trainer.app.train import RECIPES, run, to_config

    real_save = dcp.save
    def save_and_die(state, checkpoint_id, **kw):
        real_save(state, checkpoint_id=checkpoint_id, **kw)
        if "step_0000006" in str(checkpoint_id):
            os.kill(os.getpid(), signal.SIGKILL)  # after the weights are written, before the rename
        return None
    dcp.save = save_and_die
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        run(to_config(compose("config", overrides=sys.argv[1:])))
""")


def test_process_killed_during_a_save_leaves_the_previous_checkpoint(demo_run, straight_run, tmp_path):
    demo_dir, _ = demo_run
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same reduction order as this process
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *overrides(demo_dir, tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000006.tmp"]
    summary = run(compose_cfg(demo_dir, tmp_path, **{"train.resume": "latest"}))  # picks step 3, not the .tmp
    assert summary.steps == 8
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000006", "step_0000008"]
    assert_same_curve(train_losses(tmp_path), train_losses(straight_run))


def test_resume_from_an_explicit_path_and_bad_paths(demo_run, straight_run, tmp_path):
    demo_dir, _ = demo_run
    with pytest.raises(ValueError, match="does not exist"):
        run(compose_cfg(demo_dir, tmp_path, **{"train.resume": tmp_path / "nope"}))
    summary = run(compose_cfg(demo_dir, tmp_path, **{"train.resume": straight_run / "checkpoints/step_0000006"}))
    assert summary.steps == 8
    assert_same_curve(train_losses(tmp_path), {s: train_losses(straight_run)[s] for s in (7, 8)})
    with pytest.raises(ValueError, match="different draft.*intermediate_size"):
        run(compose_cfg(demo_dir, tmp_path / "other", **{"draft.intermediate_size": 96,
                                                         "train.resume": straight_run / "checkpoints/step_0000006"}))


def poisoned_loss(calls, poison):
    """Trainer._loss with `poison(trainer, loss)` applied on the given (1-based) training calls."""
    real = Trainer._loss
    count = {"n": 0}

    def loss(self, batch, train=False):
        out = real(self, batch, train=train)
        if self.draft.training:
            count["n"] += 1
            if count["n"] in calls:
                out.loss = poison(self, out.loss)
        return out
    return loss


def nan_on(calls):
    """Trainer._loss that returns a NaN loss on the given (1-based) training calls."""
    return poisoned_loss(calls, lambda trainer, loss: loss * float("nan"))


def assert_no_update_at(run_dir, step):
    """Checkpoints step - 1, step, step + 1: `step` changed no weight, the next one did, all finite."""
    weights = {s: load_file(str(run_dir / f"checkpoints/step_{s:07d}/draft.safetensors")) for s in (step - 1, step,
                                                                                                    step + 1)}
    for name, tensor in weights[step - 1].items():
        assert torch.equal(weights[step][name], tensor), name
    assert any(not torch.equal(weights[step + 1][n], t) for n, t in weights[step - 1].items())
    assert all(torch.isfinite(t).all() for t in weights[step + 1].values() if t.is_floating_point())


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_nan_loss_or_gradient_skips_the_update_and_training_goes_on(demo_run, tmp_path, monkeypatch, what):
    # a NaN gradient under a finite loss is skipped on the device by the fused AdamW (`guarded_step`)
    demo_dir, _ = demo_run
    monkeypatch.setattr(Trainer, "_loss", (nan_on if what == "loss" else nan_grads_on)({4}))
    summary = run(compose_cfg(demo_dir, tmp_path, **{"train.max_steps": 5, "train.save_every": 1}))
    assert summary.steps == 5 and summary.skipped_steps == 1
    skips = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "skip"]
    assert [r["step"] for r in skips] == [4] and math.isnan(skips[0]["grad_norm"])
    assert_no_update_at(tmp_path, 4)
    nan_steps = {s for s, v in train_losses(tmp_path).items() if math.isnan(v)}
    assert nan_steps == ({4} if what == "loss" else set())  # NaN only where injected


def test_nan_losses_in_a_row_stop_with_a_clear_message(demo_run, tmp_path, monkeypatch):
    demo_dir, _ = demo_run
    monkeypatch.setattr(Trainer, "_loss", nan_on(set(range(5, 100))))
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 7: 3 steps in a row .*max_nonfinite_steps=3.*"
                                                 r"step_0000006.*train.resume=latest"):
        run(compose_cfg(demo_dir, tmp_path, **{"train.max_nonfinite_steps": 3}))
    assert json.loads((tmp_path / "checkpoints/step_0000003/trainer_state.json").read_text())["step"] == 3



class _NaNGradient(torch.autograd.Function):
    """0 in forward; a NaN gradient for its input in backward."""

    @staticmethod
    def forward(ctx, weight):
        ctx.shape = weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return grad.new_full(ctx.shape, float("nan"))


def nan_grads_on(calls):
    """Trainer._loss whose backward leaves a NaN gradient on one draft weight on the given (1-based) training calls,
    the loss itself finite: the fused AdamW skips the update on the device (`guarded_step`), the host reads it
    later."""
    def poison(trainer, loss):
        return loss + _NaNGradient.apply(next(p for p in trainer.draft.parameters() if p.requires_grad))
    return poisoned_loss(calls, poison)


def test_nan_gradients_in_a_row_stop_one_batch_later_naming_their_step(demo_run, tmp_path, monkeypatch):
    # logs and saves are sparse here, so each skipped update is read one batch after it was queued
    demo_dir, _ = demo_run
    monkeypatch.setattr(Trainer, "_loss", nan_grads_on(set(range(5, 100))))
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 7: 3 steps in a row .*max_nonfinite_steps=3.*"
                                                 r"step_0000006.*train.resume=latest"):
        run(compose_cfg(demo_dir, tmp_path, **{"train.max_nonfinite_steps": 3, "train.log_every": 100}))
    state = json.loads((tmp_path / "checkpoints/step_0000006/trainer_state.json").read_text())
    assert state["step"] == 6 and state["skipped_steps"] == 2  # read before the save: steps 5 and 6

"""Bad inputs to `eagle-train` and to resume: each is refused with one line naming the value and the fix; nothing
of an earlier run is lost, no untrained draft is passed off as trained, no pickle planted in a checkpoint runs.

Runs train a tiny Qwen3 (the `tiny_qwen3_path` fixture) for a step or two on a few synthetic conversations."""

import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eagle_trainer import checkpoint
from eagle_trainer.app import runtime, train
from eagle_trainer.app.validation import check_demo_paths, check_run_dir
from eagle_trainer.config import (AcceptConfig, Config, DataConfig, DemoConfig, DraftConfig, OptimConfig, TargetConfig,
                                  TrainConfig)
from eagle_trainer.metrics import read_metrics
from eagle_trainer.trainer import Trainer
from test_registry import write_chat


def tiny_config(target, data, run_dir, **train_kw) -> Config:
    """Two steps of batch 4 on `data` (24 conversations), a checkpoint after each, no eval, no export."""
    kw = dict(run_dir=str(run_dir), max_steps=2, epochs=10, log_every=1, save_every=1, eval_batches=0, progress=False,
              export_formats=[], device="cpu")
    return Config(target=TargetConfig(path=str(target)), draft=DraftConfig(draft_vocab_size=128, ttt_steps=2),
                  data=DataConfig(path=str(data), max_length=128), optim=OptimConfig(warmup_steps=0, batch_size=4),
                  train=TrainConfig(**{**kw, **train_kw}), accept=AcceptConfig(enabled=False))


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat(tmp_path_factory.mktemp("chat") / "chat.jsonl")


@pytest.fixture(scope="module")
def trained(tiny_qwen3_path, chat, tmp_path_factory):
    """A finished two-step run: checkpoints/step_0000001 and step_0000002."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train.run(tiny_config(tiny_qwen3_path, chat, run_dir))
    return run_dir


def copy_run(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def resume_cfg(tiny_qwen3_path, chat, run_dir):
    return tiny_config(tiny_qwen3_path, chat, run_dir, max_steps=3, resume="latest")


# 1. a batch larger than the data set: refused before the target's weights are read; 0 steps never pass

def test_batch_larger_than_the_data_is_refused_before_the_target_loads(tiny_qwen3_path, tmp_path, monkeypatch):
    data = write_chat(tmp_path / "five.jsonl", n=5)
    cfg = tiny_config(tiny_qwen3_path, data, tmp_path / "run", export_formats=["sglang"])
    cfg = replace(cfg, optim=replace(cfg.optim, batch_size=8))

    def no_load(*args, **kwargs):
        raise AssertionError("the target's weights were read")

    monkeypatch.setattr(train, "open_target", no_load)
    with pytest.raises(ValueError, match=r"optim.batch_size=8 x 1 ranks x optim.grad_accum=1 needs 8 training "
                                         r"examples per step, but the data has 5; set optim.batch_size to at most 5"):
        train.run(cfg)
    assert not (tmp_path / "run/checkpoints").exists() and not (tmp_path / "run/export").exists()


def test_a_run_that_takes_no_step_fails_and_writes_no_draft(tiny_qwen3_path, tmp_path, monkeypatch):
    # the startup count check bypassed: the trainer itself refuses to pass 0 steps off as a trained draft
    data = write_chat(tmp_path / "five.jsonl", n=5)
    cfg = tiny_config(tiny_qwen3_path, data, tmp_path / "run", export_formats=["sglang"])
    cfg = replace(cfg, optim=replace(cfg.optim, batch_size=8))
    monkeypatch.setattr(train, "check_batches", lambda *args: None, raising=False)
    with pytest.raises(ValueError, match=r"no training step was taken: .*optim.batch_size=8 x 1 ranks"):
        train.run(cfg)
    assert not (tmp_path / "run/checkpoints").exists() and not (tmp_path / "run/export").exists()


# 2. a new run into the run dir of an earlier one: refused, or (train.overwrite) the earlier one moved aside

def test_a_new_run_into_an_earlier_run_is_refused_or_moves_it_aside(tiny_qwen3_path, chat, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoints, metrics.jsonl\); continue it with "
                                         r"train.resume=latest, start over with train.overwrite=true"):
        train.run(tiny_config(tiny_qwen3_path, chat, run_dir))
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    with pytest.raises(ValueError, match="train.overwrite=true starts over, train.resume=latest continues"):
        train.run(tiny_config(tiny_qwen3_path, chat, run_dir, overwrite=True, resume="latest"))

    summary = train.run(tiny_config(tiny_qwen3_path, chat, run_dir, overwrite=True, max_steps=1))
    assert summary.steps == 1
    [aside] = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_bytes() == metrics  # the earlier run, whole and apart
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000001"]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"] == [1]


def test_the_demo_starts_its_own_run_dir_over(tmp_path):
    # `make demo` twice: the second run trains afresh (the first moved aside), reusing target, data and cache
    (tmp_path / "checkpoints").mkdir()
    cfg = Config(train=TrainConfig(run_dir=str(tmp_path)), demo=DemoConfig(enabled=True))
    assert check_run_dir(cfg) == [tmp_path / "checkpoints"]
    with pytest.raises(ValueError, match="holds an earlier run"):
        check_run_dir(replace(cfg, demo=DemoConfig(enabled=False)))


# 3. demo mode never replaces a target or data path the user set

def test_a_data_path_set_in_demo_mode_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eagle_trainer.app.train", "data.path=mine.jsonl",
                           "train.device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: data.path=mine.jsonl is set, but demo.enabled=true trains on the demo's own tiny target and synthetic "
        "data instead; train on yours with +experiment=<name> (eagle_trainer/recipes/experiment/) or add demo.enabled=false"]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing built (hydra makes the empty run dir)


def test_the_demo_accepts_its_own_paths(tmp_path):
    cfg = Config(target=TargetConfig(path=str(tmp_path / "target")), data=DataConfig(path="x.jsonl"),
                 train=TrainConfig(run_dir=str(tmp_path)), demo=DemoConfig(enabled=True))
    check_demo_paths(cfg, {"target.path", "train.run_dir"})  # the demo's own target; data.path not set by the user
    with pytest.raises(ValueError, match="target.path=/models/x is set, but demo.enabled=true"):
        check_demo_paths(replace(cfg, target=TargetConfig(path="/models/x")), {"target.path"})


# 4. a run dir that is a file

@pytest.mark.parametrize("below", ["", "sub"])
def test_a_run_dir_that_is_a_file_is_named(tiny_qwen3_path, chat, tmp_path, below):
    (tmp_path / "taken").write_text("not a directory")
    run_dir = tmp_path / "taken" / below
    with pytest.raises(ValueError, match=re.escape(f"train.run_dir='{run_dir}': {tmp_path / 'taken'} is a file, "
                                                   "not a directory")):
        train.run(tiny_config(tiny_qwen3_path, chat, run_dir))


# 5. a pickle planted in a checkpoint is refused, not run

class Payload:
    """Unpickled, it makes the directory `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_payload_planted_as_dcp_metadata_is_refused(tiny_qwen3_path, chat, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    (run_dir / "checkpoints/step_0000002/state/.metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"step_0000002: state/.metadata asks for posix.mkdir, which a DCP index "
                                         r"never holds; refused, as loading it could run code"):
        train.run(resume_cfg(tiny_qwen3_path, chat, run_dir))
    assert not marker.exists()


def test_a_payload_planted_as_an_optimizer_value_is_refused(tiny_qwen3_path, chat, tmp_path, monkeypatch):
    # DCP stores the optimizer's non-tensor values (lr, betas, ...) as pickles in its data files
    marker = tmp_path / "ran"
    real = checkpoint.get_state_dict

    def planted(draft, optimizer, options):
        model_sd, optim_sd = real(draft, optimizer, options=options)
        optim_sd["param_groups"][0]["lr"] = Payload(marker)
        return model_sd, optim_sd

    monkeypatch.setattr(checkpoint, "get_state_dict", planted)
    train.run(tiny_config(tiny_qwen3_path, chat, tmp_path / "run", max_steps=1))
    monkeypatch.setattr(checkpoint, "get_state_dict", real)
    with pytest.raises(ValueError, match=r"the optimizer.param_groups.0.lr value in state/ asks for posix.mkdir, "
                                         r"which optimizer values never hold; refused"):
        train.run(resume_cfg(tiny_qwen3_path, chat, tmp_path / "run"))
    assert not marker.exists()


# 6. a damaged latest checkpoint names the previous complete one

def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated data", "no data", "no metadata", "truncated metadata",
                                    "truncated trainer state"])
def test_a_damaged_latest_checkpoint_names_the_previous_one(tiny_qwen3_path, chat, trained, tmp_path, damage):
    run_dir = copy_run(trained, tmp_path)
    latest = run_dir / "checkpoints/step_0000002"
    [data] = (latest / "state").glob("*.distcp")
    {"truncated data": lambda: truncate(data), "no data": data.unlink,
     "no metadata": (latest / "state/.metadata").unlink, "truncated metadata": lambda: truncate(latest / "state/.metadata"),
     "truncated trainer state": lambda: truncate(latest / "trainer_state.json")}[damage]()
    previous = run_dir / "checkpoints/step_0000001"
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(latest))} cannot be read \(.*\); resume from the "
                                         rf"previous complete one with train.resume={re.escape(str(previous))}$"):
        train.run(resume_cfg(tiny_qwen3_path, chat, run_dir))


def test_the_checkpoint_loader_restores_what_was_saved(trained):
    # the restricted reader and planner read a real checkpoint as DCP's own do
    state_dir = trained / "checkpoints/step_0000002/state"
    metadata = checkpoint._CheckedReader(state_dir).read_metadata()
    reference = torch.distributed.checkpoint.FileSystemReader(state_dir).read_metadata()
    assert metadata.state_dict_metadata == reference.state_dict_metadata


# 7. Ctrl-C: where the last checkpoint is and how to resume; status 130, no traceback

def test_ctrl_c_names_the_last_checkpoint_and_exits_130(tiny_qwen3_path, chat, tmp_path, monkeypatch, capsys):
    real = Trainer._loss

    def interrupted(self, batch, train=False):
        if train and self.step == 2:
            raise KeyboardInterrupt
        return real(self, batch, train=train)

    monkeypatch.setattr(Trainer, "_loss", interrupted)
    with pytest.raises(SystemExit) as exit_:
        with runtime.reported_errors():  # as in eagle-train's main
            train.run(tiny_config(tiny_qwen3_path, chat, tmp_path / "run", max_steps=4))
    assert exit_.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at step 2: the last checkpoint is {tmp_path / 'run/checkpoints/step_0000002'}; continue from it "
        f"with train.resume=latest (train.run_dir={tmp_path / 'run'})")


# 8. user errors end with one line and status 2; bugs keep their traceback

def test_a_user_error_is_one_line_with_status_2(tmp_path):
    argv = [sys.executable, "-m", "eagle_trainer.app.export", "--checkpoint", str(tmp_path / "nonexistent"),
            "--format", "sglang", "--out", str(tmp_path / "x")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: --checkpoint='{tmp_path / 'nonexistent'}' does not exist")
    debug = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "EAGLE_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_bugs_keep_their_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        with runtime.reported_errors():
            raise RuntimeError("a bug")

"""The demo job end to end (a shortened `make demo`): assets, training that learns, files written."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from eagle_trainer.drafts.io import load_draft
from eagle_trainer.export import read_sglang
from eagle_trainer.metrics import read_metrics
from eagle_trainer.train import RECIPES, run, to_config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    overrides = [f"train.run_dir={run_dir}", "demo.num_prompts=96", "demo.num_eval_prompts=16",
                 "train.max_steps=60", "train.save_every=30", "train.progress=false"]
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        cfg = to_config(compose("config", overrides=overrides))
    return run_dir, run(cfg)


def test_demo_learns(demo_run):
    _, summary = demo_run
    before, after = summary.eval_before, summary.eval_after
    assert before["acc"][0] < 0.1
    assert after["acc"][0] > before["acc"][0] + 0.3, (before, after)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["sim_accept_len"] > before["sim_accept_len"] + 0.5


def test_demo_writes_run_files(demo_run):
    run_dir, summary = demo_run
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train][-1] == 60 and len(train[-1]["acc"]) == 7
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"loss.png", "accuracy.png", "acceptance.png"}
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step_0000030", "step_0000060"]
    last = run_dir / "checkpoints/step_0000060"
    assert json.loads((last / "trainer_state.json").read_text()) == {"step": 60}
    state = torch.load(last / "optimizer.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 60 and state["optimizer"]["state"]
    evals = [r["step"] for r in records if r["split"] == "eval"]
    assert evals == [0, 30, 60]
    assert {p.name for p in (run_dir / "export/sglang").iterdir()} == {"config.json", "model.safetensors"}
    cfg = json.loads((run_dir / "export/sglang/config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]


def test_exported_draft_equals_checkpoint(demo_run):
    run_dir, summary = demo_run
    ckpt = load_draft(summary.checkpoint)
    exported = read_sglang(run_dir / "export/sglang")
    for name, tensor in ckpt.trainable_state_dict().items():
        ref = tensor.to(torch.bfloat16).to(tensor.dtype) if tensor.is_floating_point() else tensor
        torch.testing.assert_close(exported.trainable_state_dict()[name].to(ref.dtype), ref, rtol=0, atol=0)


def test_second_run_reuses_assets(demo_run):
    run_dir, _ = demo_run
    overrides = [f"train.run_dir={run_dir}", "train.max_steps=2", "train.progress=false", "train.eval_batches=0",
                 "demo.num_prompts=96", "demo.num_eval_prompts=16"]
    mtime = (run_dir / "data/train.jsonl").stat().st_mtime_ns
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        run(to_config(compose("config", overrides=overrides)))
    assert (run_dir / "data/train.jsonl").stat().st_mtime_ns == mtime

"""The demo jobs end to end (a shortened `make demo`, dense and MoE): assets, training that learns, files written."""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig

from eagle_trainer.config import DemoConfig
from eagle_trainer.app.demo import tiny_target_config
from eagle_trainer.drafts.io import load_draft
from eagle_trainer.export import read_sglang
from eagle_trainer.metrics import read_metrics
from eagle_trainer.app.train import RECIPES, run, to_config


def test_demo_learns(demo_run):
    _, summary = demo_run
    before, after = summary.eval_before, summary.eval_after
    assert before["acc"][0] < 0.1
    assert after["acc"][0] > before["acc"][0] + 0.3, (before, after)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["sim_accept_len"] > before["sim_accept_len"] + 0.5
    # real speculative decoding on held-out prompts: the trained draft gets tokens accepted, the random one not
    assert set(summary.accept_after) == {"chain", "tree"}
    assert summary.accept_before["chain"] < 1.2
    assert summary.accept_after["chain"] > 1.5 and summary.accept_after["tree"] >= summary.accept_after["chain"]


def test_demo_writes_run_files(demo_run):
    run_dir, summary = demo_run
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train][-1] == 60 and len(train[-1]["acc"]) == 7
    # throughput in FLOPs (flops.py): logged every window and over the run; no MFU without a known GPU peak
    assert train[-1]["tflops_per_s"] > 0 and "mfu" not in train[-1]
    assert summary.flop_rates["tflops_per_s"] > 0
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"loss.png", "accuracy.png", "acceptance.png", "throughput.png"}
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["best", "step_0000030", "step_0000060"]
    best = json.loads((run_dir / "checkpoints/best/best.json").read_text())
    assert best == summary.best and best["mode"] == "chain"
    accepts = [r for r in records if r["split"] == "accept"]
    assert [r["step"] for r in accepts] == [0, 30, 60]  # start, checkpoint, end
    assert best["accept_len"] == max(r["accept_len"]["chain"] for r in accepts)
    assert best["step"] == next(r["step"] for r in accepts if r["accept_len"]["chain"] == best["accept_len"])
    last = run_dir / "checkpoints/step_0000060"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 60 and state["scheduler"]["last_epoch"] == 60 and state["skipped_steps"] == 0
    assert (last / "state/.metadata").is_file() and (last / "rng/rank_00000.json").is_file()
    evals = [r["step"] for r in records if r["split"] == "eval"]
    assert evals == [0, 30, 60]
    assert {p.name for p in (run_dir / "export/sglang").iterdir()} == {"config.json", "model.safetensors"}
    assert {p.name for p in (run_dir / "export/vllm").iterdir()} == {"config.json", "model.safetensors"}
    speculators = json.loads((run_dir / "export/vllm/config.json").read_text())
    assert speculators["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]  # vLLM: HF hidden_states indices
    assert speculators["speculators_config"]["verifier"]["name_or_path"] == str((run_dir / "target").resolve())
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


def test_second_run_reuses_assets(demo_run, tmp_path):
    # in a copy: a run in the fixture's own directory would replace the trained draft and export that later tests
    # (tests/evaluate) read
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], run_dir)
    overrides = [f"train.run_dir={run_dir}", "train.max_steps=2", "train.progress=false", "train.eval_batches=0",
                 "accept.enabled=false",
                 "demo.num_prompts=96", "demo.num_eval_prompts=16"]
    mtime = (run_dir / "data/train.jsonl").stat().st_mtime_ns
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        run(to_config(compose("config", overrides=overrides)))
    assert (run_dir / "data/train.jsonl").stat().st_mtime_ns == mtime


def test_demo_moe_learns_and_exports(demo_moe_run):
    """`eagle-train --config-name demo_moe`, shortened: a tiny Qwen3-MoE target (eager experts on the CPU)."""
    run_dir, summary = demo_moe_run
    target_cfg = AutoConfig.from_pretrained(run_dir / "target")  # the file says num_local_experts (transformers 5)
    assert target_cfg.architectures == ["Qwen3MoeForCausalLM"] and target_cfg.num_experts == 8
    assert json.loads((run_dir / "config.json").read_text())["target"]["moe_impl"] == "auto"
    before, after = summary.eval_before, summary.eval_after
    assert before["acc"][0] < 0.1
    assert after["acc"][0] > before["acc"][0] + 0.3, (before, after)
    assert after["loss"] < 0.7 * before["loss"]
    exported = read_sglang(run_dir / "export/sglang")
    ckpt = load_draft(summary.checkpoint)
    for name, tensor in ckpt.trainable_state_dict().items():
        ref = tensor.to(torch.bfloat16).to(tensor.dtype) if tensor.is_floating_point() else tensor
        torch.testing.assert_close(exported.trainable_state_dict()[name].to(ref.dtype), ref, rtol=0, atol=0)


def test_demo_architecture_must_be_known():
    with pytest.raises(ValueError, match="'llama'.*qwen3, qwen3_moe"):
        tiny_target_config(DemoConfig(architecture="llama"))

"""Offline training: `eagle-data dump` once, then train from the dump without loading the target model.

On the demo's tiny target and data: the losses equal online training's step for step, and a dump made for
another target, other aux layers or another vocab map is refused before training starts.
"""

import shutil

import pytest
from hydra import compose, initialize_config_dir

from batches import assert_same_curve

import eagle_trainer.app.train as train_module
from eagle_trainer.app.data import main as data_main
from eagle_trainer.metrics import read_metrics
from eagle_trainer.app.train import RECIPES, run, to_config


def compose_cfg(demo_dir, run_dir, **extra):
    base = {
        "demo.enabled": "false", "target.path": demo_dir / "target", "data.path": demo_dir / "data/train.jsonl",
        "data.eval_path": "null", "data.cache_dir": demo_dir / "cache", "train.run_dir": run_dir,
        "train.max_steps": 6, "train.save_every": 0, "train.log_every": 1, "train.eval_batches": 0,
        "train.progress": "false", "accept.enabled": "false", "train.export_formats": "[]", "optim.batch_size": 1,
    }
    base.update(extra)
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose("config", overrides=[f"{k}={v}" for k, v in base.items()]))


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"}


@pytest.fixture(scope="module")
def dumped(demo_run, tmp_path_factory):
    """The demo's training data dumped with batch size 1 (so each example is captured as online training does
    with optim.batch_size=1), and the online run's losses."""
    demo_dir, _ = demo_run
    online = tmp_path_factory.mktemp("online")
    run(compose_cfg(demo_dir, online))
    vocab = next((demo_dir / "cache").glob("vocab_256_*.safetensors"))
    out = tmp_path_factory.mktemp("dump")
    data_main(["dump", "--target", str(demo_dir / "target"), "--data", str(demo_dir / "data/train.jsonl"),
               "--vocab", str(vocab), "--out", str(out), "--batch-size", "1", "--max-length", "256",
               "--cache-dir", str(demo_dir / "cache"), "--no-progress"])
    return demo_dir, out, online


def test_offline_training_equals_online_without_loading_the_target(dumped, tmp_path, monkeypatch):
    demo_dir, dump, online = dumped

    def no_model(*args, **kwargs):
        raise AssertionError("offline training loaded the target model")

    monkeypatch.setattr(train_module, "open_target", no_model)
    summary = run(compose_cfg(demo_dir, tmp_path, **{"data.offline_path": dump}))
    assert summary.steps == 6
    expect, got = train_losses(online), train_losses(tmp_path)
    assert sorted(got) == list(range(1, 7)) and got == expect  # exact, step for step


def test_offline_holdout_and_resume(dumped, tmp_path):
    demo_dir, dump, _ = dumped
    cfg = {"data.offline_path": dump, "data.eval_holdout": 4, "train.eval_batches": 2, "train.save_every": 3}
    summary = run(compose_cfg(demo_dir, tmp_path, **cfg))
    assert summary.eval_before["loss"] > summary.eval_after["loss"]
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "checkpoints", again / "checkpoints")
    run(compose_cfg(demo_dir, again, **cfg, **{"train.resume": again / "checkpoints/step_0000003"}))
    assert_same_curve({s: v for s, v in train_losses(again).items() if s > 3},
                      {s: v for s, v in train_losses(tmp_path).items() if s > 3})


def test_a_dump_for_another_run_is_refused(dumped, tmp_path):
    demo_dir, dump, _ = dumped
    with pytest.raises(ValueError, match=r"aux_layer_ids: stored \[1, 3, 4\], expected \[1, 2, 3\]"):
        run(compose_cfg(demo_dir, tmp_path, **{"data.offline_path": dump, "target.aux_layer_ids": "[1,2,3]"}))
    with pytest.raises(ValueError, match="eval_path.*no dumped target states.*eval_holdout"):
        run(compose_cfg(demo_dir, tmp_path, **{"data.offline_path": dump, "data.eval_path": "x.jsonl"}))
    other = tmp_path / "other_target"
    shutil.copytree(demo_dir / "target", other)
    (other / "config.json").write_text((other / "config.json").read_text().replace('"rms_norm_eps": 1e-06',
                                                                                 '"rms_norm_eps": 1e-05'))
    with pytest.raises(ValueError, match=r"does not match this run:\n  target.fingerprint: stored"):
        run(compose_cfg(demo_dir, tmp_path, **{"data.offline_path": dump, "target.path": other}))
    partial = tmp_path / "partial"
    shutil.copytree(dump, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a complete offline dump.*eagle-data dump"):
        run(compose_cfg(demo_dir, tmp_path, **{"data.offline_path": partial}))


def test_offline_eagle1_equals_online(dumped, tmp_path):
    """EAGLE-1 reads the final normed hidden state, which every dump stores; the aux layers it ignores."""
    demo_dir, dump, _ = dumped
    eagle1 = {"draft": "eagle1", "draft.draft_vocab_size": 256, "train.max_steps": 4}
    run(compose_cfg(demo_dir, tmp_path / "online", **eagle1))
    run(compose_cfg(demo_dir, tmp_path / "offline", **eagle1, **{"data.offline_path": dump}))
    assert_same_curve(train_losses(tmp_path / "offline"), train_losses(tmp_path / "online"))


def test_offline_packed_equals_offline_padded(dumped, tmp_path):
    """data.pack reads the same examples per batch from the dump, packed with their states into one row."""
    demo_dir, dump, _ = dumped
    cfg = {"data.offline_path": dump, "optim.batch_size": 4, "train.max_steps": 4}
    run(compose_cfg(demo_dir, tmp_path / "padded", **cfg))
    run(compose_cfg(demo_dir, tmp_path / "packed", **cfg, **{"data.pack": "true"}))
    padded, packed = train_losses(tmp_path / "padded"), train_losses(tmp_path / "packed")
    assert sorted(packed) == [1, 2, 3, 4] and packed == pytest.approx(padded, rel=1e-5)

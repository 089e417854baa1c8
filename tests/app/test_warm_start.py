"""draft.init_from: a run begins from an existing draft (a checkpoint or an export), keeps its vocab map, and refuses
one of another kind or other shapes before any target weight is read."""

import pytest
import torch

from test_registry import write_chat

from eagle_trainer import registry
from eagle_trainer.app.train import run
from eagle_trainer.config import AcceptConfig, Config, DataConfig, DraftConfig, OptimConfig, TargetConfig, TrainConfig
from eagle_trainer.drafts.io import save_draft
from eagle_trainer.targets.loading import target_info


def recipe(target, data, run_dir, steps, **draft) -> Config:
    return Config(
        target=TargetConfig(path=str(target)),
        draft=DraftConfig(draft_vocab_size=128, ttt_steps=3, **draft),
        data=DataConfig(path=str(data), max_length=128, eval_holdout=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, batch_size=4),
        train=TrainConfig(run_dir=str(run_dir), max_steps=steps, epochs=10, log_every=1, save_every=0, eval_batches=2,
                          progress=False, export_formats=[]),
        accept=AcceptConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def trained(tiny_qwen3_path, tmp_path_factory):
    """A few trained steps, the checkpoint and its fp32 SGLang export."""
    work = tmp_path_factory.mktemp("warm")
    data = write_chat(work / "chat.jsonl", n=40)
    summary = run(recipe(tiny_qwen3_path, data, work / "run", 6))
    export = registry.export_formats()["sglang"].write(summary.checkpoint, work / "export", dtype=torch.float32)
    return work, data, summary, export


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_warm_start_evaluates_as_the_draft_it_came_from(trained, tiny_qwen3_path, tmp_path, source):
    work, data, summary, export = trained
    init = summary.checkpoint if source == "checkpoint" else export
    warm = run(recipe(tiny_qwen3_path, data, tmp_path / "run", 1, init_from=str(init)))
    torch.testing.assert_close(warm.eval_before["loss"], summary.eval_after["loss"], rtol=1e-6, atol=0)
    fresh = run(recipe(tiny_qwen3_path, data, tmp_path / "fresh", 1))  # the same run without init_from
    assert abs(fresh.eval_before["loss"] - summary.eval_after["loss"]) > 0.1
    assert warm.eval_before["acc"] == pytest.approx(summary.eval_after["acc"], rel=1e-6)


def test_a_draft_of_another_kind_or_shape_is_refused(trained, tiny_qwen3_path, tmp_path, monkeypatch):
    work, data, _, _ = trained
    _, info = target_info(TargetConfig(path=str(tiny_qwen3_path)))
    monkeypatch.setattr("eagle_trainer.app.train.open_target", lambda *a, **k: pytest.fail("the target was loaded"))
    eagle1 = registry.algorithm_spec("eagle1").build_draft(info, DraftConfig(algorithm="eagle1", draft_vocab_size=128), ())
    save_draft(tmp_path / "eagle1", eagle1)
    with pytest.raises(ValueError, match=r"is an EAGLE-1/2 draft, but this run trains an EAGLE-3 draft"):
        run(recipe(tiny_qwen3_path, data, tmp_path / "a", 1, init_from=str(tmp_path / "eagle1")))
    narrow = registry.algorithm_spec("eagle3").build_draft(info, DraftConfig(draft_vocab_size=128, intermediate_size=32),
                                                          (1, 3, 4))
    save_draft(tmp_path / "narrow", narrow)
    with pytest.raises(ValueError, match=r"midlayer\.mlp\.down_proj\.weight \(64, 32\) \(this run \(64, 128\)\)"):
        run(recipe(tiny_qwen3_path, data, tmp_path / "b", 1, init_from=str(tmp_path / "narrow")))

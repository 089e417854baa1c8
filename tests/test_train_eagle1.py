"""EAGLE-1 / EAGLE-2 end to end on tiny targets: dense Qwen3 (the demo_eagle1 recipe), Qwen3-MoE and
Qwen3-Next. The draft learns the target's features and distribution, and real speculative decoding with it
(chain = EAGLE-1, dynamic tree = EAGLE-2) gets tokens accepted."""


from conftest import compose_demo, on_demo_assets

import torch

from eagle_trainer.config import TargetConfig
from eagle_trainer.data.chat import read_chat_jsonl
from eagle_trainer.data.regenerate import stop_token_ids
from eagle_trainer.drafts.io import load_draft
from eagle_trainer.evaluate.acceptance import prompts_from_conversations
from eagle_trainer.evaluate.speculative import DecodeConfig, greedy_generate, speculative_generate
from eagle_trainer.targets.loading import load_target
from eagle_trainer.metrics import read_metrics
from eagle_trainer.app.train import run


def assert_learned(summary, min_gain=0.3, loss_ratio=0.5):
    before, after = summary.eval_before, summary.eval_after
    assert after["acc"][0] > before["acc"][0] + min_gain, (before, after)
    assert after["loss"] < loss_ratio * before["loss"], (before, after)


def test_eagle1_demo_learns_and_decodes(demo_eagle1_run):
    _, run_dir, summary = demo_eagle1_run
    assert_learned(summary)
    assert summary.accept_before["chain"] < 1.2
    assert summary.accept_after["chain"] > 1.5 and summary.accept_after["tree"] >= summary.accept_after["chain"]
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train[-1]["feature_loss"][0] < train[0]["feature_loss"][0]
    draft = load_draft(summary.checkpoint)
    assert type(draft).__name__ == "Eagle1Draft" and draft.config.algorithm == "eagle1" and draft.config.fc_bias


def test_eagle1_on_a_moe_target(demo_moe_run, tmp_path):
    demo_dir, _ = demo_moe_run
    cfg = compose_demo("demo_eagle1", tmp_path, 40, 40, [*on_demo_assets(demo_dir), "target=qwen3_moe",
                                                         "accept.enabled=false", "train.export_formats=[]"])
    assert_learned(run(cfg))


def test_eagle2_trains_like_eagle1_without_fc_bias(demo_run, tmp_path):
    demo_dir, _ = demo_run
    cfg = compose_demo("demo_eagle1", tmp_path, 40, 40, [*on_demo_assets(demo_dir), "draft.algorithm=eagle2",
                                                         "draft.fc_bias=false", "accept.modes=[tree]",
                                                         "train.export_formats=[]"])
    summary = run(cfg)
    assert_learned(summary)
    assert summary.accept_after["tree"] > 1.5
    draft = load_draft(summary.checkpoint)
    assert draft.config.algorithm == "eagle2" and draft.fc.bias is None


def test_eagle1_on_a_qwen3_next_target(demo_next_run, tmp_path):
    """EAGLE-1 on the Qwen3-Next demo's target and data (gated delta net + gated attention, shared expert; HF's
    CPU code). Here its drafts are verified token by token with HF's own cache (verify="walk", the reference; the
    tree verification with a state per node is checked against it in tests/evaluate/test_speculative.py);
    decoding still equals plain greedy."""
    next_dir, _ = demo_next_run
    summary = run(compose_demo("demo_eagle1", tmp_path, 60, 60, [*on_demo_assets(next_dir),
                                                                 "train.export_formats=[]"]))
    assert_learned(summary, min_gain=0.2, loss_ratio=0.7)  # the hybrid tiny target is slower to imitate
    assert set(summary.accept_after) == {"chain", "tree"} and summary.accept_after["tree"] > 1.0

    model, tokenizer, spec, _ = load_target(TargetConfig(path=str(next_dir / "target")), torch.device("cpu"))
    assert model.config.architectures == ["Qwen3NextForCausalLM"] and spec.recurrent_states is not None
    model.double()
    draft = load_draft(summary.checkpoint, model.get_input_embeddings().weight,
                       model.get_output_embeddings().weight).double()
    convs, _ = read_chat_jsonl(next_dir / "data/eval.jsonl")
    stop = tuple(stop_token_ids(tokenizer))
    cfg = DecodeConfig(mode="tree", topk=4, depth=4, total_tokens=12, max_new_tokens=24, verify="walk")
    lengths = []
    for prompt in prompts_from_conversations(tokenizer, convs[:4]):
        gen = speculative_generate(model, spec, draft, prompt, cfg, stop)
        assert gen.tokens == greedy_generate(model, prompt, 24, stop)
        lengths += gen.accept_lengths
    assert max(lengths) > 1  # accepted draft tokens were exercised, not only rejections

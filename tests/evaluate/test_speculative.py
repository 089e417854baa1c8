"""Speculative decoding reproduces plain greedy decoding token for token (chain and EAGLE-2 tree), and the
acceptance report and `eagle-eval` built on it. Trained drafts come from the shortened demo runs (conftest);
their targets run in float64 here so that no near-tie can flip an argmax between two equal computations.
"""

import json
from dataclasses import replace

import pytest
import torch

from eagle_trainer.app.evaluate import main as eagle_eval
from eagle_trainer.config import TargetConfig
from eagle_trainer.data.chat import read_chat_jsonl
from eagle_trainer.data.regenerate import stop_token_ids
from eagle_trainer.drafts import frozen_weights_to
from eagle_trainer.drafts.io import load_draft
from eagle_trainer.evaluate.acceptance import measure_acceptance, prompt_from_example, prompts_from_conversations
from eagle_trainer.export import read_draft
from eagle_trainer.evaluate.speculative import (DecodeConfig, TargetCache, Tree, accept, greedy_generate,
                                                speculative_generate)
from eagle_trainer.targets.loading import load_target


def test_tree_ancestor_mask_and_greedy_walk():
    # root -> a(5) -> c(7); root -> b(6) -> d(8) -> e(9)
    tokens = [5, 6, 7, 8, 9]
    tree = Tree(tokens=torch.tensor(tokens), parents=[-1, -1, 0, 1, 3], depths=[1, 1, 2, 2, 3])
    mask = tree.ancestor_mask()
    assert mask.tolist() == [[True, False, False, False, False, False],  # root: itself
                             [True, True, False, False, False, False],  # a: root, itself
                             [True, False, True, False, False, False],  # b
                             [True, True, False, True, False, False],  # c sees root, a, itself
                             [True, False, True, False, True, False],  # d: root, b, itself
                             [True, False, True, False, True, True]]  # e sees root, b, d, itself
    # target argmax at [root, a, b, c, d, e]
    assert accept(tree, [6, 0, 8, 0, 9, 4], tokens) == [1, 3, 4]  # b, d, e: all accepted
    assert accept(tree, [5, 1, 0, 0, 0, 0], tokens) == [0]  # a, then its child c (7) != 1
    assert accept(tree, [3, 0, 0, 0, 0, 0], tokens) == []


def test_decode_config_checks_its_values():
    assert DecodeConfig(mode="chain", steps=4).tree_shape() == (1, 4, 4)
    assert DecodeConfig(mode="tree", topk=3, depth=2, total_tokens=5).tree_shape() == (3, 2, 5)
    with pytest.raises(ValueError, match="'beam'"):
        DecodeConfig(mode="beam")
    with pytest.raises(ValueError, match="steps"):
        DecodeConfig(steps=0)


def test_prompt_is_everything_before_the_last_trained_reply():
    assert prompt_from_example([1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 0, 1, 1]) == [1, 2, 3, 4, 5]
    assert prompt_from_example([1, 2], [0, 0]) is None


def run_target_and_draft(run_dir, checkpoint):
    model, tokenizer, spec, _ = load_target(TargetConfig(path=str(run_dir / "target")), torch.device("cpu"))
    model.double()
    draft = load_draft(checkpoint, embedding=model.get_input_embeddings().weight,
                       target_head=model.get_output_embeddings().weight).double()
    convs, _ = read_chat_jsonl(run_dir / "data/eval.jsonl")
    return model, spec, draft, tokenizer, prompts_from_conversations(tokenizer, convs[:3])


@pytest.mark.parametrize("which", ["demo_run", "demo_moe_run", "demo_eagle1_run", "demo_next_run"])
def test_speculative_equals_greedy_for_chain_and_tree(which, request):
    """EAGLE-3 drafts (dense, MoE and Qwen3-Next targets: the hybrid's recurrent layers verify the tree with a state
    per node) and an EAGLE-1 draft (chain = EAGLE-1, tree = EAGLE-2)."""
    fixture = request.getfixturevalue(which)
    run_dir, summary = fixture[0], fixture[-1]  # the directory holding target/ and data/, and the Summary
    model, spec, draft, tokenizer, prompts = run_target_and_draft(run_dir, summary.checkpoint)
    stop = tuple(stop_token_ids(tokenizer))
    modes = [DecodeConfig(mode="chain", steps=4, max_new_tokens=24),
             DecodeConfig(mode="tree", topk=4, depth=4, total_tokens=15, max_new_tokens=24)]
    greedy = [greedy_generate(model, prompt, 24, stop) for prompt in prompts]  # the same for both modes
    accepted = {}
    for cfg in modes:
        lengths = []
        for prompt, want in zip(prompts, greedy):
            gen = speculative_generate(model, spec, draft, prompt, cfg, stop)
            assert gen.tokens == want, (cfg.mode, prompt)
            lengths += gen.accept_lengths
            # token-by-token verification with the target's own forward and cache accepts exactly what one tree
            # forward does
            walked = speculative_generate(model, spec, draft, prompt, replace(cfg, verify="walk"), stop)
            assert (walked.tokens, walked.accept_lengths) == (gen.tokens, gen.accept_lengths), cfg.mode
        accepted[cfg.mode] = (sum(lengths) / len(lengths), max(lengths))
    # the trained draft is right often enough that accepted paths (not only rejections) were exercised; the tiny
    # hybrid's draft is weaker (60 steps), but paths of two and more accepted tokens still occur
    least = (1.1, 3) if which == "demo_next_run" else (1.5, 3)
    assert all(mean > least[0] and longest >= least[1] for mean, longest in accepted.values()), accepted


def test_random_draft_gets_nothing_accepted_but_output_is_still_greedy(demo_run):
    run_dir, summary = demo_run
    model, spec, draft, tokenizer, prompts = run_target_and_draft(run_dir, summary.checkpoint)
    torch.manual_seed(0)
    for p in draft.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    report = measure_acceptance(model, spec, draft, prompts[:2], DecodeConfig(mode="tree", max_new_tokens=16),
                                tuple(stop_token_ids(tokenizer)))
    assert report["accept_len"] < 1.2 and sum(report["histogram"].values()) == report["num_rounds"]


@pytest.mark.parametrize("which", ["demo_run", "demo_eagle1_run"])
def test_a_draft_held_as_in_training_decodes(which, request):
    """The trainer's in-loop acceptance decodes with the draft as training holds it on a GPU: the frozen target
    embedding in bf16 (frozen_weights_to), the trained weights in fp32, no autocast."""
    fixture = request.getfixturevalue(which)
    model, spec, draft, tokenizer, prompts = run_target_and_draft(fixture[0], fixture[-1].checkpoint)
    model, draft = model.float(), draft.float()
    frozen_weights_to(draft, torch.bfloat16)
    assert draft.embed_tokens.weight.dtype == torch.bfloat16 and draft.compute_dtype() == torch.float32
    stop = tuple(stop_token_ids(tokenizer))
    for cfg in (DecodeConfig(mode="chain", steps=4, max_new_tokens=12),
                DecodeConfig(mode="tree", topk=4, depth=4, total_tokens=15, max_new_tokens=12)):
        gen = speculative_generate(model, spec, draft, prompts[0], cfg, stop)
        assert gen.tokens == greedy_generate(model, prompts[0], 12, stop), cfg.mode


def test_eagle_eval_on_an_export(demo_run, tmp_path):
    run_dir, summary = demo_run
    out = tmp_path / "eval.json"
    assert eagle_eval(["--target", str(run_dir / "target"), "--draft", str(run_dir / "export/sglang"),
                       "--data", str(run_dir / "data/eval.jsonl"), "--out", str(out), "--num-prompts", "4",
                       "--max-new-tokens", "24", "--topk", "4", "--depth", "4", "--total-tokens", "12",
                       "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"chain", "tree"}
    for rep in result["modes"].values():
        assert rep["num_prompts"] == 4 and len(rep["per_prompt"]) == 4
        assert sum(int(k) * v for k, v in rep["histogram"].items()) / rep["num_rounds"] == pytest.approx(
            rep["accept_len"])
        assert rep["accept_len"] > 1.5
    assert len(result["simulated"]["acc"]) == 7 and result["simulated"]["sim_accept_len"] > 1.5
    assert out.with_suffix(".png").is_file()
    # a checkpoint and a run dir give the same draft; the exports give it in bf16
    a, b = read_draft(summary.checkpoint), read_draft(run_dir)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items() if "embed" not in k)
    c = read_draft(run_dir / "export/sglang")
    assert torch.equal(c.fc.weight, a.fc.weight.to(torch.bfloat16).float())


def test_decoding_captures_what_output_hidden_states_gives(tiny_qwen3_path):
    """TargetCache reads the target through the training hooks (the spec's layers and final norm): bit for bit what
    HF's output_hidden_states gives (entry i+1: decoder layer i's output; the last entry: the final norm's)."""
    model, _, spec, info = load_target(TargetConfig(path=str(tiny_qwen3_path)), torch.device("cpu"))
    aux = spec.aux_layers(info.num_layers)
    hooked = [model.model.norm, *(model.model.layers[i] for i in aux)]
    before = [len(m._forward_hooks) for m in hooked]
    seen = []
    cache = TargetCache(model, spec, aux, lambda states: seen.append(states) or states.final_hidden)
    ids = torch.randint(0, 1024, (9,), generator=torch.Generator().manual_seed(0))
    cache.forward(ids, torch.arange(9))
    cache.close()
    assert [len(m._forward_hooks) for m in hooked] == before  # close() removed its hooks
    ref = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    assert torch.equal(seen[0].aux_hidden, torch.cat([ref[i + 1] for i in aux], dim=-1))
    assert torch.equal(seen[0].final_hidden, ref[-1])


@pytest.mark.gpu
def test_hybrid_tree_verification_on_the_gpu(demo_next_run):
    """On a GPU the hybrid's recurrent layers verify a tree with the Triton tree kernel: in fp32 the decoded tokens
    are plain greedy decoding's and walk verification's, in one target forward per round."""
    run_dir, summary = demo_next_run
    model, spec, draft, tokenizer, prompts = run_target_and_draft(run_dir, summary.checkpoint)
    model, draft = model.float().cuda(), draft.float().cuda()
    stop = tuple(stop_token_ids(tokenizer))
    longest = 0
    for cfg in (DecodeConfig(mode="chain", steps=4, max_new_tokens=24),
                DecodeConfig(mode="tree", topk=4, depth=4, total_tokens=15, max_new_tokens=24)):
        for prompt in prompts:
            gen = speculative_generate(model, spec, draft, prompt, cfg, stop)
            walked = speculative_generate(model, spec, draft, prompt, replace(cfg, verify="walk"), stop)
            assert gen.tokens == walked.tokens == greedy_generate(model, prompt, 24, stop), (cfg.mode, prompt)
            longest = max(longest, *gen.accept_lengths)
    assert longest >= 3

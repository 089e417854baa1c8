"""Regeneration by the target: greedy equals model.generate, batching is exact, output round-trips, CLI; sampling
is Gumbel-max over the top-p nucleus with counter-based randomness, the same in any batch; replies stop at the
context; a reply cut at its cap is marked `truncated` and trains no end-of-turn; a static KV cache (and its CUDA
graph replay) decodes as HF's dynamic one."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eagle_trainer.data.chat import read_chat_jsonl, write_chat_jsonl
from eagle_trainer.app.data import main
from eagle_trainer.config import TargetConfig
from eagle_trainer.data.regenerate import check_prompt_lengths, check_static_target, regenerate, render_prompt
from eagle_trainer.data.sampling import Sampling, row_keys, sample_next, splitmix64
from eagle_trainer.data.template import tokenize_conversation
from eagle_trainer.targets.loading import load_target
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_config, tiny_qwen3_next_config

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Kalo mi ne su ta ri po?"},
    {"role": "assistant", "content": "old answer"},
    {"role": "user", "content": "Ve da?"},
    {"role": "assistant", "content": "another old answer"},
]
PROMPT_ONLY = [{"role": "user", "content": "Zu chi mo fa gle?"}]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("target")
    save_tiny_checkpoint(path, tiny_qwen3_config(vocab_size=1024, num_layers=2), logit_std=6.0)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return path, model, AutoTokenizer.from_pretrained(str(path))


def test_greedy_equals_model_generate(target):
    _, model, tokenizer = target
    out = regenerate(model, tokenizer, [PROMPT_ONLY], max_new_tokens=24, progress=False)
    prompt = tokenizer.apply_chat_template(PROMPT_ONLY, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    ref = ref.tolist()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cut = {} if end in ref else {"truncated": True}
    ref = ref[: ref.index(end)] if end in ref else ref
    reply = {"role": "assistant", "content": tokenizer.decode(ref, skip_special_tokens=False), **cut}
    assert out == [PROMPT_ONLY + [reply]]
    assert "<|im_end|>" not in out[0][-1]["content"]


def test_turns_follow_regenerated_history_and_batching_is_exact(target):
    _, model, tokenizer = target
    inputs = [MULTI_TURN, PROMPT_ONLY, MULTI_TURN[:4]]
    snapshot = json.dumps(inputs)
    batched = regenerate(model, tokenizer, inputs, batch_size=3, max_new_tokens=12, progress=False)
    assert json.dumps(inputs) == snapshot  # inputs untouched
    assert [len(c) for c in batched] == [5, 2, 5]
    assert [m["role"] for m in batched[0]] == [m["role"] for m in MULTI_TURN]
    assert batched[0][:2] == MULTI_TURN[:2] and batched[0][3] == MULTI_TURN[3]
    assert "old answer" not in (batched[0][2]["content"], batched[0][4]["content"])
    # The second turn is the greedy reply to the regenerated first turn, not to the old one.
    history = batched[0][:4]
    alone = regenerate(model, tokenizer, [history], max_new_tokens=12, progress=False)
    assert alone[0][4] == batched[0][4]
    one_by_one = [regenerate(model, tokenizer, [c], batch_size=1, max_new_tokens=12, progress=False)[0] for c in inputs]
    assert one_by_one == batched


def test_sampling_is_seeded_and_output_round_trips(target, tmp_path):
    _, model, tokenizer = target
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, progress=False)
    a = regenerate(model, tokenizer, [PROMPT_ONLY, MULTI_TURN], seed=3, **kw)
    assert a == regenerate(model, tokenizer, [PROMPT_ONLY, MULTI_TURN], seed=3, **kw)
    write_chat_jsonl(tmp_path / "r.jsonl", a)
    assert read_chat_jsonl(tmp_path / "r.jsonl")[0] == a
    with pytest.raises(ValueError, match="top_p=0"):
        regenerate(model, tokenizer, [PROMPT_ONLY], top_p=0.0)


def test_cli_regenerate(target, tmp_path):
    path, model, tokenizer = target
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"conversations": [{"from": "human", "value": PROMPT_ONLY[0]["content"]}]}) + "\n"
                   + json.dumps({"messages": MULTI_TURN}) + "\n")
    main(["regenerate", "--target", str(path), "--data", str(src), "--out", str(tmp_path / "out.jsonl"),
          "--max-new-tokens", "10", "--batch-size", "2", "--device", "cpu", "--no-progress"])
    got, _ = read_chat_jsonl(tmp_path / "out.jsonl")
    assert got == regenerate(model, tokenizer, [PROMPT_ONLY, MULTI_TURN], max_new_tokens=10, progress=False)


def test_cli_regenerate_renders_with_the_chat_template_given(target, tmp_path):
    path, model, _ = target
    template = Path(__file__).parents[1] / "fixtures" / "qwen3_chat_template.jinja"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": MULTI_TURN}) + "\n")
    args = ["regenerate", "--target", str(path), "--data", str(src), "--max-new-tokens", "6", "--device", "cpu",
            "--no-progress", "--chat-template", str(template)]
    main([*args, "--out", str(tmp_path / "out.jsonl"), "--chat-template-kwargs", '{"enable_thinking": false}'])
    own = AutoTokenizer.from_pretrained(str(path))
    own.chat_template = template.read_text()
    assert read_chat_jsonl(tmp_path / "out.jsonl")[0] == regenerate(
        model, own, [MULTI_TURN], max_new_tokens=6, chat_template_kwargs={"enable_thinking": False}, progress=False)
    record = json.loads((tmp_path / "out.jsonl.regen.json").read_text())
    assert record["settings"]["chat_template"] == hashlib.sha256(template.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="--chat-template-kwargs sets 'enable_thinkng', which the chat template never"):
        main([*args, "--out", str(tmp_path / "typo.jsonl"), "--chat-template-kwargs", '{"enable_thinkng": false}'])


def test_a_reply_cut_at_the_cap_is_marked_and_trains_no_end_of_turn(tiny_chat_target_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_target_path), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_target_path))
    two_rounds = [*PROMPT_ONLY, {"role": "assistant", "content": "old"}, *PROMPT_ONLY]
    inputs = [PROMPT_ONLY, two_rounds, [{"role": "user", "content": "Tell me about gle mo."}]]
    ended = regenerate(model, tokenizer, inputs, max_new_tokens=40, progress=False)  # turns end after ~10 tokens
    cut = regenerate(model, tokenizer, inputs, max_new_tokens=3, progress=False)  # the last one ends at once
    assert not any("truncated" in m for conv in ended for m in conv)
    marks = [[m.get("truncated") for m in conv if m["role"] == "assistant"] for conv in cut]
    assert marks == [[True], [True, True], [None]]
    assert ended[0][1]["content"].startswith(cut[0][1]["content"])  # greedy: the cut reply is a prefix
    # The file: unmarked lines as they were, the mark on a cut reply alone; each reads back as written.
    write_chat_jsonl(tmp_path / "ended.jsonl", ended)
    assert (tmp_path / "ended.jsonl").read_text() == "".join(
        json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in ended)
    write_chat_jsonl(tmp_path / "cut.jsonl", cut)
    assert read_chat_jsonl(tmp_path / "cut.jsonl")[0] == cut
    # Training sees the cut reply's tokens, and no end-of-turn after it.
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for conv, num_ends in ((ended[0], 1), (cut[0], 0)):
        tok = tokenize_conversation(tokenizer, conv)
        trained = [t for t, m in zip(tok.input_ids, tok.loss_mask) if m]
        assert trained.count(end) == num_ends and len(trained) > num_ends


def test_cli_refuses_a_path_that_is_not_a_checkpoint(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": PROMPT_ONLY}) + "\n")
    with pytest.raises(ValueError, match="does not exist"):
        main(["regenerate", "--target", str(tmp_path / "nope"), "--data", str(src), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        main(["regenerate", "--target", str(tmp_path / "empty"), "--data", str(src), "--out", str(tmp_path / "o")])


def splitmix64_reference(z: int) -> int:
    """splitmix64's finaliser on Python ints (uint64)."""
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_counter_hash_is_splitmix64_in_int64():
    values = [0, 1, 2, 12345, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x9E3779B97F4A7C15]
    signed = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)
    got = [v % (1 << 64) for v in splitmix64(signed).tolist()]
    assert got == [splitmix64_reference(v) for v in values]


def test_row_keys_are_not_symmetric_in_seed_and_index():
    keys = [row_keys(seed, torch.arange(4), turn=0) for seed in range(4)]
    assert len({k for row in keys for k in row.tolist()}) == 16  # seed s, index i is not seed i, index s
    assert not torch.equal(row_keys(0, torch.arange(4), turn=0), row_keys(0, torch.arange(4), turn=-1))


def test_sampling_draws_from_the_top_p_nucleus_of_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits / 0.8, -1)
    keys = row_keys(7, torch.arange(40000), turn=0)
    for top_p, nucleus in ((1.0, 6), (0.85, 3), (0.8, 2)):  # masses 0.646, 0.185, 0.099, 0.053, ...
        sampling = Sampling(temperature=0.8, top_p=top_p, seed=7)
        draws = sample_next(logits.expand(len(keys), -1), keys, step=3, sampling=sampling)
        freq = torch.bincount(draws, minlength=6).double() / len(keys)
        want = torch.zeros(6, dtype=torch.float64)
        want[:nucleus] = probs[:nucleus] / probs[:nucleus].sum()
        torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    # each row's draw depends on its own key and the step only
    sampling = Sampling(temperature=0.8, seed=7)
    rows = sample_next(logits.expand(8, -1), keys[:8], step=3, sampling=sampling)
    assert rows.tolist() == [sample_next(logits[None], keys[i : i + 1], 3, sampling).item() for i in range(8)]
    assert not torch.equal(rows, sample_next(logits.expand(8, -1), keys[:8], step=4, sampling=sampling))


def test_sampled_replies_do_not_depend_on_the_batch(target):
    _, model, tokenizer = target
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=11, progress=False)
    inputs = [MULTI_TURN, PROMPT_ONLY, MULTI_TURN[:2], PROMPT_ONLY]
    batched = regenerate(model, tokenizer, inputs, batch_size=4, **kw)
    alone = [regenerate(model, tokenizer, [c], ids=[i], **kw)[0] for i, c in enumerate(inputs)]
    assert alone == batched
    assert batched[1] != batched[3]  # the same prompt at another index of the input draws another reply
    assert regenerate(model, tokenizer, inputs[1:2], ids=[3], **kw)[0] == batched[3]


def test_replies_stop_at_the_context(target, monkeypatch):
    _, model, tokenizer = target
    length = len(render_prompt(tokenizer, PROMPT_ONLY))
    monkeypatch.setattr(model.config, "max_position_embeddings", length + 3)
    out = regenerate(model, tokenizer, [PROMPT_ONLY, [{"role": "user", "content": "Ve?"}]], max_new_tokens=20,
                     progress=False)  # the short prompt's row decodes on while the long one's has stopped
    assert len(tokenizer(out[0][-1]["content"], add_special_tokens=False)["input_ids"]) <= 3
    monkeypatch.setattr(model.config, "max_position_embeddings", length)
    with pytest.raises(ValueError, match=rf"conversation 1 of the input has a prompt of {length} tokens, which "
                                         rf"reaches the target's context of {length} tokens"):
        regenerate(model, tokenizer, [[{"role": "user", "content": "Ve?"}], PROMPT_ONLY], progress=False)
    with pytest.raises(ValueError, match=r"conversation 0 of the input has a prompt"):
        check_prompt_lengths(tokenizer, [PROMPT_ONLY], [0], length)
    check_prompt_lengths(tokenizer, [PROMPT_ONLY], [0], length + 1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_static_cache_decodes_as_the_dynamic_one(target, tiny_qwen3_moe_path, arch, temperature):
    model, tokenizer = target[1:]
    if arch == "moe":
        model, tokenizer, _, _ = load_target(TargetConfig(path=str(tiny_qwen3_moe_path)), torch.device("cpu"))
    inputs = [MULTI_TURN, PROMPT_ONLY, MULTI_TURN[:2]]  # left-padded rows of three lengths, two rounds
    kw = dict(batch_size=3, max_new_tokens=12, temperature=temperature, top_p=0.9, seed=1, progress=False)
    static = regenerate(model, tokenizer, inputs, decode_mode="static", **kw)
    assert static == regenerate(model, tokenizer, inputs, **kw)


def test_static_cache_needs_full_attention_and_graphs_a_gpu(target):
    with pytest.raises(ValueError, match=r"needs a target whose layers are all full attention, but this one has "
                                         r"\['full_attention', 'linear_attention'\]; use decode=eager"):
        check_static_target(tiny_qwen3_next_config(vocab_size=64))
    model, tokenizer = target[1:]
    with pytest.raises(ValueError, match=r"decode=graph captures CUDA graphs, but the target is on cpu"):
        regenerate(model, tokenizer, [PROMPT_ONLY], decode_mode="graph", progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_graph_replay_decodes_as_the_eager_loop(tiny_qwen3_moe_path, temperature):
    model, tokenizer, _, _ = load_target(TargetConfig(path=str(tiny_qwen3_moe_path), dtype="float32"),
                                         torch.device("cuda"))
    inputs = [MULTI_TURN, PROMPT_ONLY, MULTI_TURN[:2], MULTI_TURN[:4]]
    kw = dict(batch_size=4, max_new_tokens=24, temperature=temperature, top_p=0.9, seed=1, progress=False)
    graphed = regenerate(model, tokenizer, inputs, decode_mode="graph", **kw)
    assert graphed == regenerate(model, tokenizer, inputs, **kw)

"""Regeneration by the target: greedy equals model.generate, batching is exact, output round-trips, CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eagle_trainer.data.chat import read_chat_jsonl, write_chat_jsonl
from eagle_trainer.app.data import main
from eagle_trainer.data.regenerate import regenerate
from eagle_trainer.targets.tiny import save_tiny_checkpoint, tiny_qwen3_config

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
    ref = ref[: ref.index(end)] if end in ref else ref
    assert out == [PROMPT_ONLY + [{"role": "assistant", "content": tokenizer.decode(ref, skip_special_tokens=False)}]]
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


def test_cli_refuses_a_path_that_is_not_a_checkpoint(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": PROMPT_ONLY}) + "\n")
    with pytest.raises(ValueError, match="does not exist"):
        main(["regenerate", "--target", str(tmp_path / "nope"), "--data", str(src), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        main(["regenerate", "--target", str(tmp_path / "empty"), "--data", str(src), "--out", str(tmp_path / "o")])

"""Loss masks found by rendering with the target's own chat template: a Llama-3 template and a Qwen3 one with
thinking and tools (tests/fixtures/*_chat_template.jinja), each set on a tiny tokenizer saved in HF format. Every
mask is checked as the exact text of its trained runs."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eagle_trainer.config import DataConfig
from eagle_trainer.data.chat import BadLineError
from eagle_trainer.data.dataset import build_dataset
from eagle_trainer.data.template import load_chat_template, render, tokenize_conversation
from eagle_trainer.targets.tiny_tokenizer import build_tiny_tokenizer, save_tiny_tokenizer
from test_chat import TWO_TURNS, masked_segments  # pytest puts tests/data/ on sys.path

FIXTURES = Path(__file__).parents[1] / "fixtures"
LLAMA3 = FIXTURES / "llama3_chat_template.jinja"
QWEN3 = FIXTURES / "qwen3_chat_template.jinja"

WEATHER = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Kalo"}}}
CALL_TEXT = '<tool_call>\n{"name": "weather", "arguments": {"city": "Kalo"}}\n</tool_call>'
# A tool loop (the user's question, a call, the tool's answer, the reply), then a second question.
TOOL_LOOP = [
    {"role": "user", "content": "Weather in Kalo?"},
    {"role": "assistant", "content": "", "reasoning_content": "Ask the tool.", "tool_calls": [WEATHER]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    {"role": "assistant", "content": "Sunny.", "reasoning_content": "It said sunny."},
]
NO_REASONING = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in TOOL_LOOP]
SECOND_QUESTION = [{"role": "user", "content": "Thanks"},
                   {"role": "assistant", "content": "Welcome.", "reasoning_content": "Be polite."}]


def template_tokenizer(out_dir, template: Path, special=(), added=(), **special_tokens):
    """The tiny tokenizer with a target's control tokens and its chat template, saved and loaded back."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(special), **special_tokens})
    tokenizer.add_tokens(list(added))
    tokenizer.chat_template = template.read_text()
    tokenizer.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return template_tokenizer(tmp_path_factory.mktemp("llama3"), LLAMA3,
                              ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], bos_token="<|begin_of_text|>")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    # Qwen3's tool markers are added tokens that are not special; <|im_end|>, <think>, </think> come with the tiny one
    return template_tokenizer(tmp_path_factory.mktemp("qwen3"), QWEN3,
                              added=["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])


def trained(tokenizer, tok) -> list[str]:
    """The text of each maximal run of loss tokens."""
    return masked_segments(tokenizer, tok.input_ids, tok.loss_mask)


def untrained(tokenizer, tok) -> str:
    return tokenizer.decode([t for t, m in zip(tok.input_ids, tok.loss_mask) if not m], skip_special_tokens=False)


def masks(tokenizer, messages, **kwargs):
    """(trained runs, tokenised conversation) under the tokenizer's template with load_chat_template's kwargs."""
    tok = tokenize_conversation(tokenizer, messages, template=load_chat_template(tokenizer, **kwargs))
    return trained(tokenizer, tok), tok


def test_llama3_trains_every_reply_past_its_header_through_eot(llama3):
    runs, tok = masks(llama3, TWO_TURNS)
    assert runs == ["Suta ri po.<|eot_id|>", "Zu chi mo!<|eot_id|>"]
    rest = untrained(llama3, tok)
    assert rest.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert rest.count("<|start_header_id|>assistant<|end_header_id|>\n\n") == 2 and "Kalo mi ne?" in rest
    text = llama3.apply_chat_template(TWO_TURNS, tokenize=False)
    assert tok.input_ids == llama3(text, add_special_tokens=False)["input_ids"]


def test_llama3_truncated_reply_trains_no_eot(llama3):
    cut = [*TWO_TURNS[:4], {**TWO_TURNS[4], "truncated": True}]
    assert masks(llama3, cut)[0] == ["Suta ri po.<|eot_id|>", "Zu chi mo!"]


def test_qwen3_trains_every_turn_and_the_empty_think_block_the_thinking_model_writes(qwen3):
    runs, tok = masks(qwen3, TWO_TURNS)
    # the template gives the last reply an empty think block; with thinking on, the model writes it itself
    assert runs == ["Suta ri po.<|im_end|>", "<think>\n\n</think>\n\nZu chi mo!<|im_end|>"]
    assert "<|im_start|>assistant\n<|im_start|>" not in untrained(qwen3, tok)


def test_qwen3_empty_think_block_is_masked_when_the_served_prompt_holds_it(qwen3):
    off = {"kwargs": {"enable_thinking": False}}
    runs, masked = masks(qwen3, TWO_TURNS, **off)
    assert runs == ["Suta ri po.<|im_end|>", "Zu chi mo!<|im_end|>"]
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" in untrained(qwen3, masked)
    runs, kept = masks(qwen3, TWO_TURNS, **off, empty_think="train")
    assert runs == ["Suta ri po.<|im_end|>", "<think>\n\n</think>\n\nZu chi mo!<|im_end|>"]
    runs, forced = masks(qwen3, TWO_TURNS, empty_think="mask")  # thinking on, masked anyway
    assert runs == ["Suta ri po.<|im_end|>", "Zu chi mo!<|im_end|>"]
    assert masked.input_ids == kept.input_ids == forced.input_ids  # the policy moves the mask, not the text


def test_qwen3_reasoning_is_trained_where_the_template_renders_it(qwen3):
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "R2"}]
    runs, tok = masks(qwen3, messages)
    # Qwen3 renders reasoning only after the last user query: the first reply is in the text without its R1
    assert runs == ["A1<|im_end|>", "<think>\nR2\n</think>\n\nA2<|im_end|>"]
    assert "R1" not in qwen3.decode(tok.input_ids)
    # the same reasoning written inline in the content renders, and is masked, alike
    inline = [{"role": m["role"], "content": f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}"}
              if m["role"] == "assistant" else m for m in messages]
    assert masks(qwen3, inline)[1] == tok


def test_qwen3_tool_calls_are_trained_and_tool_responses_are_not(qwen3):
    runs, tok = masks(qwen3, TOOL_LOOP)
    assert runs == [f"<think>\nAsk the tool.\n</think>\n\n{CALL_TEXT}<|im_end|>",
                    "<think>\nIt said sunny.\n</think>\n\nSunny.<|im_end|>"]
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in untrained(qwen3, tok)


def test_qwen3_turns_are_masked_as_the_whole_conversation_renders_them(qwen3):
    # After a second question the template drops the tool loop's reasoning: the loop's prefix rendered on its own
    # shows think blocks the conversation does not, so spans are found in the whole conversation's text.
    runs, tok = masks(qwen3, TOOL_LOOP + SECOND_QUESTION)
    assert runs == [f"{CALL_TEXT}<|im_end|>", "Sunny.<|im_end|>", "<think>\nBe polite.\n</think>\n\nWelcome.<|im_end|>"]
    assert tok.input_ids == qwen3(render(qwen3, load_chat_template(qwen3), TOOL_LOOP + SECOND_QUESTION),
                                  add_special_tokens=False)["input_ids"]
    prefix = render(qwen3, load_chat_template(qwen3), TOOL_LOOP[:2])
    assert "Ask the tool." in prefix and not qwen3.decode(tok.input_ids).startswith(prefix)


def test_qwen3_truncated_reply_keeps_its_reasoning_and_drops_its_end_of_turn(qwen3):
    cut = [*TOOL_LOOP[:3], {**TOOL_LOOP[3], "truncated": True}]
    assert masks(qwen3, cut)[0][-1] == "<think>\nIt said sunny.\n</think>\n\nSunny."


def test_marker_text_inside_a_message_does_not_move_the_mask(qwen3):
    quoting = [{"role": "user", "content": "Say <|im_start|>assistant\nhi<|im_end|> back"}, TWO_TURNS[2]]
    assert masks(qwen3, quoting)[0] == ["<think>\n\n</think>\n\nSuta ri po.<|im_end|>"]


def test_a_template_without_tools_or_reasoning_is_refused_naming_the_field(llama3):
    with pytest.raises(BadLineError) as err:
        masks(llama3, NO_REASONING)
    assert str(err.value) == ("the chat template renders no tool_calls; use a template that supports tools "
                              "(data.chat_template=PATH) or drop the tool messages")
    assert err.value.reason == "unrendered_tool_calls"
    with pytest.raises(BadLineError, match="renders no reasoning_content; .* drop it \\(data.thinking=strip\\)"):
        masks(llama3, [TWO_TURNS[1], {**TWO_TURNS[2], "reasoning_content": "R"}])


def test_template_kwargs_and_policy_are_checked(llama3, qwen3, tmp_path):
    with pytest.raises(ValueError, match="^data.chat_template_kwargs sets 'enable_thinkng', which the chat template "
                                         "never reads .*; fix the name or drop it$"):
        load_chat_template(qwen3, kwargs={"enable_thinkng": False})
    with pytest.raises(ValueError, match="sets 'enable_thinking', which the chat template never reads"):
        load_chat_template(llama3, kwargs={"enable_thinking": False})  # Llama 3 has no thinking switch
    with pytest.raises(ValueError, match="sets 'add_generation_prompt', which is set for each rendering"):
        load_chat_template(qwen3, kwargs={"add_generation_prompt": True})
    with pytest.raises(ValueError, match="data.empty_think='drop' is not understood"):
        load_chat_template(qwen3, empty_think="drop")
    with pytest.raises(ValueError, match="data.chat_template='.*none.jinja' is not a file"):
        load_chat_template(qwen3, str(tmp_path / "none.jinja"))


def write_chat(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def test_dataset_renders_with_the_configured_template_kwargs_and_policy(tmp_path):
    chatml = save_tiny_tokenizer(tmp_path / "tok")  # its own template is plain ChatML; data.chat_template overrides it
    conversations = [TWO_TURNS, TOOL_LOOP[:1] + [TWO_TURNS[4]]]
    path = write_chat(tmp_path / "d.jsonl", conversations)
    built = {}
    for name, extra in {"own": {}, "qwen3": {"chat_template": str(QWEN3)},
                        "off": {"chat_template": str(QWEN3), "chat_template_kwargs": {"enable_thinking": False}},
                        "train": {"chat_template": str(QWEN3), "chat_template_kwargs": {"enable_thinking": False},
                                  "empty_think": "train"}}.items():
        cfg = DataConfig(path=str(path), **extra)
        ds, stats = build_dataset(cfg, chatml, tmp_path / "cache")
        template = load_chat_template(chatml, cfg.chat_template, cfg.chat_template_kwargs, cfg.empty_think)
        expected = [tokenize_conversation(chatml, c, template=template) for c in conversations]
        assert ds["input_ids"] == [e.input_ids for e in expected]
        assert ds["loss_mask"] == [e.loss_mask for e in expected]
        built[name] = (ds, stats["fingerprint"])
    assert trained(chatml, tokenize_conversation(chatml, TWO_TURNS)) == ["Suta ri po.<|im_end|>",
                                                                         "Zu chi mo!<|im_end|>"]
    assert built["own"][0]["input_ids"] != built["qwen3"][0]["input_ids"]  # the override renders the empty block
    assert built["off"][0]["input_ids"] == built["qwen3"][0]["input_ids"] == built["train"][0]["input_ids"]
    assert built["off"][0]["loss_mask"] != built["qwen3"][0]["loss_mask"] == built["train"][0]["loss_mask"]
    assert len({fingerprint for _, fingerprint in built.values()}) == 4


def test_a_conversation_the_template_cannot_render_is_a_bad_line(tmp_path, llama3):
    path = write_chat(tmp_path / "d.jsonl", [TWO_TURNS, NO_REASONING])
    with pytest.raises(ValueError) as err:
        build_dataset(DataConfig(path=str(path)), llama3, tmp_path / "cache")
    assert str(err.value).startswith(f"{path}:2: the chat template renders no tool_calls; use a template that "
                                     "supports tools (data.chat_template=PATH) or drop the tool messages "
                                     "[unrendered_tool_calls]")
    assert "\n" not in str(err.value)
    ds, stats = build_dataset(DataConfig(path=str(path), on_error="skip"), llama3, tmp_path / "cache")
    assert len(ds) == 1 and stats["skipped"] == {"unrendered_tool_calls": 1}


def test_decoding_stops_at_the_token_the_template_ends_replies_with(llama3, qwen3):
    """Regeneration and speculative decoding stop where the template closes a reply: Llama-3's <|eot_id|>, ChatML's
    <|im_end|> (and the tokenizer's eos beside it)."""
    from eagle_trainer.data.regenerate import stop_token_ids
    from eagle_trainer.data.template import end_of_turn_token
    assert end_of_turn_token(llama3) == "<|eot_id|>" and end_of_turn_token(qwen3) == "<|im_end|>"
    assert llama3.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(llama3)
    assert stop_token_ids(qwen3)[0] == qwen3.convert_tokens_to_ids("<|im_end|>")

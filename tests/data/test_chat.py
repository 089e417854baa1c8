"""Chat JSONL reading (both forms, errors, skip counts, thinking, a cut reply's `truncated` mark) and the rendered
loss mask."""

import json
import re

import pytest

from eagle_trainer.data.chat import (BadLineError, parse_conversation, read_chat_jsonl, strip_thinking,
                                     write_chat_jsonl)
from eagle_trainer.data.template import ChatTemplate, tokenize_conversation
from eagle_trainer.targets.tiny_tokenizer import CHAT_TEMPLATE, save_tiny_tokenizer

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Kalo mi ne?"},
    {"role": "assistant", "content": "Suta ri po."},
    {"role": "user", "content": "Ve da zu?"},
    {"role": "assistant", "content": "Zu chi mo!"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_openai_and_sharegpt_forms_normalise_alike(tmp_path):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Kalo mi ne?"},
                                  {"from": "gpt", "value": "Suta ri po."}, {"from": "user", "value": "Ve da zu?"},
                                  {"from": "assistant", "value": "Zu chi mo!"}]}
    path = write_lines(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}, "", sharegpt])
    conversations, skipped = read_chat_jsonl(path)
    assert conversations == [TWO_TURNS, TWO_TURNS]
    assert skipped == {}


BAD_LINES = {
    "bad_json": '{"messages": [',
    "no_assistant_turn": {"messages": [{"role": "user", "content": "hi"}]},
    "empty_conversation": {"messages": []},
    "unknown_role": {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    "bad_content": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["a"]}]},
    "bad_format": {"text": "hi"},
    "bad_truncated": {"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "yo", "truncated": "yes"}]},
    "bad_tool_calls": {"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}]},
    "bad_reasoning_content": {"messages": [{"role": "user", "content": "hi", "reasoning_content": "no"},
                                           {"role": "assistant", "content": "yo"}]},
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_error_names_file_line_and_fix(tmp_path, reason):
    path = write_lines(tmp_path / "bad.jsonl", [{"messages": TWO_TURNS}, BAD_LINES[reason]])
    with pytest.raises(ValueError) as err:
        read_chat_jsonl(path)
    message = str(err.value)
    assert f"{path}:2:" in message
    assert reason in message and "on_error=skip" in message


def test_skip_mode_counts_by_reason(tmp_path):
    records = [{"messages": TWO_TURNS}] + [BAD_LINES[r] for r in sorted(BAD_LINES)] + [BAD_LINES["bad_json"]]
    path = write_lines(tmp_path / "mixed.jsonl", records)
    conversations, skipped = read_chat_jsonl(path, on_error="skip")
    assert conversations == [TWO_TURNS]
    assert skipped == {r: 2 if r == "bad_json" else 1 for r in BAD_LINES}


def test_user_only_allowed_when_assistant_not_required(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [BAD_LINES["no_assistant_turn"]])
    conversations, _ = read_chat_jsonl(path, require_assistant=False)
    assert conversations == [[{"role": "user", "content": "hi"}]]


def test_thinking_strip_keep_and_bad_value():
    record = {"messages": [{"role": "user", "content": "<think>u</think> q"},
                           {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nAnswer <think>x</think>  done"}]}
    stripped = parse_conversation(record, thinking="strip")
    assert stripped[1]["content"] == "Answer done"
    assert stripped[0]["content"] == "<think>u</think> q"  # only assistant turns are touched
    assert parse_conversation(record, thinking="keep")[1]["content"] == record["messages"][1]["content"]
    assert strip_thinking("no blocks") == "no blocks"
    with pytest.raises(ValueError, match="thinking='drop'"):
        parse_conversation(record, thinking="drop")


def test_writer_round_trip(tmp_path):
    odd = [{"role": "user", "content": "caf\u00e9 \"q\"\n"}, {"role": "assistant", "content": ""}]
    conversations = [TWO_TURNS, odd]
    write_chat_jsonl(tmp_path / "out" / "w.jsonl", conversations)
    assert read_chat_jsonl(tmp_path / "out" / "w.jsonl")[0] == conversations


CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Kalo\"}"}}
TOOL_RECORD = {"messages": [
    {"role": "user", "content": "Weather?", "name": "ann"},  # OpenAI's participant name: not a tool's, passed over
    {"role": "assistant", "content": None, "reasoning_content": "Ask.", "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "weather"},
    {"role": "assistant", "content": "<think>ok</think>Sunny.", "reasoning_content": None, "tool_calls": []},
]}


def test_reasoning_tool_calls_and_tool_messages_are_kept_and_round_trip(tmp_path):
    messages = parse_conversation(TOOL_RECORD)
    assert messages == [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": "", "reasoning_content": "Ask.", "tool_calls": [CALL]},
                        {"role": "tool", "content": "sunny", "name": "weather", "tool_call_id": "c1"},
                        {"role": "assistant", "content": "<think>ok</think>Sunny."}]
    stripped = parse_conversation(TOOL_RECORD, thinking="strip")
    assert stripped[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert stripped[3]["content"] == "Sunny."
    sharegpt = {"conversations": [{"from": "human", "value": "Weather?"},
                                  {"from": "gpt", "value": "", "tool_calls": [{"name": "weather", "arguments": {}}]},
                                  {"from": "tool", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    assert [m["role"] for m in parse_conversation(sharegpt)] == ["user", "assistant", "tool", "assistant"]
    write_chat_jsonl(tmp_path / "w.jsonl", [messages])
    assert read_chat_jsonl(tmp_path / "w.jsonl")[0] == [messages]


CUT_FIRST = [*TWO_TURNS[:2], {**TWO_TURNS[2], "truncated": True}, *TWO_TURNS[3:]]


def test_truncated_mark_round_trips_and_is_written_only_when_true(tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "truncated": True}]}
    unmarked = {"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a", "truncated": False}]}
    path = write_lines(tmp_path / "in.jsonl", [{"messages": CUT_FIRST}, sharegpt, unmarked])
    conversations, _ = read_chat_jsonl(path)
    assert conversations == [CUT_FIRST, [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a", "truncated": True}],
                             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    write_chat_jsonl(tmp_path / "out.jsonl", conversations)
    assert read_chat_jsonl(tmp_path / "out.jsonl")[0] == conversations
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["messages"][-1].get("truncated") for line in lines] == [None, True, None]
    assert json.loads(lines[0])["messages"][2] == {"role": "assistant", "content": "Suta ri po.", "truncated": True}
    assert "truncated" not in lines[2]  # an unmarked conversation is written as before


@pytest.mark.parametrize("turn", [{"role": "assistant", "content": "yo", "truncated": 1},
                                  {"role": "assistant", "content": "yo", "truncated": None},
                                  {"role": "user", "content": "yo", "truncated": True}])
def test_bad_truncated_mark_is_refused_naming_the_turn(turn):
    with pytest.raises(BadLineError, match=r"turn 2 ") as err:
        parse_conversation({"messages": [*TWO_TURNS[:2], turn, TWO_TURNS[2]]})
    assert err.value.reason == "bad_truncated"


def masked_segments(tokenizer, ids, mask):
    """Decode each maximal run of loss tokens."""
    segments, run = [], []
    for token, m in zip(ids + [None], mask + [False]):
        if m:
            run.append(token)
        elif run:
            segments.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    return segments


def test_loss_mask_is_exactly_assistant_content_and_end_of_turn(tokenizer):
    tok = tokenize_conversation(tokenizer, TWO_TURNS)
    assert len(tok.input_ids) == len(tok.loss_mask) and not tok.truncated
    assert masked_segments(tokenizer, tok.input_ids, tok.loss_mask) == ["Suta ri po.<|im_end|>", "Zu chi mo!<|im_end|>"]
    unmasked = tokenizer.decode([t for t, m in zip(tok.input_ids, tok.loss_mask) if not m], skip_special_tokens=False)
    assert unmasked.count("<|im_start|>assistant\n") == 2 and "Kalo mi ne?" in unmasked and "Suta" not in unmasked
    # The ids are those of the rendered text, tokenised as a whole.
    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert tok.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_cut_reply_trains_its_content_but_not_its_end_of_turn(tokenizer):
    full = tokenize_conversation(tokenizer, TWO_TURNS)
    cut = tokenize_conversation(tokenizer, CUT_FIRST)
    assert cut.input_ids == full.input_ids  # the mark does not reach the template
    assert masked_segments(tokenizer, cut.input_ids, cut.loss_mask) == ["Suta ri po.", "Zu chi mo!<|im_end|>"]
    differ = [i for i, (a, b) in enumerate(zip(full.loss_mask, cut.loss_mask)) if a != b]
    assert len(differ) == 1 and full.input_ids[differ[0]] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    empty = [TWO_TURNS[1], {"role": "assistant", "content": "", "truncated": True}]
    assert not any(tokenize_conversation(tokenizer, empty).loss_mask)


def test_loss_mask_keeps_thinking_when_kept(tokenizer):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nmi\n</think>\n\nKa."}]
    tok = tokenize_conversation(tokenizer, messages)
    assert masked_segments(tokenizer, tok.input_ids, tok.loss_mask) == ["<think>\nmi\n</think>\n\nKa.<|im_end|>"]


def test_truncation_keeps_the_first_tokens(tokenizer):
    full = tokenize_conversation(tokenizer, TWO_TURNS)
    cut = tokenize_conversation(tokenizer, TWO_TURNS, max_length=10)
    assert cut.truncated and cut.num_original_tokens == len(full.input_ids)
    assert cut.input_ids == full.input_ids[:10] and cut.loss_mask == full.loss_mask[:10]


def test_a_template_whose_replies_cannot_be_placed_is_reported(tokenizer):
    no_end = CHAT_TEMPLATE.replace("<|im_end|>\\n'", "END\\n'")  # turns close with text, no special token
    with pytest.raises(BadLineError, match="follows assistant turn 1 with 'END.*not with a special token") as err:
        tokenize_conversation(tokenizer, TWO_TURNS, template=ChatTemplate(no_end))
    assert err.value.reason == "template_mismatch"
    no_content = CHAT_TEMPLATE.replace("message['content']", "'...'")
    with pytest.raises(BadLineError, match="renders an assistant message's content 0 times"):
        tokenize_conversation(tokenizer, TWO_TURNS, template=ChatTemplate(no_content))
    no_prompt = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    with pytest.raises(BadLineError, match=re.escape("assistant turn 1 is not rendered after the chat template's "
                                                     "generation prompt '<|im_start|>bot\\n'")):
        tokenize_conversation(tokenizer, TWO_TURNS, template=ChatTemplate(no_prompt))

"""Chat JSONL: read, validate, normalise and write conversations.

One conversation per line, in either of two forms:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}   (OpenAI)
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}       (ShareGPT)

Both normalise to a list of {"role", "content"} dicts with roles system / user / assistant / tool, keeping the fields
a chat template reads beyond them: on an assistant message `reasoning_content` (a string: its reasoning, which
thinking="strip" drops along with <think> blocks in the content) and `tool_calls` (a list of calls, each
{"function": {"name", "arguments"}} or {"name", "arguments"}; the content may then be null, read as ""); on a tool
message `name` and `tool_call_id`. template.py renders them with the target's template and refuses a template that
renders none of them. An assistant message may carry `"truncated": true` (regeneration writes it on a reply cut at
its token cap before the target ended the turn; template.py then trains no end-of-turn after it); it is kept only
when true. A bad line either raises a ValueError naming `file:line`, or (on_error="skip") is skipped and counted by
reason, so nothing is dropped silently. Blank lines carry no conversation and are passed over; a file of nothing else is
refused as empty. A line that is not valid UTF-8 is a bad line (reason bad_utf8).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

# role, content; reasoning_content, tool_calls (assistant), name, tool_call_id (tool); "truncated": True on a reply cut
# at its cap
Conversation = list[dict[str, Any]]

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool": "tool",
}
# The fields a message keeps beyond role and content, in the order chat_line writes them, and the role that has them.
# On another role the tool's are passed over (OpenAI's user messages may carry a `name`); the others are refused.
MESSAGE_FIELDS = {"reasoning_content": "assistant", "tool_calls": "assistant", "name": "tool",
                  "tool_call_id": "tool", "truncated": "assistant"}
THINKING_MODES = ("keep", "strip")
ON_ERROR_MODES = ("raise", "skip")

# A Qwen3 reasoning block and the whitespace the template puts after it.
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class BadLineError(ValueError):
    """A JSONL line that cannot be used; `reason` is the key it is counted under in skip mode."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_thinking(thinking: str) -> None:
    if thinking not in THINKING_MODES:
        raise ValueError(f"thinking={thinking!r} is not understood; use one of {THINKING_MODES} (data.thinking)")


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"on_error={on_error!r} is not understood; use one of {ON_ERROR_MODES} (data.on_error)")


def strip_thinking(text: str) -> str:
    """Remove every `<think>...</think>` block and the whitespace that follows it."""
    return _THINK_BLOCK.sub("", text)


def parse_conversation(record: object, *, thinking: str = "keep", require_assistant: bool = True) -> Conversation:
    """Normalise one decoded JSON record to [{"role", "content", and the MESSAGE_FIELDS it holds}]; BadLineError says
    what is wrong."""
    check_thinking(thinking)
    if not isinstance(record, dict):
        raise BadLineError("bad_format", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns, role_key, content_key = record["messages"], "role", "content"
    elif "conversations" in record:
        turns, role_key, content_key = record["conversations"], "from", "value"
    else:
        raise BadLineError("bad_format", f"no 'messages' or 'conversations' key (keys: {sorted(record)[:8]})")
    if not isinstance(turns, list):
        raise BadLineError("bad_format", f"the turn list is a {type(turns).__name__}, expected a list")
    if not turns:
        raise BadLineError("empty_conversation", "the conversation has no turns")
    messages: Conversation = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadLineError("bad_format", f"turn {i} is a {type(turn).__name__}, expected an object")
        raw_role = turn.get(role_key)
        role = ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise BadLineError("unknown_role", f"turn {i} has {role_key}={raw_role!r}; expected one of {sorted(ROLES)}")
        content = turn.get(content_key)
        if content is None and role == "assistant" and turn.get("tool_calls"):
            content = ""  # OpenAI's form of a reply that only calls tools
        if not isinstance(content, str):
            raise BadLineError(
                "bad_content", f"turn {i} has {content_key} of type {type(content).__name__}, expected a string"
            )
        if role == "assistant" and thinking == "strip":
            content = strip_thinking(content)
        message = {"role": role, "content": content, **_message_fields(turn, role, i)}
        if thinking == "strip":
            message.pop("reasoning_content", None)
        messages.append(message)
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadLineError("no_assistant_turn", "the conversation has no assistant turn, so nothing to learn from")
    return messages


def _message_fields(turn: dict, role: str, i: int) -> dict:
    """The fields of MESSAGE_FIELDS that turn i holds, checked; a `truncated` mark is kept only when true."""
    fields = {}
    for name, owner in MESSAGE_FIELDS.items():
        value = turn.get(name)
        if name == "truncated":  # true or false; only true is kept
            if name not in turn or value is False:
                continue
        elif value is None or value == [] or (owner == "tool" and role != owner):  # null: absent, as HF takes it
            continue
        reason = f"bad_{name}"
        if role != owner:
            cut = "; only an assistant reply can be cut at its token cap" if name == "truncated" else ""
            raise BadLineError(reason, f"turn {i} is a {role} turn with {name}, which only {owner} messages have{cut}")
        if name == "truncated" and not isinstance(value, bool):
            raise BadLineError(reason, f"turn {i} has truncated={value!r} of type {type(value).__name__}, expected "
                               "true or false")
        if name == "tool_calls" and not (isinstance(value, list) and value and all(map(_is_call, value))):
            raise BadLineError(reason, f"turn {i} has tool_calls={str(value)[:80]}; expected a list of calls, each "
                               '{"function": {"name": ..., "arguments": ...}} or {"name": ..., "arguments": ...}')
        if name not in ("tool_calls", "truncated") and not isinstance(value, str):
            raise BadLineError(reason, f"turn {i} has {name} of type {type(value).__name__}, expected a string")
        fields[name] = value
    return fields


def _is_call(call: object) -> bool:
    """A tool call in OpenAI's form ({"function": {"name", ...}}) or the flat one ({"name", ...})."""
    function = call.get("function", call) if isinstance(call, dict) else None
    return isinstance(function, dict) and isinstance(function.get("name"), str)


def iter_chat_jsonl(
    path: str | Path,
    *,
    thinking: str = "keep",
    on_error: str = "raise",
    require_assistant: bool = True,
    skipped: Counter | None = None,
) -> Iterator[tuple[int, Conversation]]:
    """Yield (line number, conversation) for each usable line of a chat JSONL file.

    on_error="raise": the first bad line raises ValueError naming `file:line`. on_error="skip": bad lines
    are counted into `skipped` (reason -> count), which the caller must pass in to see them.
    """
    check_thinking(thinking)
    check_on_error(on_error)
    if on_error == "skip" and skipped is None:
        raise ValueError("on_error='skip' needs a `skipped` Counter to count the skipped lines into")
    num_lines = 0  # non-blank ones
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's error, not the whole file's
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            num_lines += 1
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadLineError("bad_utf8", f"invalid UTF-8 ({e.reason} at byte {e.start}); save the file "
                                       "as UTF-8") from None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadLineError("bad_json", f"malformed JSON ({e.msg} at column {e.colno})") from None
                messages = parse_conversation(record, thinking=thinking, require_assistant=require_assistant)
            except BadLineError as e:
                if on_error == "skip":
                    skipped[e.reason] += 1
                    continue
                raise line_error(path, line_no, e) from None
            yield line_no, messages
    if num_lines == 0:
        raise ValueError(f"{path} is empty (no line but blank ones); pass the chat JSONL file that holds the "
                         "conversations, one per line")


def line_error(path: str | Path, line_no: int, error: BadLineError) -> BadLineError:
    """The error to raise for a bad line: where, what, and how to go on."""
    return BadLineError(
        error.reason,
        f"{path}:{line_no}: {error} [{error.reason}]. Fix this line, or set data.on_error=skip "
        f"(--on-error skip) to skip bad lines and count them by reason.",
    )


def read_chat_jsonl(
    path: str | Path, *, thinking: str = "keep", on_error: str = "raise", require_assistant: bool = True
) -> tuple[list[Conversation], dict[str, int]]:
    """All conversations of a chat JSONL file, and the skipped-line counts by reason (empty unless skip)."""
    skipped: Counter = Counter()
    conversations = [
        messages
        for _, messages in iter_chat_jsonl(
            path, thinking=thinking, on_error=on_error, require_assistant=require_assistant, skipped=skipped
        )
    ]
    return conversations, dict(skipped)


def template_messages(messages: Conversation) -> Conversation:
    """The messages as a chat template is given them: without our `truncated` mark, which is no template's key."""
    return [{k: v for k, v in m.items() if k != "truncated"} for m in messages]


def chat_line(messages: Conversation) -> str:
    """One OpenAI-form JSONL line: role, content and the MESSAGE_FIELDS each message holds (`"truncated": true` on
    a cut reply)."""
    records = [{"role": m["role"], "content": m["content"], **{k: m[k] for k in MESSAGE_FIELDS if k in m}}
               for m in messages]
    return json.dumps({"messages": records}, ensure_ascii=False) + "\n"


def write_chat_jsonl(path: str | Path, conversations: list[Conversation]) -> None:
    """Write conversations as OpenAI-form JSONL (`{"messages": [...]}` per line, see chat_line), UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(chat_line(messages))

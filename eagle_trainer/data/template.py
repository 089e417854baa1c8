"""Render a conversation with its chat template and build the loss mask from renderings alone.

The mask covers what the model generates in each assistant turn: its think block, content and tool calls as the
template renders them, through the special token that ends the turn. Not the header the serving engine writes into
the prompt, and no other role's text (a tool's response included). A reply marked `truncated` (cut at regeneration's
token cap, data/chat.py) did not end there: the end-of-turn token rendered after it is not learned.

No marker is written here; the spans come from renderings with the template itself. The conversation is rendered
once, and that text is tokenised and trained. For each assistant message i:

    body     the conversation rendered again with message i replaced by one whose content is a sentinel (a character
             the text does not hold) differs from the text in [first, last): what the template renders of message
             i's fields (think block, content, tool calls); before and after it, the text does not depend on them
    header   the generation prompt for message i (messages[:i] rendered with and without add_generation_prompt: the
             difference), less a trailing empty think block, found backwards from `first`: the turn starts after it
    think    an empty think block right after the header (`<think>\\n\\n</think>\\n\\n`, before the content of a Qwen3
             reply without reasoning) follows `empty_think`: auto masks it when the generation prompt holds it (the
             served model never generates it: Qwen3 with enable_thinking=False) and trains it otherwise; mask and
             train always do so
    end      after `last`, past whitespace, a special token must follow: the end of turn the model emits

Why one rendering of the whole conversation rather than renderings of its prefixes: a template may render a turn
differently once later messages follow it. Qwen3's renders the think block (reasoning_content) only for assistant
turns after the last user query, so messages[:i + 1] rendered alone shows a think block for turn i that the whole
conversation drops, and prefix renderings are not prefixes of the text. Here every position is taken in the whole
conversation's own text: the sentinel rendering differs from it in message i alone, and the generation prompt is a
difference of two renderings of the same prefix, which does not depend on how the template renders earlier turns.
Each turn is trained as the conversation shows it (an earlier Qwen3 turn without its dropped reasoning).

reasoning_content, tool_calls and tool messages reach the template as they are. A conversation holding one that the
template never renders (a probe conversation rendered once per template) is refused naming it, rather than trained
without it.

Shapes: T tokens; input_ids [T] and loss_mask [T] as python lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.meta
from jinja2.ext import Extension

from eagle_trainer.data.chat import BadLineError, Conversation, template_messages

EMPTY_THINK_POLICIES = ("auto", "mask", "train")
SET_BY_TRAINER = ("messages", "add_generation_prompt")  # template variables no chat_template_kwargs may set

_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
_TRAILING_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*\Z")
_SPACE = re.compile(r"\s*")
_PROBE = "zqxprobe"


def _call(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": {}}}


# Per optional field: a conversation whose rendering holds _PROBE when the template renders that field.
_PROBES = {
    "reasoning_content": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a", "reasoning_content": _PROBE}],
    "tool_calls": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "", "tool_calls": [_call(_PROBE)]}],
    "tool messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "", "tool_calls": [_call("f")]},
                      {"role": "tool", "content": _PROBE}],
}
# And the fix a refusal offers.
_TOOLS_FIX = "use a template that supports tools (data.chat_template=PATH) or drop the tool messages"
_FIXES = {"reasoning_content": "use a template that renders it (data.chat_template=PATH) or drop it "
                               "(data.thinking=strip)",
          "tool_calls": _TOOLS_FIX, "tool messages": _TOOLS_FIX}


@dataclass
class ChatTemplate:
    """How conversations are rendered: the jinja template, its keyword arguments and the empty-think policy."""

    source: str
    kwargs: dict = field(default_factory=dict)  # chat_template_kwargs, e.g. {"enable_thinking": False}
    empty_think: str = "auto"  # auto | mask | train
    renders: dict = field(default_factory=dict, repr=False)  # optional field -> whether the template renders it


@dataclass
class TokenizedConversation:
    input_ids: list[int]  # [T]
    loss_mask: list[bool]  # [T] True on what each assistant turn generates, its end-of-turn token (unless cut)
    num_original_tokens: int  # length before truncation to max_length

    @property
    def truncated(self) -> bool:
        """Cut to max_length (not a `truncated` reply, which is a message's mark)."""
        return len(self.input_ids) < self.num_original_tokens


class _GenerationTag(Extension):
    """Parses HF's `{% generation %}...{% endgeneration %}` blocks, so a template using them can be inspected."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def template_variables(source: str) -> set[str]:
    """The variables a jinja chat template reads without setting them (messages, add_generation_prompt, ...)."""
    env = jinja2.Environment(extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    try:
        return jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid jinja ({e.message}, line {e.lineno}); fix it or pass "
                         "another one") from None


def check_template_kwargs(source: str, kwargs: dict, key: str = "data.chat_template_kwargs") -> None:
    """Refuse a keyword argument the template never reads (a typo would be silently ignored) or one set here."""
    variables = template_variables(source)
    for name in kwargs:
        if name in SET_BY_TRAINER:
            raise ValueError(f"{key} sets {name!r}, which is set for each rendering; drop it")
        if name not in variables:
            raise ValueError(f"{key} sets {name!r}, which the chat template never reads (it reads "
                             f"{', '.join(sorted(variables))}); fix the name or drop it")


def read_chat_template(path: str, key: str = "data.chat_template") -> str:
    """The text of a jinja chat template file."""
    if not Path(path).is_file():
        raise ValueError(f"{key}={path!r} is not a file; pass the path of a jinja chat template (e.g. a checkpoint's "
                         "chat_template.jinja)")
    return Path(path).read_text(encoding="utf-8")


def load_chat_template(tokenizer, path: str | None = None, kwargs: dict | None = None,
                       empty_think: str = "auto") -> ChatTemplate:
    """data.chat_template (a jinja file), else the tokenizer's own template, with data.chat_template_kwargs and
    data.empty_think, checked."""
    if empty_think not in EMPTY_THINK_POLICIES:
        raise ValueError(f"data.empty_think={empty_think!r} is not understood; use one of {EMPTY_THINK_POLICIES}")
    kwargs = dict(kwargs or {})
    if path is not None:
        source = read_chat_template(path)
    else:
        try:
            source = tokenizer.get_chat_template(None, kwargs.get("tools"))
        except ValueError:
            raise ValueError("the tokenizer has no chat template (a base model?) to render conversations with; set "
                             "data.chat_template=PATH to a jinja chat template") from None
    check_template_kwargs(source, kwargs)
    return ChatTemplate(source, kwargs, empty_think)


def set_chat_template(tokenizer, path: str | None, kwargs: dict | None = None, key: str = "--chat-template") -> None:
    """For the commands that render with the tokenizer itself (regenerate, synthesize): its chat template replaced by
    the file at `path` when given, and `kwargs` checked against the template it then has."""
    if path is not None:
        tokenizer.chat_template = read_chat_template(path, key)
    if kwargs and tokenizer.chat_template:
        check_template_kwargs(tokenizer.get_chat_template(None, kwargs.get("tools")), kwargs, f"{key}-kwargs")


def render(tokenizer, template: ChatTemplate, messages: Conversation, generation_prompt: bool = False) -> str:
    """The messages as text, rendered by the template (with the generation prompt when asked)."""
    try:
        return tokenizer.apply_chat_template(template_messages(messages), chat_template=template.source,
                                             tokenize=False, add_generation_prompt=generation_prompt,
                                             **template.kwargs)
    except jinja2.TemplateError as e:
        raise BadLineError("template_error", f"the chat template fails on this conversation ({e})") from None


def check_rendered_fields(tokenizer, template: ChatTemplate, messages: Conversation) -> None:
    """Refuse a conversation holding reasoning_content, tool_calls or tool messages the template never renders."""
    used = {"reasoning_content": any(m.get("reasoning_content") for m in messages),
            "tool_calls": any(m.get("tool_calls") for m in messages),
            "tool messages": any(m["role"] == "tool" for m in messages)}
    for name, probe in _PROBES.items():
        if not used[name]:
            continue
        if name not in template.renders:
            try:
                template.renders[name] = _PROBE in render(tokenizer, template, probe)
            except BadLineError:  # a template that fails on the probe renders none of it either
                template.renders[name] = False
        if not template.renders[name]:
            raise BadLineError(f"unrendered_{name.replace(' ', '_')}", f"the chat template renders no {name}; "
                               f"{_FIXES[name]}")


def generation_prompt(tokenizer, template: ChatTemplate, history: Conversation) -> str:
    """What the serving engine appends to `history` for the model to answer: the template's generation prompt."""
    history = history or [{"role": "user", "content": "q"}]  # a conversation that opens with a reply
    bare = render(tokenizer, template, history)
    prompted = render(tokenizer, template, history, generation_prompt=True)
    if not prompted.startswith(bare):
        raise BadLineError("template_mismatch", "the chat template renders a history differently when it adds the "
                           "generation prompt, so the prompt a reply follows is unknown; use another template "
                           "(data.chat_template=PATH)")
    return prompted[len(bare):]


def _common_prefix(a: str, b: str) -> int:
    """len of the longest common prefix, by bisection over slice comparisons (C speed, not a loop per character)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    """len of the longest common suffix, at most `limit`."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def special_tokens(tokenizer) -> list[str]:
    """The special tokens' texts, longest first (eos, pad, ... and added tokens marked special)."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(added | set(tokenizer.all_special_tokens), key=len, reverse=True)


def assistant_spans(tokenizer, template: ChatTemplate, messages: Conversation, text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of `text` (the rendered conversation) that each assistant turn generates:
    past its header, through its end-of-turn token (the module docstring says how they are found)."""
    specials = special_tokens(tokenizer)
    sentinel = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)  # Unicode private use
    spans, done = [], 0
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for k, i in enumerate(turns):
        other = render(tokenizer, template, [*messages[:i], {"role": "assistant", "content": sentinel},
                                             *messages[i + 1:]])
        if other.count(sentinel) != 1:
            raise BadLineError("template_mismatch", f"the chat template renders an assistant message's content "
                               f"{other.count(sentinel)} times, not once; use another template "
                               "(data.chat_template=PATH)")
        first = _common_prefix(text, other)
        last = len(text) - _common_suffix(text, other, min(len(text), len(other)) - first)
        prompt = generation_prompt(tokenizer, template, messages[:i])
        header = _TRAILING_EMPTY_THINK.sub("", prompt)
        at = text.rfind(header, done, first) if header else -1
        if at < 0:
            raise BadLineError("template_mismatch", f"assistant turn {k + 1} is not rendered after the chat "
                               f"template's generation prompt {prompt!r}; use a template whose replies follow it "
                               "(data.chat_template=PATH)")
        start = at + len(header)
        think = _EMPTY_THINK.match(text, start, last)
        in_prompt = header != prompt
        if think and (template.empty_think == "mask" or (template.empty_think == "auto" and in_prompt)):
            start = think.end()
        end = last if messages[i].get("truncated") else _end_of_turn(text, last, specials, k)
        spans.append((start, end))
        done = end
    return spans


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the tokenizer's chat template ends an assistant turn with (ChatML's `<|im_end|>`, Llama-3's
    `<|eot_id|>`), found by rendering one short reply; None without a template, or where its turns end otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        template = load_chat_template(tokenizer)
        text = render(tokenizer, template, probe)
        (_, end), = assistant_spans(tokenizer, template, probe, text)
    except (BadLineError, ValueError):
        return None
    return next((s for s in special_tokens(tokenizer) if text.endswith(s, 0, end)), None)


def _end_of_turn(text: str, last: int, specials: list[str], k: int) -> int:
    """The end of the special token that closes a turn whose body ends at `last` (whitespace may come first)."""
    at = _SPACE.match(text, last).end()
    token = next((s for s in specials if text.startswith(s, at)), None)
    if token is None:
        raise BadLineError("template_mismatch", f"the chat template follows assistant turn {k + 1} with "
                           f"{text[last:last + 40]!r}, not with a special token that ends the turn; use a template "
                           "whose turns end with one (data.chat_template=PATH)")
    return at + len(token)


def tokenize_conversation(
    tokenizer, messages: Conversation, *, max_length: int | None = None, template: ChatTemplate | None = None
) -> TokenizedConversation:
    """Token ids and loss mask of one conversation; keeps the first `max_length` tokens when given.

    `template`: how to render it (default: the tokenizer's own chat template, no keyword arguments, empty_think
    auto). A `truncated` assistant message's span ends with its body: its end-of-turn token is no loss token.
    Raises BadLineError when the template fails on the conversation, renders none of a field it holds, or renders
    its replies where they cannot be found (module docstring).
    """
    template = template if template is not None else load_chat_template(tokenizer)
    check_rendered_fields(tokenizer, template, messages)
    text = render(tokenizer, template, messages)
    spans = assistant_spans(tokenizer, template, messages, text)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    input_ids = list(enc["input_ids"])
    loss_mask = [False] * len(input_ids)
    # Offsets and spans are both sorted, so one forward walk over the spans suffices.
    i_span = 0
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        while i_span < len(spans) and spans[i_span][1] <= start:
            i_span += 1
        if i_span == len(spans):
            break
        span_start, span_end = spans[i_span]
        loss_mask[i] = span_start <= start and end <= span_end and end > start
    num_original = len(input_ids)
    if max_length is not None and num_original > max_length:
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    return TokenizedConversation(input_ids, loss_mask, num_original)


"""Render a conversation with the tokenizer's own chat template and build its loss mask.

The mask is found in the rendered TEXT, not by re-implementing the template: every assistant turn starts
after the assistant header (`<|im_start|>assistant\\n` for Qwen3 / ChatML) and ends with the end-of-turn
marker (`<|im_end|>`). The text is then tokenised with character offsets, and a token is a loss token
when its character span lies inside an assistant turn's content or its end-of-turn marker. So the
end-of-turn token is learned (the draft must predict where the answer stops) and the header is not. A reply
marked `truncated` (cut at regeneration's token cap, data/chat.py) did not end there: its span stops at the end of
its content, and the end-of-turn marker the template renders after it is not learned.

Shapes: T tokens; input_ids [T] and loss_mask [T] as python lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from eagle_trainer.data.chat import BadLineError, Conversation, template_messages

ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"


@dataclass
class TokenizedConversation:
    input_ids: list[int]  # [T]
    loss_mask: list[bool]  # [T] True on assistant content tokens and their end-of-turn token (unless cut)
    num_original_tokens: int  # length before truncation to max_length

    @property
    def truncated(self) -> bool:
        """Cut to max_length (not a `truncated` reply, which is a message's mark)."""
        return len(self.input_ids) < self.num_original_tokens


def render_conversation(tokenizer, messages: Conversation, **template_kwargs) -> str:
    """The conversation as text, rendered by the tokenizer's chat template (no generation prompt)."""
    return tokenizer.apply_chat_template(template_messages(messages), tokenize=False, **template_kwargs)


def find_assistant_spans(
    text: str, *, assistant_header: str = ASSISTANT_HEADER, end_of_turn: str = END_OF_TURN
) -> list[tuple[int, int]]:
    """[start, end) character spans of each assistant turn: content start through the end-of-turn marker."""
    spans = []
    pos = text.find(assistant_header)
    while pos >= 0:
        start = pos + len(assistant_header)
        close = text.find(end_of_turn, start)
        if close < 0:
            raise BadLineError(
                "template_mismatch",
                f"an assistant turn at character {start} of the rendered text has no end-of-turn {end_of_turn!r}",
            )
        end = close + len(end_of_turn)
        spans.append((start, end))
        pos = text.find(assistant_header, end)
    return spans


def tokenize_conversation(
    tokenizer,
    messages: Conversation,
    *,
    max_length: int | None = None,
    assistant_header: str = ASSISTANT_HEADER,
    end_of_turn: str = END_OF_TURN,
) -> TokenizedConversation:
    """Token ids and loss mask of one conversation; keeps the first `max_length` tokens when given.

    A `truncated` assistant message's span ends with its content: its end-of-turn token is no loss token.
    Raises BadLineError("template_mismatch") when the number of assistant headers found in the rendered
    text differs from the number of assistant messages: the template does not use these markers (pass the
    right `assistant_header` / `end_of_turn`), or a message's content itself contains one of them.
    """
    text = render_conversation(tokenizer, messages)
    spans = find_assistant_spans(text, assistant_header=assistant_header, end_of_turn=end_of_turn)
    num_assistant = sum(m["role"] == "assistant" for m in messages)
    if len(spans) != num_assistant:
        raise BadLineError(
            "template_mismatch",
            f"found {len(spans)} assistant headers {assistant_header!r} in the rendered text for {num_assistant} "
            f"assistant messages; pass the chat template's own assistant header / end-of-turn markers, "
            f"or remove the markers from the message content",
        )
    cut = [bool(m.get("truncated")) for m in messages if m["role"] == "assistant"]
    spans = [(start, end - len(end_of_turn) if c else end) for (start, end), c in zip(spans, cut)]
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

"""Regenerate assistant turns with the target itself, so the draft learns the distribution it will serve.

Each assistant turn is replaced by the target's own answer given the history so far, in which the earlier
assistant turns are already the regenerated ones. A conversation that does not end with an assistant turn
(e.g. a lone user prompt) gets one appended. Generation is batched across conversations: round r
generates the r-th assistant turn of every conversation in the batch that has one, with left padding.

Shapes: B prompts in a round, P padded prompt length, N new tokens; input_ids / attention_mask [B, P].
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from eagle_trainer.data.chat import Conversation
from eagle_trainer.data.template import END_OF_TURN


def _plan(messages: Conversation) -> tuple[Conversation, list[int]]:
    """A copy of the conversation, ending with an assistant turn, and the indices of its assistant turns."""
    work = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not work:
        raise ValueError("an empty conversation cannot be regenerated; it needs at least a user turn")
    if work[-1]["role"] != "assistant":
        work.append({"role": "assistant", "content": ""})
    return work, [i for i, m in enumerate(work) if m["role"] == "assistant"]


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)  # [B, P]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.int64)
        attention_mask[row, width - len(p) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def stop_token_ids(tokenizer, end_of_turn: str = END_OF_TURN) -> list[int]:
    """The end-of-turn id, plus the tokenizer's eos when that is a different token (base-model tokenizers)."""
    ids = []
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if end_id is not None and end_id != tokenizer.unk_token_id:
        ids.append(end_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"the tokenizer knows neither {end_of_turn!r} nor an eos token; pass end_of_turn")
    return ids


@torch.inference_mode()
def generate_replies(
    model, tokenizer, histories: list[Conversation], *, max_new_tokens: int, temperature: float, top_p: float,
    end_of_turn: str = END_OF_TURN, chat_template_kwargs: dict | None = None,
) -> list[str]:
    """The target's next assistant turn for each history, as text without the end-of-turn marker."""
    stop_ids = stop_token_ids(tokenizer, end_of_turn)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    texts = [
        tokenizer.apply_chat_template(h, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {}))
        for h in histories
    ]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    input_ids, attention_mask = _left_pad(prompts, pad_id, model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None
    )
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
        pad_token_id=pad_id, **sampling,
    )
    replies = []
    for new in out[:, input_ids.shape[1] :].tolist():  # [B, N]
        stop = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
        text = tokenizer.decode(new[:stop], skip_special_tokens=False)
        replies.append(text.removesuffix(end_of_turn))
    return replies


def regenerate(
    model,
    tokenizer,
    conversations: list[Conversation],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    end_of_turn: str = END_OF_TURN,
    chat_template_kwargs: dict | None = None,
) -> list[Conversation]:
    """New conversations whose assistant turns are the target's own; greedy when temperature is 0.

    Runs on the model's device. `chat_template_kwargs` go to the chat template when rendering prompts
    (e.g. {"enable_thinking": False} for Qwen3). The inputs are not modified.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must both be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    torch.manual_seed(seed)
    model.eval()
    plans = [_plan(messages) for messages in conversations]
    bar = tqdm(total=sum(len(turns) for _, turns in plans), desc="regenerate", unit="turn", disable=not progress)
    for start in range(0, len(plans), batch_size):
        chunk = plans[start : start + batch_size]
        for r in range(max(len(turns) for _, turns in chunk)):
            active = [(work, turns[r]) for work, turns in chunk if r < len(turns)]
            replies = generate_replies(
                model, tokenizer, [work[:i] for work, i in active], max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, end_of_turn=end_of_turn,
                chat_template_kwargs=chat_template_kwargs,
            )
            for (work, i), reply in zip(active, replies):
                work[i]["content"] = reply
            bar.update(len(active))
    bar.close()
    return [work for work, _ in plans]

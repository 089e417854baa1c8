"""Regenerate assistant turns with the target itself, so the draft learns the distribution it will serve.

Each assistant turn is replaced by the target's own answer given the history so far, in which the earlier
assistant turns are already the regenerated ones. A conversation that does not end with an assistant turn
(e.g. a lone user prompt) gets one appended. Generation is batched across conversations: round r
generates the r-th assistant turn of every conversation in the batch that has one.

Decoding is a plain loop over `model(...)`, so that a target sharded over ranks (whose forwards are collectives,
kept in step by a hook on its backbone) decodes as a whole one does:

    prefill    all prompts at once, left-padded; position_ids from the mask's cumsum; logits of the last token only
    decode     one token per row per forward, through a KV cache: HF's DynamicCache (DynamicSteps; any target:
               Qwen3, Qwen3-MoE, Qwen3-Next), or a StaticCache with masks built here (StaticSteps; full-attention
               targets), whose decode step can be captured once as a CUDA graph and replayed
    pick       greedy when temperature is 0, else a draw with counter-based randomness (data/sampling.py): a
               conversation gets the same reply in any batch, on any number of ranks, and after a resume
    stop       a row at its first stop id or at its cap, min(max_new_tokens, context - prompt length); the batch
               when every row has stopped (checked every STOP_CHECK_EVERY steps on a GPU, so the host does not
               wait for the device after every token). A reply cut at its cap is marked `"truncated": True`, so
               that training learns no end-of-turn where the target would have gone on (data/template.py)

Shapes: B rows in a round, P padded prompt length, N new tokens, V vocab; input_ids / attention_mask [B, P].
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from tqdm.auto import tqdm

from eagle_trainer.data.chat import Conversation, template_messages
from eagle_trainer.data.sampling import Sampling, row_keys, sample_next
from eagle_trainer.data.template import end_of_turn_token

END_OF_TURN = "<|im_end|>"  # the stop token beside the eos when the chat template names none: ChatML's
STOP_CHECK_EVERY = 8  # decode steps between the host's looks at "every row stopped" on a GPU (1 on the CPU)


def stop_token_ids(tokenizer, end_of_turn: str | None = None) -> list[int]:
    """The end-of-turn id, plus the tokenizer's eos when that is a different token (base-model tokenizers).

    `end_of_turn` None: the token the tokenizer's chat template closes a reply with (data/template.py), else
    END_OF_TURN."""
    end_of_turn = end_of_turn or end_of_turn_token(tokenizer) or END_OF_TURN
    ids = []
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if end_id is not None and end_id != tokenizer.unk_token_id:
        ids.append(end_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"the tokenizer knows neither {end_of_turn!r} nor an eos token; pass end_of_turn")
    return ids


def context_length(config) -> int | None:
    """The target's context (max_position_embeddings), or None when its config names none."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def prompt_too_long(index: int, length: int, context: int, turn: int = 0) -> ValueError:
    where = f"conversation {index} of the input" + (f" (assistant turn {turn})" if turn else "")
    return ValueError(f"{where} has a prompt of {length} tokens, which reaches the target's context of {context} "
                      "tokens (max_position_embeddings) and leaves no room for a reply; shorten that conversation or "
                      "drop it from the data")


def _plan(messages: Conversation) -> tuple[Conversation, list[int]]:
    """A copy of the conversation, ending with an assistant turn, and the indices of its assistant turns. An assistant
    turn keeps only its content, which its regeneration replaces (the generated text holds any reasoning and tool
    calls as the target wrote them); the other messages are kept whole (a tool message's name and call id)."""
    work = [{"role": m["role"], "content": m["content"]} if m["role"] == "assistant" else dict(m) for m in messages]
    if not work:
        raise ValueError("an empty conversation cannot be regenerated; it needs at least a user turn")
    if work[-1]["role"] != "assistant":
        work.append({"role": "assistant", "content": ""})
    return work, [i for i, m in enumerate(work) if m["role"] == "assistant"]


def render_prompt(tokenizer, history: Conversation, chat_template_kwargs: dict | None = None) -> list[int]:
    """The ids of `history` rendered with the generation prompt: what the target continues."""
    text = tokenizer.apply_chat_template(template_messages(history), tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_prompt_lengths(tokenizer, conversations: list[Conversation], ids: list[int], context: int | None,
                         chat_template_kwargs: dict | None = None) -> None:
    """Refuse a first-turn prompt that fills the context on its own (needs the tokenizer only, not the target).
    Later turns are checked as they are reached: their history holds replies not generated yet."""
    if context is None:
        return
    for index, messages in zip(ids, conversations):
        work, turns = _plan(messages)
        length = len(render_prompt(tokenizer, work[: turns[0]], chat_template_kwargs))
        if length >= context:
            raise prompt_too_long(index, length, context)


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)  # [B, P]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.int64)
        attention_mask[row, width - len(p) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def cache_argument(model) -> str:
    """The name model.forward takes its KV cache by: `past_key_values`, renamed `cache` in later transformers 5."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class DynamicSteps:
    """Forwards through an HF DynamicCache, the 2D padding mask growing a column a step: any target, sharded or
    whole (HF builds the 4D masks)."""

    def __init__(self, model, attention_mask: torch.Tensor, num_steps: int):
        from transformers import DynamicCache
        self.model, self.mask = model, attention_mask  # [B, P]
        self.kwargs = {cache_argument(model): DynamicCache(config=model.config), "use_cache": True, "logits_to_keep": 1}

    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=position_ids,
                          **self.kwargs).logits[:, -1]

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token, position [B, 1] -> the next logits [B, V]."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.model(input_ids=token, attention_mask=self.mask, position_ids=position, **self.kwargs).logits[:, -1]


class StaticSteps:
    """Forwards through an HF StaticCache of P + N slots with the 4D boolean masks built here, so that no step reads
    the cache's length on the host: the decode step can be captured once as a CUDA graph and replayed
    (`graph`, a whole target on a GPU). Targets whose layers are all full attention (Qwen3, Qwen3-MoE).

    Slot j of row b holds a real token when keys_real[b, j]; a step's query attends to the real slots written so
    far. A padding query of the prefill attends to itself alone, so that no row of its softmax is empty (NaN).
    """

    def __init__(self, model, attention_mask: torch.Tensor, num_steps: int, graph: bool = False):
        from transformers import StaticCache
        check_static_target(model.config)
        num_rows, width = attention_mask.shape
        self.model, self.slot, self.graph = model, width, graph
        self.kwargs = {cache_argument(model): StaticCache(config=model.config, max_cache_len=width + num_steps),
                       "use_cache": True, "logits_to_keep": 1}
        self.keys_real = torch.zeros((num_rows, width + num_steps), dtype=torch.bool, device=attention_mask.device)
        self.keys_real[:, :width] = attention_mask.bool()  # [B, L]
        self.token = torch.zeros((num_rows, 1), dtype=torch.int64, device=attention_mask.device)
        self.position = torch.zeros_like(self.token)
        self.captured = None  # (the CUDA graph of one step, its logits)
        self.eager_steps = 0

    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        width, slots = input_ids.shape[1], self.keys_real.shape[1]
        query = torch.arange(width, device=input_ids.device)[:, None]
        key = torch.arange(slots, device=input_ids.device)[None, :]
        mask = ((key <= query) & self.keys_real[:, None, :]) | (key == query)  # [B, P, L]
        return self.model(input_ids=input_ids, attention_mask=mask[:, None], position_ids=position_ids,
                          **self.kwargs).logits[:, -1]

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.token, attention_mask=self.keys_real[:, None, None, :],
                          position_ids=self.position, **self.kwargs).logits[:, -1]

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.keys_real[:, self.slot] = True  # the slot this step's token is written to (the cache counts on device)
        self.slot += 1
        self.token.copy_(token)
        self.position.copy_(position)
        if not self.graph or self.eager_steps == 0:  # one eager step first: kernels compiled, lazy state made
            self.eager_steps += 1
            return self._forward()
        if self.captured is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step without running it
                logits = self._forward()
            self.captured = graph, logits
        graph, logits = self.captured
        graph.replay()
        return logits


def check_static_target(config) -> None:
    kinds = set(getattr(config.get_text_config(), "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"a static KV cache (decode=static or graph) needs a target whose layers are all full "
                         f"attention, but this one has {sorted(kinds)}; use decode=eager")


DECODE_MODES = ("eager", "static", "graph")


def decode_steps(model, attention_mask: torch.Tensor, num_steps: int, mode: str):
    if mode not in DECODE_MODES:
        raise ValueError(f"decode={mode!r} is not one of {DECODE_MODES}")
    if mode == "graph" and attention_mask.device.type != "cuda":
        raise ValueError(f"decode=graph captures CUDA graphs, but the target is on {attention_mask.device}; use "
                         "decode=static or eager")
    if mode == "eager":
        return DynamicSteps(model, attention_mask, num_steps)
    return StaticSteps(model, attention_mask, num_steps, graph=mode == "graph")


@torch.no_grad()
def decode(model, prompts: list[list[int]], caps: list[int], stop_ids: list[int], pad_id: int,
           pick: Callable[[torch.Tensor, int], torch.Tensor], mode: str = "eager") -> list[list[int]]:
    """The new ids of each prompt: up to and including its first stop id, at most caps[b] of them.

    `pick(logits [B, V], step)` -> [B] chooses each step's ids. Every forward is a `model(...)` call (see the
    module docstring); rows that stopped go on being fed `pad_id` until the whole batch stops. `mode`: eager
    (DynamicSteps), static or graph (StaticSteps).
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(prompts, pad_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    last_position = (context_length(model.config) or 2**62) - 1
    num_rows, num_steps = len(prompts), max(caps)
    cap = torch.tensor(caps, device=device)
    stops = torch.tensor(stop_ids, dtype=torch.int64, device=device)
    out = torch.full((num_rows, num_steps), pad_id, dtype=torch.int64, device=device)  # [B, N]
    done = torch.zeros(num_rows, dtype=torch.bool, device=device)
    check_every = STOP_CHECK_EVERY if device.type == "cuda" else 1
    steps = decode_steps(model, attention_mask, num_steps, mode)
    logits = steps.prefill(input_ids, position_ids)  # [B, V]
    position = position_ids[:, -1:]  # [B, 1]
    for step in range(num_steps):
        token = torch.where(done, pad_id, pick(logits, step))  # [B]
        out[:, step] = token
        done |= torch.isin(token, stops) | (step + 1 >= cap)
        if step + 1 == num_steps or ((step + 1) % check_every == 0 and bool(done.all())):
            break
        position = (position + 1).clamp(max=last_position)  # a stopped row may run past its cap; its ids are unused
        logits = steps.step(token[:, None], position)
    rows = []
    for row, n in zip(out.tolist(), caps):
        row = row[:n]
        end = next((i for i, t in enumerate(row) if t in stop_ids), len(row) - 1)
        rows.append(row[: end + 1])
    return rows


def generate_replies(
    model, tokenizer, histories: list[Conversation], ids: list[int], turn: int, sampling: Sampling, *,
    end_of_turn: str | None = None, chat_template_kwargs: dict | None = None, decode_mode: str = "eager",
) -> tuple[list[str], list[bool], int]:
    """The target's next assistant turn for each history, as text without the end-of-turn marker; whether each
    was cut at its cap (no stop id); and the number of ids generated. ids[b]: history b's conversation index (its
    sampling key); turn: which assistant turn."""
    end_of_turn = end_of_turn or end_of_turn_token(tokenizer) or END_OF_TURN
    stop_ids = stop_token_ids(tokenizer, end_of_turn)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompts = [render_prompt(tokenizer, h, chat_template_kwargs) for h in histories]
    context = context_length(model.config)
    caps = []
    for index, prompt in zip(ids, prompts):
        if context is not None and len(prompt) >= context:
            raise prompt_too_long(index, len(prompt), context, turn)
        caps.append(sampling.max_new_tokens if context is None else min(sampling.max_new_tokens, context - len(prompt)))
    if sampling.temperature > 0:
        keys = row_keys(sampling.seed, torch.tensor(ids, device=next(model.parameters()).device), turn)
        pick = lambda logits, step: sample_next(logits, keys, step, sampling)  # noqa: E731
    else:
        pick = lambda logits, step: logits.argmax(-1)  # noqa: E731
    new = decode(model, prompts, caps, stop_ids, pad_id, pick, decode_mode)
    replies, cut = [], []
    for row in new:
        stopped = bool(row) and row[-1] in stop_ids
        replies.append(tokenizer.decode(row[:-1] if stopped else row, skip_special_tokens=False)
                       .removesuffix(end_of_turn))
        cut.append(not stopped)
    return replies, cut, sum(len(row) for row in new)


def regenerate_batch(
    model, tokenizer, conversations: list[Conversation], ids: list[int], sampling: Sampling, *,
    end_of_turn: str | None = None, chat_template_kwargs: dict | None = None,
    on_turns: Callable[[int], None] | None = None, decode_mode: str = "eager",
) -> tuple[list[Conversation], int]:
    """One batch, every round: (the regenerated conversations, the number of ids generated). ids[b]: conversation
    b's index in the input, which keys its sampling. on_turns(n) is told of each round's n finished turns. A reply
    cut at its cap carries `"truncated": True`; a later turn's history holds it as it is."""
    model.eval()
    plans = [_plan(messages) for messages in conversations]
    num_new = 0
    for r in range(max((len(turns) for _, turns in plans), default=0)):
        active = [(work, turns[r], index) for (work, turns), index in zip(plans, ids) if r < len(turns)]
        replies, cut, n = generate_replies(
            model, tokenizer, [work[:i] for work, i, _ in active], [index for *_, index in active], r, sampling,
            end_of_turn=end_of_turn, chat_template_kwargs=chat_template_kwargs, decode_mode=decode_mode,
        )
        num_new += n
        for (work, i, _), reply, was_cut in zip(active, replies, cut):
            work[i]["content"] = reply
            if was_cut:
                work[i]["truncated"] = True
        if on_turns is not None:
            on_turns(len(active))
    return [work for work, _ in plans], num_new


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
    end_of_turn: str | None = None,
    chat_template_kwargs: dict | None = None,
    ids: list[int] | None = None,
    decode_mode: str = "eager",
) -> list[Conversation]:
    """New conversations whose assistant turns are the target's own; greedy when temperature is 0. A reply cut at
    max_new_tokens (or the context) before a stop id carries `"truncated": True`.

    Runs on the model's device. `chat_template_kwargs` go to the chat template when rendering prompts
    (e.g. {"enable_thinking": False} for Qwen3). `ids`: each conversation's index in its input file, which keys
    its sampling (default 0, 1, ...). `decode_mode`: eager (any target), static or graph (a static KV cache;
    graph replays the decode step as a CUDA graph: a whole full-attention target on a GPU). The inputs are not
    modified.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    ids = list(range(len(conversations))) if ids is None else list(ids)
    if len(ids) != len(conversations):
        raise ValueError(f"{len(ids)} ids for {len(conversations)} conversations; pass one id per conversation")
    out = []
    with tqdm(total=sum(len(_plan(m)[1]) for m in conversations), desc="regenerate", unit="turn",
              disable=not progress) as bar:
        for start in range(0, len(conversations), batch_size):
            done, _ = regenerate_batch(
                model, tokenizer, conversations[start : start + batch_size], ids[start : start + batch_size],
                sampling, end_of_turn=end_of_turn, chat_template_kwargs=chat_template_kwargs, on_turns=bar.update,
                decode_mode=decode_mode,
            )
            out += done
    return out

"""User prompts written by the target itself (the Magpie method), for users who have no prompt data.

An instruct target fed only the text its chat template puts before a user's words goes on with a user message of
its own, drawn from what it has learned users ask, and ends it with its end-of-turn token. `eagle-data regenerate`
then has the target answer the prompts kept.

    prefix     the chat template's rendering of one user turn whose content is a sentinel, cut at the sentinel:
               everything before a user's words, the template's default system turn included where it adds one
               when none is given (ChatML: `<|im_start|>user\\n`); or the caller's own text
    stop       the template's end-of-turn token (the special token that starts the text after the sentinel, e.g.
               `<|im_end|>`), or the caller's tokens; and the tokenizer's eos
    draws      data/regenerate.py's decode loop and data/sampling.py's counter-based sampler, keyed by the attempt
               index in a stream of its own (USER_TURN): attempt i writes the same text in any batch, on any number
               of ranks, and after a resume
    clean-up   PromptFilter, in attempt order: whitespace stripped; a sample is dropped when it is truncated (no stop
               id within the cap), holds a special token, is empty or shorter than min_chars, repeats a kept prompt
               after case and whitespace folding, or (dedup_jaccard) is a near-duplicate of one by the Jaccard
               similarity of their word n-gram sets. The prompts kept are so the first num_prompts survivors in
               attempt order, whatever the batching.

Shapes: B attempts in a batch; each row's prompt is the prefix's ids.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from jinja2 import TemplateError
from tqdm.auto import tqdm

from eagle_trainer.data.regenerate import context_length, decode
from eagle_trainer.data.sampling import Sampling, row_keys, sample_next

# Two contents no template rewrites: both must render at the same place for the cut to be the user turn's prefix.
SENTINELS = ("SentinelUserContentQ7", "SentinelUserContentZ3")
USER_TURN = -1  # the sampler's turn counter for user turns, apart from every assistant turn regeneration draws
DROP_REASONS = ("truncated", "special_token", "empty", "too_short", "duplicate", "near_duplicate")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Synthesis:
    """How many prompts, how they are drawn and what is kept. Temperature 1 draws from the target's own
    distribution of user turns, whose variety is the point; top-p 0.99 cuts only the far tail of unlikely ids,
    where garbled text comes from. A prompt cut at max_new_tokens is dropped, so the cap sits above most prompts."""

    num_prompts: int
    sampling: Sampling = field(default_factory=lambda: Sampling(max_new_tokens=512, temperature=1.0, top_p=0.99))
    max_attempts: int | None = None  # samples drawn at most; None: 4 x num_prompts
    min_chars: int = 16
    dedup_jaccard: float | None = 0.8  # near-duplicate threshold; None: exact duplicates only
    ngram: int = 3  # words per n-gram of the near-duplicate test

    def __post_init__(self):
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts={self.num_prompts} must be at least 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be at least 1")
        if self.sampling.temperature <= 0:
            raise ValueError(f"temperature={self.sampling.temperature}: greedy decoding of one prefix writes one "
                             "prompt; pass a temperature > 0 (1.0 samples the target's own distribution)")
        if self.min_chars < 0 or self.ngram < 1:
            raise ValueError(f"min_chars={self.min_chars} must be >= 0 and ngram={self.ngram} >= 1")
        if self.dedup_jaccard is not None and not 0 < self.dedup_jaccard <= 1:
            raise ValueError(f"dedup_jaccard={self.dedup_jaccard} must be in (0, 1], or None for exact duplicates "
                             "only")

    @property
    def attempt_cap(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 4 * self.num_prompts


@dataclass(frozen=True)
class UserTurn:
    """Where the target writes a user message: the text it continues and the tokens that end the message."""

    prefix: str
    stop_tokens: tuple[str, ...]  # the tokenizer's eos ends a message too (stop_ids)


PREFIX_FIX = ("pass --prefix TEXT, the text the target expects before a user's message, and --stop-token TOKEN, the "
              "token that ends one")


def template_user_turn(tokenizer, chat_template_kwargs: dict | None = None) -> tuple[str, str]:
    """(the text the chat template renders before a user message's content, the text after it) for a conversation
    of one user turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (a base model?), so no user turn to take the prompt "
                         f"prefix from; use an instruct model, or {PREFIX_FIX}")
    cuts = []
    for sentinel in SENTINELS:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                                 add_generation_prompt=False, **(chat_template_kwargs or {}))
        except TemplateError as e:
            raise ValueError(f"the chat template refuses a conversation of one user turn ({e}); {PREFIX_FIX}") from None
        if text.count(sentinel) != 1:
            raise ValueError(f"the chat template renders no user turn: a user message's content does not appear "
                             f"once in {text[:200]!r}; {PREFIX_FIX}")
        cut = text.index(sentinel)
        cuts.append((text[:cut], text[cut + len(sentinel) :]))
    if cuts[0] != cuts[1]:
        raise ValueError(f"the chat template renders a user turn whose surroundings depend on its content "
                         f"({cuts[0][0][-40:]!r} vs {cuts[1][0][-40:]!r}); {PREFIX_FIX}")
    return cuts[0]


def special_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens (eos, pad, ... and added ones marked special)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def end_of_turn_token(tokenizer, after: str) -> str:
    """The token that ends a user turn: the first of the text the template renders after a user's content."""
    ids = tokenizer(after.lstrip(), add_special_tokens=False)["input_ids"]
    if not ids or ids[0] not in special_ids(tokenizer):
        raise ValueError(f"the chat template follows a user message with {after[:40]!r}, which does not start with "
                         f"a special token to stop at; pass --stop-token TOKEN, the token that ends a user turn "
                         f"(the tokenizer's eos {tokenizer.eos_token!r} stops one too)")
    return tokenizer.convert_ids_to_tokens(ids[0])


def user_turn(tokenizer, *, prefix: str | None = None, stop_tokens: tuple[str, ...] = (),
              chat_template_kwargs: dict | None = None) -> UserTurn:
    """The prefix and stop tokens: each the caller's where given, else the chat template's."""
    if prefix is not None and stop_tokens:
        return UserTurn(prefix, tuple(stop_tokens))
    template_prefix, after = template_user_turn(tokenizer, chat_template_kwargs)
    return UserTurn(template_prefix if prefix is None else prefix,
                    tuple(stop_tokens) or (end_of_turn_token(tokenizer, after),))


def token_id(tokenizer, token: str) -> int:
    """The id of `token`, given as the vocabulary spells it (`<|im_end|>`) or as text that is one token ("\\n")."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is not None and (i != tokenizer.unk_token_id or token == tokenizer.unk_token):
        return i
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"stop token {token!r} is not one token of the tokenizer (its text encodes to {len(ids)} "
                         f"ids); pass a token of its vocabulary, e.g. {tokenizer.eos_token!r}")
    return ids[0]


def stop_ids(tokenizer, stop_tokens: tuple[str, ...]) -> list[int]:
    """The ids that end a user message: the stop tokens', then the eos when it is another."""
    ids = []
    for token in stop_tokens:
        if (i := token_id(tokenizer, token)) not in ids:
            ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prefix(tokenizer, prefix: str, context: int | None) -> list[int]:
    """The prefix's ids (as the template's text is tokenised: no special tokens added), checked against the context."""
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt prefix is empty; pass --prefix TEXT with the text before a user's message")
    if context is not None and len(ids) >= context:
        raise ValueError(f"the prompt prefix is {len(ids)} tokens, which reaches the target's context of {context} "
                         "tokens; pass a shorter --prefix")
    return ids


@dataclass(frozen=True)
class Sample:
    """One attempt's user message, before the clean-up."""

    attempt: int
    text: str  # decoded, without its stop id
    num_tokens: int  # ids generated, the stop id included
    stopped: bool  # ended at a stop id within the cap (else truncated)
    special: bool  # holds a special token before its end


@torch.no_grad()
def sample_user_turns(model, tokenizer, prefix_ids: list[int], attempts: list[int], sampling: Sampling,
                      stop: list[int], decode_mode: str = "eager") -> list[Sample]:
    """The target's continuation of the prefix for each attempt, sampled with the attempt's own counters."""
    model.eval()
    device = next(model.parameters()).device
    context = context_length(model.config)
    cap = sampling.max_new_tokens if context is None else min(sampling.max_new_tokens, context - len(prefix_ids))
    keys = row_keys(sampling.seed, torch.tensor(attempts, device=device), USER_TURN)  # [B]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    rows = decode(model, [prefix_ids] * len(attempts), [cap] * len(attempts), stop, pad_id,
                  lambda logits, step: sample_next(logits, keys, step, sampling), decode_mode)
    specials = special_ids(tokenizer)
    samples = []
    for attempt, row in zip(attempts, rows):
        stopped = bool(row) and row[-1] in stop
        body = row[:-1] if stopped else row
        samples.append(Sample(attempt, tokenizer.decode(body, skip_special_tokens=False), len(row), stopped,
                              any(i in specials for i in body)))
    return samples


def _gram_order(gram: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    """One fixed order of all n-grams (a hash, then the gram): rare and common grams mixed in every prefix."""
    return zlib.crc32("\x1f".join(gram).encode("utf-8")), gram


class PromptFilter:
    """The clean-up (module docstring): offered texts in order, the kept ones in `kept`, the others counted by
    reason in `dropped`.

    Near-duplicates by prefix filtering, exact: Jaccard(A, B) >= t needs |A & B| >= ceil(t * max(|A|, |B|)), so A's
    first |A| - ceil(t |A|) + 1 grams and B's first |B| - ceil(t |B|) + 1, in one fixed order, share one. A kept
    prompt is indexed under its first grams only, and a sample is compared with the kept prompts it shares a first
    gram with: work in proportion to the prompts that look alike, not to all kept.
    """

    def __init__(self, min_chars: int = 16, dedup_jaccard: float | None = 0.8, ngram: int = 3):
        self.min_chars, self.dedup_jaccard, self.ngram = min_chars, dedup_jaccard, ngram
        self.kept: list[str] = []
        self.dropped: Counter = Counter()
        self._folded: set[str] = set()
        self._grams: list[frozenset] = []  # of each kept prompt
        self._index: dict[tuple[str, ...], list[int]] = {}  # first gram -> kept prompts

    def offer(self, text: str, *, stopped: bool = True, special: bool = False) -> str | None:
        """None when `text` is kept (stripped, appended to `kept`), else the reason it is dropped."""
        text = text.strip()
        folded = " ".join(text.casefold().split())
        grams = []
        if not stopped:
            reason = "truncated"
        elif special:
            reason = "special_token"
        elif not text:
            reason = "empty"
        elif len(text) < self.min_chars:
            reason = "too_short"
        elif folded in self._folded:
            reason = "duplicate"
        else:
            grams = self._sorted_grams(folded) if self.dedup_jaccard is not None else []
            reason = "near_duplicate" if grams and self._near_duplicate(grams) else None
        if reason is not None:
            self.dropped[reason] += 1
            return reason
        self.kept.append(text)
        self._folded.add(folded)
        if grams:
            for gram in grams[: self._prefix_length(len(grams))]:
                self._index.setdefault(gram, []).append(len(self._grams))
            self._grams.append(frozenset(grams))
        return None

    def _sorted_grams(self, folded: str) -> list[tuple[str, ...]]:
        words = _WORD.findall(folded)
        n = min(self.ngram, len(words))
        return sorted({tuple(words[i : i + n]) for i in range(len(words) - n + 1)} if words else (), key=_gram_order)

    def _prefix_length(self, size: int) -> int:
        return size - math.ceil(self.dedup_jaccard * size - 1e-9) + 1  # the 1e-9 errs long (safe) under rounding

    def _near_duplicate(self, grams: list[tuple[str, ...]]) -> bool:
        mine = frozenset(grams)
        seen = set()
        for gram in grams[: self._prefix_length(len(grams))]:
            for k in self._index.get(gram, ()):
                if k not in seen:
                    seen.add(k)
                    common = len(mine & self._grams[k])
                    if common >= self.dedup_jaccard * (len(mine) + len(self._grams[k]) - common):
                        return True
        return False


def take(kept_by: PromptFilter, samples: list[Sample], num_prompts: int) -> tuple[list[tuple[int, str]], int]:
    """Offer samples in attempt order until `kept_by` holds num_prompts: (the (attempt, prompt) kept, how many
    samples were offered)."""
    kept = []
    for used, sample in enumerate(samples):
        if len(kept_by.kept) >= num_prompts:
            return kept, used
        if kept_by.offer(sample.text, stopped=sample.stopped, special=sample.special) is None:
            kept.append((sample.attempt, kept_by.kept[-1]))
    return kept, len(samples)


def prompt_record(prompt: str, attempt: int) -> dict:
    """A kept prompt as chat JSONL: one user turn, which `eagle-data regenerate` answers; `attempt` names the draw
    (readers of chat JSONL pass over other keys)."""
    return {"messages": [{"role": "user", "content": prompt}], "attempt": attempt}


def synthesize(model, tokenizer, turn: UserTurn, synthesis: Synthesis, *, batch_size: int = 32,
               decode_mode: str = "eager", progress: bool = True) -> tuple[list[tuple[int, str]], dict]:
    """Draw batches until synthesis.num_prompts prompts are kept or attempt_cap samples drawn, on the model's
    device: ([(attempt, prompt)], {"kept", "attempts", "dropped", "new_tokens"})."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    prefix_ids = encode_prefix(tokenizer, turn.prefix, context_length(model.config))
    stop = stop_ids(tokenizer, turn.stop_tokens)
    kept_by = PromptFilter(synthesis.min_chars, synthesis.dedup_jaccard, synthesis.ngram)
    num, cap = synthesis.num_prompts, synthesis.attempt_cap
    kept, attempt, new_tokens = [], 0, 0
    with tqdm(total=num, desc="synthesize", unit="prompt", disable=not progress) as bar:
        while len(kept) < num and attempt < cap:
            attempts = list(range(attempt, min(attempt + batch_size, cap)))
            samples = sample_user_turns(model, tokenizer, prefix_ids, attempts, synthesis.sampling, stop, decode_mode)
            new, used = take(kept_by, samples, num)
            kept += new
            attempt += used
            new_tokens += sum(s.num_tokens for s in samples)
            bar.update(len(new))
    return kept, {"kept": len(kept), "attempts": attempt,
                  "dropped": {r: kept_by.dropped[r] for r in DROP_REASONS}, "new_tokens": new_tokens}

"""Prompts written by the target: the user-turn prefix and end-of-turn token come from the chat template (a template
with no user turn is refused, naming the fix); the clean-up drops by reason and finds every near-duplicate an
all-pairs comparison finds; a seed gives the same prompts at any batch size, another seed others."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eagle_trainer.data.chat import parse_conversation
from eagle_trainer.data.sampling import Sampling
from eagle_trainer.data.synthesize import (PromptFilter, Synthesis, UserTurn, prompt_record, stop_ids, synthesize,
                                           user_turn)

DEFAULT_SYSTEM = (  # Qwen2.5's shape: a system turn of its own when the conversation has none
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
)
ASSISTANT_ONLY = ("{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
                  "{{- '<|im_start|>assistant\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}")
NEEDS_SYSTEM = "{%- if messages[0]['role'] != 'system' %}{{- raise_exception('a system turn first') }}{%- endif %}"
PLAIN_TEXT = "{%- for message in messages %}{{- 'User: ' + message['content'] + '\\n\\n' }}{%- endfor %}"


@pytest.fixture(scope="module")
def chat(tiny_chat_target_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_target_path), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(tiny_chat_target_path))


def with_template(path, template):
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = template
    return tokenizer


def test_prefix_and_stop_come_from_the_chat_template(chat, tiny_chat_target_path):
    tokenizer = chat[1]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turn = user_turn(tokenizer)
    assert turn == UserTurn("<|im_start|>user\n", ("<|im_end|>",))
    assert stop_ids(tokenizer, turn.stop_tokens) == [end]  # the eos is <|im_end|> too
    system = user_turn(with_template(tiny_chat_target_path, DEFAULT_SYSTEM))
    assert system.prefix == "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
    # the caller's prefix and stop tokens (text that is one token, or a vocabulary token) need no template
    base = with_template(tiny_chat_target_path, None)
    turn = user_turn(base, prefix="Question: ", stop_tokens=("\n", "<|endoftext|>"))
    assert turn == UserTurn("Question: ", ("\n", "<|endoftext|>"))
    newline = base("\n", add_special_tokens=False)["input_ids"]
    assert stop_ids(base, turn.stop_tokens) == [*newline, base.convert_tokens_to_ids("<|endoftext|>"), end]


def test_a_template_without_a_user_turn_is_refused_naming_the_fix(tiny_chat_target_path):
    cases = [(None, "has no chat template"), (ASSISTANT_ONLY, "renders no user turn"),
             (NEEDS_SYSTEM, r"refuses a conversation of one user turn \(a system turn first\)")]
    for template, what in cases:
        with pytest.raises(ValueError, match=rf"{what}.*pass --prefix TEXT.* and --stop-token TOKEN"):
            user_turn(with_template(tiny_chat_target_path, template))
    plain = with_template(tiny_chat_target_path, PLAIN_TEXT)  # a prefix, but no special token ends the turn
    with pytest.raises(ValueError, match=r"follows a user message with '\\n\\n', which does not start with a special "
                                         r"token to stop at; pass --stop-token TOKEN"):
        user_turn(plain)
    assert user_turn(plain, stop_tokens=("<|endoftext|>",)).prefix == "User: "
    with pytest.raises(ValueError, match=r"stop token 'two words' is not one token of the tokenizer"):
        stop_ids(plain, ("two words",))


def test_the_clean_up_drops_by_reason():
    kept_by = PromptFilter(min_chars=8, dedup_jaccard=0.8)
    long = "Write a short poem about the sea, the wind and the old lighthouse keeper who lives alone"  # 15 3-grams
    offers = [
        ("  How do I sort a list in Python?\n", {}, None),
        ("how do i   SORT a list in python?", {}, "duplicate"),  # case and whitespace folded
        ("How do I sort a list in Python", {}, "near_duplicate"),  # not the same text, the same words: Jaccard 1
        ("Explain quantum tunnelling", {"stopped": False}, "truncated"),
        ("Explain <|im_start|> tunnelling", {"special": True}, "special_token"),
        ("   \n ", {}, "empty"),
        ("  Hi you  ", {}, "too_short"),  # 10 characters, 6 once stripped
        (long, {}, None),
        (long + " please", {}, "near_duplicate"),  # Jaccard 15/16
        (long.replace("alone", "by himself"), {}, "near_duplicate"),  # 14/17 = 0.82
        (long.replace("old", "aged"), {}, None),  # 12/18 = 0.67
        ("Write a short story about the sea and a lighthouse", {}, None),
    ]
    got = [kept_by.offer(text, **kw) for text, kw, _ in offers]
    assert got == [want for *_, want in offers]
    assert kept_by.kept == ["How do I sort a list in Python?", long,
                            long.replace("old", "aged"), "Write a short story about the sea and a lighthouse"]
    assert dict(kept_by.dropped) == {"duplicate": 1, "truncated": 1, "special_token": 1, "empty": 1,
                                     "too_short": 1, "near_duplicate": 3}
    exact_only = PromptFilter(min_chars=8, dedup_jaccard=None)
    assert [exact_only.offer(text) for text in (long, long.replace("old", "aged"), long.upper())] == [
        None, None, "duplicate"]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 1.0])
def test_near_duplicates_are_those_all_pairs_find(threshold):
    """Prefix filtering (only kept prompts that share one of the first grams are compared) keeps exactly the
    prompts that comparing every pair keeps, on texts made of edits of a few seeds."""
    rng = random.Random(threshold)
    words = [f"w{i}" for i in range(30)]
    seeds = [[rng.choice(words) for _ in range(rng.randint(1, 40))] for _ in range(12)]
    texts = []
    for _ in range(300):
        text = list(rng.choice(seeds))
        for _ in range(rng.randint(0, 2)):  # a word appended, the last one or any one replaced
            edit = rng.randrange(3)
            if edit == 0:
                text.append(rng.choice(words))
            else:
                text[-1 if edit == 1 else rng.randrange(len(text))] = rng.choice(words)
        texts.append(" ".join(text))
    kept_by = PromptFilter(min_chars=0, dedup_jaccard=threshold, ngram=3)
    kept, reference = [], []
    for text in texts:
        kept_by.offer(text)
        words_of = text.split()
        n = min(3, len(words_of))
        grams = {tuple(words_of[i : i + n]) for i in range(len(words_of) - n + 1)}
        if text not in {t for t, _ in reference} and all(jaccard(grams, g) < threshold for _, g in reference):
            reference.append((text, grams))
    assert kept_by.kept == [t for t, _ in reference]
    assert len(kept_by.kept) > 12 and kept_by.dropped["near_duplicate"] > 0  # the test sees both outcomes


def test_a_seed_gives_the_same_prompts_at_any_batch_size(chat):
    model, tokenizer = chat
    turn = user_turn(tokenizer)
    synthesis = Synthesis(num_prompts=10, sampling=Sampling(max_new_tokens=24, temperature=1.0, top_p=0.99, seed=5))
    kept, stats = synthesize(model, tokenizer, turn, synthesis, batch_size=1, progress=False)
    assert len(kept) == 10 and stats["kept"] == 10
    assert stats["attempts"] == kept[-1][0] + 1 == 10 + sum(stats["dropped"].values())
    assert sum(stats["dropped"].values()) > 0  # the target also writes samples the clean-up drops
    for batch_size in (3, 7):  # the last batch's samples past the 10th prompt are drawn, not offered
        again, again_stats = synthesize(model, tokenizer, turn, synthesis, batch_size=batch_size, progress=False)
        assert again == kept and {**again_stats, "new_tokens": 0} == {**stats, "new_tokens": 0}
    other = Synthesis(num_prompts=10, sampling=Sampling(max_new_tokens=24, temperature=1.0, top_p=0.99, seed=6))
    assert synthesize(model, tokenizer, turn, other, batch_size=4, progress=False)[0] != kept
    attempt, prompt = kept[0]
    assert parse_conversation(prompt_record(prompt, attempt), require_assistant=False) == [
        {"role": "user", "content": prompt}]


def test_synthesis_settings_are_checked():
    with pytest.raises(ValueError, match="greedy decoding of one prefix writes one prompt"):
        Synthesis(num_prompts=4, sampling=Sampling(temperature=0.0))
    with pytest.raises(ValueError, match="dedup_jaccard=1.5 must be in"):
        Synthesis(num_prompts=4, dedup_jaccard=1.5)
    assert Synthesis(num_prompts=7).attempt_cap == 28

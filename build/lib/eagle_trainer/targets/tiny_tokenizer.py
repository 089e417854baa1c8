"""A small byte-level BPE tokenizer with a Qwen3-style chat template, built locally (no hub).

Used by the demo and the tests in place of a real Qwen3 tokenizer: same special tokens
(`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<think>`, `</think>`), same template shape, and it is saved
and loaded back through `AutoTokenizer.from_pretrained` exactly like a real checkpoint's tokenizer.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's template reduced to what matters for masks: role headers, <|im_end|> ends a turn, and the
# empty think block that a non-thinking generation prompt carries.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "zu", "chi", "mo", "fa", "gle", "bru"]


def synthetic_words(num_words: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-words, so the tokenizer and the prompts share a vocabulary."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < num_words:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def synthetic_corpus(num_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = synthetic_words(400, seed)
    lines = []
    for _ in range(num_lines):
        n = rng.randint(3, 16)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!", ", 12.", " 3 + 4 = 7."]))
    return lines


def build_tiny_tokenizer(vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = synthetic_corpus(4000, seed) + ["system user assistant"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def save_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """Build, save (HF format) and load back, so callers use the on-disk tokenizer like a real one."""
    build_tiny_tokenizer(vocab_size, seed).save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)

"""Tiny random HF checkpoints built locally: the demo's target and the tests' targets.

A checkpoint is written the way a real one is (config.json, model.safetensors, tokenizer files) and is
meant to be loaded back through `targets.load_target`, the same code that loads a real Qwen3 checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, Qwen3Config

from eagle_trainer.data.tiny_tokenizer import save_tiny_tokenizer


def tiny_qwen3_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 8, **overrides) -> Qwen3Config:
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


@torch.no_grad()
def save_tiny_checkpoint(out_dir: str | Path, config: PretrainedConfig, seed: int = 0, logit_std: float | None = None,
                         tokenizer_vocab: int | None = None) -> Path:
    """Random weights from `config` (seeded), plus a tiny tokenizer.

    `logit_std` rescales lm_head so that logits of the (unit-RMS) final hidden state have about that standard
    deviation. A random model's next-token distributions are otherwise almost uniform; sharper ones give a
    draft something learnable to imitate.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tiny_tokenizer(out_dir, vocab_size=tokenizer_vocab or config.vocab_size)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but config.vocab_size is {config.vocab_size}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if logit_std is not None:
        head = model.get_output_embeddings().weight
        head.mul_(logit_std / (head.std() * config.hidden_size**0.5))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    return out_dir

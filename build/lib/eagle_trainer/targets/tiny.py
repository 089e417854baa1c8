"""Tiny random HF checkpoints built locally: the demo's target and the tests' targets.

A checkpoint is written the way a real one is (config.json, model.safetensors, tokenizer files) and is
meant to be loaded back through `targets.load_target`, the same code that loads a real Qwen3 checkpoint.

MoE expert tensors can be written in either layout real checkpoints use (`expert_layout`):
    fused       model.layers.{i}.mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up), .down_proj [E, H, I]
    per_expert  model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight [I, H], .down_proj.weight [H, I]
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PretrainedConfig, Qwen3Config, Qwen3MoeConfig, Qwen3NextConfig

from eagle_trainer.targets.tiny_tokenizer import save_tiny_tokenizer


def tiny_qwen3_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 8, **overrides) -> Qwen3Config:
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def tiny_qwen3_moe_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 8, num_experts: int = 8,
                          top_k: int = 2, moe_intermediate_size: int = 32, **overrides) -> Qwen3MoeConfig:
    """Every layer sparse (decoder_sparse_step 1, no mlp_only_layers), top-k weights renormalised, as Qwen3-30B-A3B."""
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        moe_intermediate_size=moe_intermediate_size, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def tiny_qwen3_next_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 8, num_experts: int = 8,
                           top_k: int = 2, moe_intermediate_size: int = 32, **overrides) -> Qwen3NextConfig:
    """A small Qwen3-Next-80B-A3B: the same layer pattern and blocks, small widths.

    Every 4th layer is gated full attention (output gate on q_proj, partial RoPE over 25% of head_dim), the
    others are gated delta net linear attention (value heads 2x key heads, conv kernel 4); every layer's MLP is
    sparse (routed experts, top-k renormalised, plus a shared expert behind a sigmoid gate); the RMSNorms are
    zero-centred ((1 + w) * x_normed).
    """
    head_dim = hidden_size // 4
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, full_attention_interval=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, partial_rotary_factor=0.25,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim, linear_conv_kernel_dim=4,
        moe_intermediate_size=moe_intermediate_size, shared_expert_intermediate_size=moe_intermediate_size,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    return Qwen3NextConfig(**kw)


EXPERT_LAYOUTS = ("fused", "per_expert")


def expert_state_dict(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A model state dict with fused 3-D expert params written in `layout` (see the module docstring)."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout={layout!r} is not one of {EXPERT_LAYOUTS}")
    fused = [k[:-len(".gate_up_proj")] for k in state if k.endswith("experts.gate_up_proj")]
    if not fused:
        raise ValueError("expert_layout is set but the model has no fused `experts.gate_up_proj` params (not MoE)")
    if layout == "fused":
        return dict(state)
    out = {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in fused)}
    for prefix in fused:
        gate_up, down = state[prefix + ".gate_up_proj"], state[prefix + ".down_proj"]  # [E, 2I, H], [E, H, I]
        gate, up = gate_up.chunk(2, dim=1)
        for e in range(gate_up.shape[0]):
            out[f"{prefix}.{e}.gate_proj.weight"] = gate[e]
            out[f"{prefix}.{e}.up_proj.weight"] = up[e]
            out[f"{prefix}.{e}.down_proj.weight"] = down[e]
    return out


def write_safetensors(out_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """Replace the checkpoint's weight files by one model.safetensors holding `state` (tied tensors once)."""
    for old in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.safetensors.index.json")]:
        old.unlink()
    seen, tensors = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape)
        if key in seen:  # a tied weight (lm_head = embedding): stored once, as HF does
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def save_tiny_checkpoint(out_dir: str | Path, config: PretrainedConfig, seed: int = 0, logit_std: float | None = None,
                         tokenizer_vocab: int | None = None, expert_layout: str | None = None) -> Path:
    """Random weights from `config` (seeded), plus a tiny tokenizer.

    `logit_std` rescales lm_head so that logits of the (unit-RMS) final hidden state have about that standard
    deviation. A random model's next-token distributions are otherwise almost uniform; sharper ones give a
    draft something learnable to imitate.

    `expert_layout` (MoE models): None keeps what `save_pretrained` writes (transformers 5 writes per-expert
    keys, reversing its load-time fusion); "fused" or "per_expert" writes exactly that layout.
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
    state = None if expert_layout is None else expert_state_dict(model.state_dict(), expert_layout)
    model.save_pretrained(str(out_dir))  # config.json and generation_config.json; weights replaced below if asked
    if state is not None:
        write_safetensors(out_dir, state)
    return out_dir

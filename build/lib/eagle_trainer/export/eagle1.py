"""Write an EAGLE-1/2 trainer checkpoint as the draft SGLang (`eagle1-sglang`) or vLLM (`eagle1-vllm`) serves.

    <out>/config.json         a Llama config of the draft: architectures ["LlamaForCausalLMEagle"] (SGLang) or
                              ["EagleLlamaForCausalLM"] (vLLM), num_hidden_layers = draft layers, vocab_size = V
    <out>/model.safetensors   fc.weight [H, 2H], fc.bias [H] (eagle1-sglang only: the trained bias, or zeros for a
                              draft trained without one), layers.{i}.self_attn.{q,k,v,o}_proj.weight,
                              layers.{i}.input_layernorm.weight for i >= 1, layers.{i}.post_attention_layernorm.weight,
                              layers.{i}.mlp.{gate,up,down}_proj.weight (bf16 by default); no norm, no lm_head, no
                              embedding, no d2t/t2d

Serve (EAGLE-2 is the same draft with a tree, topk > 1):
    python -m sglang.launch_server --model-path TARGET --speculative-algorithm EAGLE \
        --speculative-draft-model-path OUT --speculative-num-steps 5 --speculative-eagle-topk 8 ...
    vllm serve TARGET --speculative-config '{"method": "eagle", "model": OUT, "num_speculative_tokens": K}'

Verified against the engines' loader source:
- sglang python/sglang/srt/models/llama_eagle.py: EntryClass `LlamaForCausalLMEagle`, picked by config.json
  architectures (configs/model_config.py `_config_draft_model` remaps no Llama draft, so the name must be this one).
  `LlamaModel` holds embed_tokens, `layers` (num_hidden_layers Llama decoder layers; layer 0's input_layernorm is
  deleted and replaced by the identity) and `fc = torch.nn.Linear(2H, H)`: bias=True by default, so a draft trained
  without a bias is written with a zero fc.bias (an absent one would stay at nn.Linear's random init). No final
  norm: forward returns hidden_states + residual of the last layer. `load_weights` drops every name containing
  "lm_head" and prefixes the rest with `model.`; models/llama.py `LlamaForCausalLM.load_weights` stacks q/k/v and
  gate/up and only logs a warning for a name matching no parameter (so a wrong name serves a random tensor).
- sglang python/sglang/srt/speculative/eagle_worker.py: for EAGLE (not EAGLE3) the draft's embedding AND lm_head are
  the target's (`set_embed_and_head(target embed, head)`), so neither is exported. Its hot-token map comes only from
  `--speculative-token-map` (a file of target ids, sets hot_vocab_size); the draft's weights are not searched for a
  d2t, and a `d2t` tensor would be one more unmatched name. The EAGLE-1 d2t/t2d of this trainer are the vocab subset
  of the training soft-CE, not a serving map: not exported.
- vllm vllm/config/speculative.py: method "eagle" wraps the draft's HF config in transformers_utils/configs/eagle.py
  `EAGLEConfig`, which prefixes "Eagle" to each architecture not starting with "Eagle"; the registry
  (model_executor/models/registry.py `_SPECULATIVE_DECODING_MODELS`) maps "EagleLlamaForCausalLM" to llama_eagle.py
  and has no "EagleLlamaForCausalLMEagle", so the vLLM export names "EagleLlamaForCausalLM" (kept as is).
- vllm vllm/model_executor/models/llama_eagle.py: `LlamaModel` as SGLang's (layer 0 input_layernorm = nn.Identity,
  no norm, returns hidden_states + residual) but `fc = Linear(2H, H, bias=False)`; names get a `model.` prefix
  unless they hold "lm_head"; `LlamaModel.load_weights` looks each name up with `params_dict[name]`, so fc.bias,
  d2t, t2d or layers.0.input_layernorm.weight raise KeyError (some builds skip unknown names instead, which would
  silently drop a bias): a draft trained with a bias is refused. embed_tokens is skipped (shared from the target
  without pipeline parallelism); `EagleLlamaForCausalLM` has no lm_head of its own, and vllm/v1/spec_decode/eagle.py
  shares the target's when the checkpoint has none (`has_own_lm_head` stays false). draft_vocab_size defaults to
  vocab_size there; not written.
- Both build the layers from transformers' LlamaConfig (head_dim, rope_theta, rope_scaling,
  max_position_embeddings, rms_norm_eps, hidden_act silu, attention_bias/mlp_bias); the same keys as the EAGLE-3
  export (export/sglang.py `llama_keys`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from eagle_trainer.drafts.eagle1 import Eagle1Config, Eagle1Draft
from eagle_trainer.drafts.io import WEIGHTS_FILE as CHECKPOINT_WEIGHTS
from eagle_trainer.export.sglang import (PROVENANCE_KEY, check_against, check_dtype, llama_keys, provenance,
                                         read_checkpoint, write_model)

SGLANG, VLLM = "eagle1-sglang", "eagle1-vllm"
ARCHITECTURES = {SGLANG: "LlamaForCausalLMEagle", VLLM: "EagleLlamaForCausalLM"}  # format -> config architecture
NOT_EXPORTED = ("d2t", "t2d")  # the training soft-CE's vocab subset; neither engine reads one for EAGLE-1


def eagle1_config(cfg: Eagle1Config, dtype: torch.dtype, fmt: str) -> dict:
    """config.json of an EAGLE-1/2 export in `fmt`: the Llama keys of the draft `cfg`, nothing defaulted."""
    return {
        "architectures": [ARCHITECTURES[fmt]],
        **llama_keys(cfg, dtype),
        PROVENANCE_KEY: {"algorithm": cfg.algorithm, **provenance(cfg)},
    }


def export_tensors(cfg: Eagle1Config, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors an export in `fmt` holds for the draft `cfg` (meta, by name): the checkpoint's but the vocab map;
    fc.bias always in eagle1-sglang (SGLang's fc has one), never in eagle1-vllm (vLLM's has none)."""
    with torch.device("meta"):
        tensors = Eagle1Draft(replace(cfg, fc_bias=fmt == SGLANG)).trainable_state_dict()
    return {k: v for k, v in tensors.items() if k not in NOT_EXPORTED}


def write_eagle1(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype, overwrite: bool,
                 fmt: str) -> Path:
    """Check an EAGLE-1/2 trainer checkpoint and write it in `fmt` (SGLANG or VLLM) atomically to `out_dir`."""
    check_dtype(dtype)
    cfg, tensors = read_checkpoint(checkpoint_dir, fmt)
    if fmt == VLLM and cfg.fc_bias:
        raise ValueError(f"{str(checkpoint_dir)!r}: the draft was trained with draft.fc_bias=true, but vLLM's EAGLE-1 "
                         "draft has no fc bias (its loader fails on fc.bias); train with `draft.fc_bias=false` for "
                         f"vLLM, or export this checkpoint with --format {SGLANG}")
    with torch.device("meta"):
        expected = Eagle1Draft(cfg).trainable_state_dict()
    check_against(expected, tensors, str(Path(checkpoint_dir) / CHECKPOINT_WEIGHTS),
                  "Re-save the checkpoint with drafts.io.save_draft from an Eagle1Draft, or extend export/eagle1.py "
                  "for the new tensor")
    exported = {k: v for k, v in tensors.items() if k not in NOT_EXPORTED}
    if fmt == SGLANG and not cfg.fc_bias:
        exported["fc.bias"] = torch.zeros(cfg.hidden_size)  # else SGLang keeps nn.Linear's random bias
    assert set(exported) == set(export_tensors(cfg, fmt)), sorted(set(exported) ^ set(export_tensors(cfg, fmt)))
    return write_model(out_dir, eagle1_config(cfg, dtype, fmt), exported, dtype, overwrite, checkpoint_dir)


def export_eagle1_sglang(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                         overwrite: bool = False) -> Path:
    """Export the EAGLE-1/2 checkpoint at `checkpoint_dir` for SGLang's LlamaForCausalLMEagle to `out_dir`.

    Weights are cast to `dtype`; a draft without fc bias gets a zero fc.bias. Everything is checked before a file
    is written. Returns `out_dir`.
    """
    return write_eagle1(checkpoint_dir, out_dir, dtype, overwrite, SGLANG)


def export_eagle1_vllm(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                       overwrite: bool = False) -> Path:
    """Export the EAGLE-1/2 checkpoint at `checkpoint_dir` for vLLM's EagleLlamaForCausalLM to `out_dir`.

    Weights are cast to `dtype`. A draft trained with fc_bias=true is refused (vLLM's fc has no bias). Everything is
    checked before a file is written. Returns `out_dir`.
    """
    return write_eagle1(checkpoint_dir, out_dir, dtype, overwrite, VLLM)

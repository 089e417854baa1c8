"""Write a trainer checkpoint in the speculators format, vLLM's native EAGLE-3 format (`Eagle3Speculator`).

    <out>/config.json         speculators_model_type "eagle3", transformer_layer_config (the draft layer's
                              Llama keys), draft_vocab_size, target_hidden_size, norm flags,
                              eagle_aux_hidden_state_layer_ids (vLLM convention), speculators_config
    <out>/model.safetensors   the tensors of the SGLang export with `midlayer.` renamed `layers.0.` (bf16 by default;
                              d2t int64 [Vd], t2d bool [V]); no embedding (vLLM shares the target's)

Serve: `vllm serve TARGET --speculative-config '{"method": "eagle3", "model": OUT, "num_speculative_tokens": K}'`,
or `vllm serve OUT` when the export names its verifier (`--verifier TARGET`; the trainer's checkpoint records the
target's architecture but not its path, so without the flag name_or_path is null and only the first form works).

Verified against the loaders' source:
- vllm vllm/transformers_utils/config.py: the HF config parser treats a config.json that has no `model_type` and
  has `speculators_config` as model_type "speculators" (configs/speculators/base.py `SpeculatorsConfig`), so no
  top-level model_type is written. `maybe_override_with_speculators` (used when the export itself is the served
  model) takes speculators_config.verifier.name_or_path as the target model and tokenizer.
- vllm vllm/transformers_utils/configs/speculators/base.py: the draft's HF config is transformer_layer_config
  updated by the algorithm; validation needs speculators_model_type, a dict transformer_layer_config,
  speculators_config.proposal_methods[0].speculative_tokens (it becomes num_speculative_tokens) and the key
  speculators_config.verifier.name_or_path (null passes).
- vllm .../speculators/algos.py `update_eagle3`: copies draft_vocab_size, target_hidden_size,
  norm_before_residual (default TRUE there, so false is written), norm_before_fc (newer versions; default false),
  and a non-empty top-level eagle_aux_hidden_state_layer_ids; picks the draft class from
  transformer_layer_config.model_type ("llama": Eagle3LlamaForCausalLM; "qwen3" would add q/k norms this draft
  does not have).
- vllm vllm/model_executor/models/llama_eagle3.py: norm_before_residual false keeps residual = g before
  hidden_norm (drafts/eagle3.py); `midlayer.` is renamed `layers.0.`, so `layers.0.` names load as they are;
  d2t -> draft_id_to_target_id, t2d skipped, an unknown name raises; embed_tokens may be absent.
- speculators src/speculators/models/eagle3/config.py `Eagle3SpeculatorConfig`: speculators_model_type "eagle3",
  architectures ["Eagle3Speculator"], transformer_layer_config (a LlamaConfig dict; its model_type picks the
  class), draft_vocab_size, norm_before_residual, target_hidden_size, eagle_aux_hidden_state_layer_ids (all with
  defaults). src/speculators/config.py: speculators_config = {algorithm, proposal_methods,
  default_proposal_method, verifier {name_or_path (str or null), architectures}}, all required; model_type is
  dropped on save. src/speculators/proposals/greedy.py: {proposal_type "greedy", speculative_tokens (default 5),
  verifier_accept_k 1, accept_tolerance 0.0}.
- speculators src/speculators/models/eagle3/core.py and model_definitions.py: tensors fc.weight,
  layers.0.{input_layernorm, hidden_norm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
  mlp.{gate,up,down}_proj}.weight, norm.weight, lm_head.weight, d2t, t2d (embed_tokens may be missing); the
  first layer keeps residual = the un-normalised hidden unless norm_before_residual, and reads head_dim. Its own
  fc is built 3 * hidden_size wide (it assumes Ht == H); vLLM reads target_hidden_size.
- Aux ids: the top-level key in vLLM's convention, ours + 1 (table and evidence in export/aux_layers.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from eagle_trainer.drafts.eagle3 import Eagle3Config
from eagle_trainer.export.aux_layers import vllm_aux_ids
from eagle_trainer.export.sglang import PROVENANCE_KEY, SGLANG_TENSORS, llama_keys, provenance, write_export

ARCHITECTURE = "Eagle3Speculator"
SPECULATORS_MODEL_TYPE = "eagle3"
SPECULATIVE_TOKENS = 5  # speculators' greedy default; vLLM's num_speculative_tokens unless the command sets one
CHECKPOINT_LAYER, VLLM_LAYER = "midlayer.", "layers.0."


def vllm_name(name: str) -> str:
    """Checkpoint tensor name -> speculators name (`midlayer.` -> `layers.0.`, the rest unchanged)."""
    return VLLM_LAYER + name.removeprefix(CHECKPOINT_LAYER) if name.startswith(CHECKPOINT_LAYER) else name


def checkpoint_name(name: str) -> str:
    """The inverse of `vllm_name`."""
    return CHECKPOINT_LAYER + name.removeprefix(VLLM_LAYER) if name.startswith(VLLM_LAYER) else name


VLLM_TENSORS = tuple(vllm_name(k) for k in SGLANG_TENSORS)


def vllm_config(cfg: Eagle3Config, dtype: torch.dtype, verifier: str | None = None) -> dict:
    """config.json of the speculators format, declaring exactly the draft `cfg`; `verifier`: the target's path."""
    return {
        "architectures": [ARCHITECTURE],
        "speculators_model_type": SPECULATORS_MODEL_TYPE,
        "transformer_layer_config": llama_keys(cfg, dtype),
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "norm_before_residual": False,  # residual = g, hidden_norm only on the attention input
        "norm_before_fc": False,  # fc reads the raw aux hidden states
        "eagle_aux_hidden_state_layer_ids": vllm_aux_ids(cfg.aux_layer_ids),  # HF hidden_states indices
        "speculators_config": {
            "algorithm": SPECULATORS_MODEL_TYPE,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": SPECULATIVE_TOKENS,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier,
                         "architectures": [cfg.target_architecture] if cfg.target_architecture else []},
        },
        PROVENANCE_KEY: provenance(cfg),
    }


def export_vllm(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                overwrite: bool = False, verifier: str | None = None) -> Path:
    """Export the trainer checkpoint at `checkpoint_dir` to `out_dir` in the speculators format.

    Weights are cast to `dtype` (d2t stays int64, t2d bool). `verifier` is written as
    speculators_config.verifier.name_or_path (null when None). Everything is checked before a file is written.
    Returns `out_dir`.
    """
    return write_export(checkpoint_dir, out_dir, dtype, overwrite, "vllm",
                        lambda cfg: vllm_config(cfg, dtype, verifier), rename=vllm_name)

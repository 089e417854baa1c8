"""Aux-layer ids in each engine's convention: which config key each engine reads, and how it counts.

The draft reads the target's hidden states after the decoder layers Eagle3Config.aux_layer_ids (0-based layer
outputs, i.e. HF `hidden_states[i + 1]`). The engines count the same states two ways, so an export writes each
list in the convention of the engine that reads its key, and never one list for both:

    key (in the export's config.json)                  read by                         convention   ids
    eagle_config.eagle_aux_hidden_state_layer_ids      SGLang ModelRunner              layer output i        i
    eagle_aux_hidden_state_layer_ids (top level)       vLLM (plain and speculators)    HF hidden_states[j]   i + 1

Evidence (sources named in export/sglang.py and export/vllm.py):
- SGLang reads only the nested key (model_runner.py: `eagle_config["eagle_aux_hidden_state_layer_ids"]`; the
  draft model llama_eagle3.py reads none) and its targets capture before layer `id + 1` (models/qwen3.py,
  qwen3_moe.py, llama.py: `layers_to_capture = [val + 1 for val in layer_ids]`).
- vLLM reads the top-level key of the draft config first (eagle3_utils.py `get_eagle3_aux_layers_from_config`,
  older gpu_model_runner.py `_get_eagle3_aux_layers_from_config`) and uses it as-is; its targets append
  `hidden_states + residual` BEFORE layer `idx` (models/llama.py; Qwen3 reuses Qwen2Model), i.e. HF
  hidden_states[idx]. Some vLLM builds (vllm-ascend's runner) fall back to the nested SGLang key when the top-level
  one is absent and would read it off by one; upstream ignores it and silently uses (2, L//2, L-3) (vllm PR
  #50170). Writing the top-level key in every export closes both holes: vLLM never reaches the nested list.
- The speculators format has no nested key: vLLM's speculators parser (configs/speculators/algos.py
  `update_eagle3`) copies the top-level key into the draft config, where the runner above reads it.

Caveat, not our targets: SGLang's DeepSeek-family models (after sgl-project/sglang#25454) add 1 only when the
first id is 1; Qwen3, Qwen3-MoE and Llama add 1 unconditionally.
"""

from __future__ import annotations


def sglang_aux_ids(aux_layer_ids) -> list[int]:
    """Eagle3Config.aux_layer_ids for SGLang's eagle_config key (0-based layer outputs, unchanged)."""
    return [int(i) for i in aux_layer_ids]


def vllm_aux_ids(aux_layer_ids) -> list[int]:
    """Eagle3Config.aux_layer_ids for vLLM's top-level key (HF hidden_states indices: output of layer i = i + 1)."""
    return [int(i) + 1 for i in aux_layer_ids]


def aux_ids_from_vllm(ids, where: str) -> tuple[int, ...]:
    """The inverse of `vllm_aux_ids`; index 0 (the embedding output) is no decoder layer's output."""
    if any(int(j) < 1 for j in ids):
        raise ValueError(f"{where}: eagle_aux_hidden_state_layer_ids {list(ids)} holds an index < 1; vLLM ids are HF "
                         "hidden_states indices and 0 is the embedding, which no EAGLE-3 draft here reads")
    return tuple(int(j) - 1 for j in ids)

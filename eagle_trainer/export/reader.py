"""Read an export back into the draft, for round-trip tests and eval: EAGLE-3 (export/sglang.py, export/vllm.py)
into an Eagle3Draft, EAGLE-1/2 (export/eagle1.py) into an Eagle1Draft.

The draft comes back in float32 (bf16 weights are widened exactly); its embedding is left random, as the exports
have none: call `draft.set_target_weights(embedding)` (EAGLE-3) or `draft.set_target_weights(embedding, lm_head)`
(EAGLE-1/2) before running it. An EAGLE-3 draft comes back with its vocab map, aux ids read from each format's
own key and convention (export/aux_layers.py). An EAGLE-1/2 export holds no vocab map: the engines decode it over
the whole target vocab, and so does the draft read back (draft_vocab_size = V, the identity d2t/t2d).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from eagle_trainer.drafts.eagle1 import Eagle1Config, Eagle1Draft
from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft
from eagle_trainer.export import eagle1, sglang, vllm
from eagle_trainer.export.aux_layers import aux_ids_from_vllm, vllm_aux_ids
from eagle_trainer.export.sglang import CONFIG_FILE, PROVENANCE_KEY, WEIGHTS_FILE, check_against, check_tensors


def llama_fields(layer: dict) -> dict:
    """The draft config fields that the Llama keys of an export declare: the inverse of sglang.llama_keys."""
    return dict(
        hidden_size=layer["hidden_size"],
        num_heads=layer["num_attention_heads"],
        num_kv_heads=layer["num_key_value_heads"],
        head_dim=layer["head_dim"],
        intermediate_size=layer["intermediate_size"],
        vocab_size=layer["vocab_size"],
        rms_norm_eps=layer["rms_norm_eps"],
        rope_theta=layer["rope_theta"],
        max_position_embeddings=layer["max_position_embeddings"],
        rope_scaling=layer.get("rope_scaling"),
        num_layers=layer["num_hidden_layers"],
    )


def config_from_llama(layer: dict, config: dict, aux_layer_ids: tuple[int, ...]) -> Eagle3Config:
    """Eagle3Config from the draft layer's Llama keys (`layer`) and the export's top-level keys (`config`). Without
    target_hidden_size the target's width is the draft's, as both engines read it (SpecForge writes none)."""
    provenance = config.get(PROVENANCE_KEY, {})
    return Eagle3Config(
        **llama_fields(layer),
        target_hidden_size=config.get("target_hidden_size", layer["hidden_size"]),
        draft_vocab_size=config["draft_vocab_size"],
        aux_layer_ids=aux_layer_ids,
        target_architecture=provenance.get("target_architecture", ""),
        extra=provenance.get("extra", {}),
    )


def config_from_sglang(config: dict, where: str) -> Eagle3Config:
    """The inverse of `sglang_config`. The vLLM key, when present, must name the same layers."""
    aux = tuple(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])  # our convention
    top = config.get("eagle_aux_hidden_state_layer_ids")
    if top is not None and list(top) != vllm_aux_ids(aux):
        raise ValueError(f"{where}: eagle_config.eagle_aux_hidden_state_layer_ids {list(aux)} (SGLang: layer "
                         f"outputs) and eagle_aux_hidden_state_layer_ids {list(top)} (vLLM: hidden_states indices, "
                         f"expected {vllm_aux_ids(aux)}) name different layers; re-export the checkpoint")
    return config_from_llama(config, config, aux)


def config_from_vllm(config: dict, where: str) -> Eagle3Config:
    """The inverse of `vllm_config`; a draft with other norm placements is not this draft and is refused."""
    if config.get("speculators_model_type") != vllm.SPECULATORS_MODEL_TYPE:
        raise ValueError(f"{where}: speculators_model_type {config.get('speculators_model_type')!r} is not "
                         f"{vllm.SPECULATORS_MODEL_TYPE!r}; this reader only reads EAGLE-3 exports")
    flags = {k: config.get(k) for k in ("norm_before_residual", "norm_before_fc")}
    if flags != {"norm_before_residual": False, "norm_before_fc": False}:
        raise ValueError(f"{where}: norm flags {flags} differ from this draft's (both false, written explicitly); "
                         "it was not written by `eagle-export --format vllm`")
    aux = aux_ids_from_vllm(config["eagle_aux_hidden_state_layer_ids"], where)
    return config_from_llama(config["transformer_layer_config"], config, aux)


def load_export(export_dir: str | Path, formats: dict[str, str]) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """The format (one of `formats`, name -> architecture, told by config.json's architectures), config.json and
    tensors of an export, after checking its files."""
    export_dir = Path(export_dir)
    names = "|".join(formats)
    if not (export_dir / CONFIG_FILE).is_file() or not (export_dir / WEIGHTS_FILE).is_file():
        raise ValueError(f"{str(export_dir)!r} is not a {names} export: it needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
                         f"write one with `eagle-export --format {names}`")
    config = json.loads((export_dir / CONFIG_FILE).read_text())
    fmt = next((f for f, arch in formats.items() if config.get("architectures") == [arch]), None)
    if fmt is None:
        raise ValueError(f"{export_dir / CONFIG_FILE}: architectures {config.get('architectures')} is not "
                         f"{' or '.join(str([arch]) for arch in formats.values())}; this reader only reads {names} "
                         "exports")
    return fmt, config, load_file(str(export_dir / WEIGHTS_FILE))


def build_draft(cfg: Eagle3Config, tensors: dict[str, torch.Tensor], where: str) -> Eagle3Draft:
    """The draft `cfg` holding `tensors` (checkpoint names), every tensor checked against the config."""
    check_tensors(cfg, tensors, where)
    draft = Eagle3Draft(cfg)
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    assert not unexpected and all(k.startswith("embed_tokens.") for k in missing), (missing, unexpected)
    return draft


def read_sglang(export_dir: str | Path) -> Eagle3Draft:
    """Rebuild the draft from `export_sglang` output."""
    _, config, tensors = load_export(export_dir, {"sglang": sglang.ARCHITECTURE})
    cfg = config_from_sglang(config, str(Path(export_dir) / CONFIG_FILE))
    return build_draft(cfg, tensors, str(Path(export_dir) / WEIGHTS_FILE))


def read_vllm(export_dir: str | Path) -> Eagle3Draft:
    """Rebuild the draft from `export_vllm` output (speculators names mapped back to the checkpoint's)."""
    _, config, tensors = load_export(export_dir, {"vllm": vllm.ARCHITECTURE})
    cfg = config_from_vllm(config, str(Path(export_dir) / CONFIG_FILE))
    where = f"{Path(export_dir) / WEIGHTS_FILE} (names as in the checkpoint: {vllm.VLLM_LAYER} read as midlayer.)"
    return build_draft(cfg, {vllm.checkpoint_name(k): v for k, v in tensors.items()}, where)


def read_eagle1(export_dir: str | Path) -> Eagle1Draft:
    """Rebuild the draft from `export_eagle1_sglang` or `export_eagle1_vllm` output (its architectures say which).

    An all-zero fc.bias of an SGLang export is read as fc_bias=False: that is how a draft trained without a bias
    is exported, and the logits are the same either way.
    """
    fmt, config, tensors = load_export(export_dir, eagle1.ARCHITECTURES)
    provenance = config.get(PROVENANCE_KEY, {})
    cfg = Eagle1Config(
        **llama_fields(config),
        draft_vocab_size=config["vocab_size"],  # served over the whole target vocab
        fc_bias=fmt == eagle1.SGLANG,
        target_architecture=provenance.get("target_architecture", ""),
        algorithm=provenance.get("algorithm", "eagle1"),
        extra=provenance.get("extra", {}),
    )
    check_against(eagle1.export_tensors(cfg, fmt), tensors, str(Path(export_dir) / WEIGHTS_FILE),
                  f"It was not written by `eagle-export --format {fmt}`; re-export the checkpoint")
    if cfg.fc_bias and not bool(tensors["fc.bias"].any()):
        cfg = replace(cfg, fc_bias=False)
        tensors = {k: v for k, v in tensors.items() if k != "fc.bias"}
    draft = Eagle1Draft(cfg)
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) == {"embed_tokens.weight", *eagle1.NOT_EXPORTED}, (missing, unexpected)
    draft.set_vocab_map(torch.zeros(cfg.vocab_size, dtype=torch.int64), torch.ones(cfg.vocab_size, dtype=torch.bool))
    return draft

"""Read an SGLang EAGLE-3 export (export/sglang.py) back into an Eagle3Draft, for round-trip tests and eval.

The draft comes back in float32 (bf16 weights are widened exactly) with its vocab map; its embedding is
left random, as the export has none: call `draft.set_embedding(target_embedding)` before running it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft
from eagle_trainer.export.sglang import ARCHITECTURE, CONFIG_FILE, PROVENANCE_KEY, WEIGHTS_FILE, check_tensors


def config_from_sglang(config: dict) -> Eagle3Config:
    """Eagle3Config from an export's config.json (the inverse of `sglang_config`)."""
    provenance = config.get(PROVENANCE_KEY, {})
    return Eagle3Config(
        hidden_size=config["hidden_size"],
        target_hidden_size=config["target_hidden_size"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        draft_vocab_size=config["draft_vocab_size"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"],
        max_position_embeddings=config["max_position_embeddings"],
        aux_layer_ids=tuple(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]),  # same convention
        rope_scaling=config.get("rope_scaling"),
        num_layers=config["num_hidden_layers"],
        target_architecture=provenance.get("target_architecture", ""),
        extra=provenance.get("extra", {}),
    )


def read_sglang(export_dir: str | Path) -> Eagle3Draft:
    """Rebuild the draft from `export_sglang` output; every tensor is checked against the config."""
    export_dir = Path(export_dir)
    if not (export_dir / CONFIG_FILE).is_file() or not (export_dir / WEIGHTS_FILE).is_file():
        raise ValueError(f"{str(export_dir)!r} is not an SGLang EAGLE-3 export: it needs {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE}; write one with `eagle-export --format sglang`")
    config = json.loads((export_dir / CONFIG_FILE).read_text())
    if config.get("architectures") != [ARCHITECTURE]:
        raise ValueError(f"{export_dir / CONFIG_FILE}: architectures {config.get('architectures')} is not "
                         f"[{ARCHITECTURE!r}]; this reader only reads EAGLE-3 exports")
    cfg = config_from_sglang(config)
    tensors = load_file(str(export_dir / WEIGHTS_FILE))
    check_tensors(cfg, tensors, str(export_dir / WEIGHTS_FILE))
    draft = Eagle3Draft(cfg)
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    assert not unexpected and all(k.startswith("embed_tokens.") for k in missing), (missing, unexpected)
    return draft

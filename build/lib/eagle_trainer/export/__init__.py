"""Writers of trained drafts in the serving engines' formats, and readers back for eval and round-trip tests.

    sglang.py      EAGLE-3 plain format, SGLang LlamaForCausalLMEagle3 (vLLM loads it too); shared checked writing
    vllm.py        EAGLE-3 speculators format, vLLM's native Eagle3Speculator
    eagle1.py      EAGLE-1/2 drafts: SGLang LlamaForCausalLMEagle (eagle1-sglang), vLLM EagleLlamaForCausalLM
                   (eagle1-vllm)
    aux_layers.py  the aux-layer-id key and convention each engine reads
    reader.py      each format back into its draft

Importing the package adds each format to the registry entries of the draft algorithms it describes
(`registry.register_export_format`); callers look formats up there (`registry.export_formats()`,
`registry.algorithm_spec(name).exporters`) and read any draft back with `read_draft`.
"""

from __future__ import annotations

import json
from pathlib import Path

from eagle_trainer import registry
from eagle_trainer.checkpoint import resolve_checkpoint
from eagle_trainer.drafts.io import CONFIG_FILE as CHECKPOINT_CONFIG
from eagle_trainer.drafts.io import load_draft
from eagle_trainer.drafts.llama import Draft
from eagle_trainer.export import eagle1, sglang
from eagle_trainer.export.eagle1 import export_eagle1_sglang, export_eagle1_vllm
from eagle_trainer.export.reader import read_eagle1, read_sglang, read_vllm
from eagle_trainer.export.sglang import export_sglang
from eagle_trainer.export.vllm import export_vllm


def _architecture(name: str):
    return lambda config: config.get("architectures") == [name]


for _fmt, _algorithms in (
        (registry.ExportFormat("sglang", export_sglang, read_sglang, _architecture(sglang.ARCHITECTURE)), ("eagle3",)),
        (registry.ExportFormat("vllm", export_vllm, read_vllm, lambda config: "speculators_model_type" in config,
                               options=("verifier",)), ("eagle3",)),
        (registry.ExportFormat(eagle1.SGLANG, export_eagle1_sglang, read_eagle1,
                               _architecture(eagle1.ARCHITECTURES[eagle1.SGLANG])), ("eagle1", "eagle2")),
        (registry.ExportFormat(eagle1.VLLM, export_eagle1_vllm, read_eagle1,
                               _architecture(eagle1.ARCHITECTURES[eagle1.VLLM])), ("eagle1", "eagle2"))):
    registry.register_export_format(_fmt, _algorithms)


def read_draft(path: str | Path) -> Draft:
    """A draft from a checkpoint dir, a run dir (newest checkpoint) or an export dir in any registered format
    (its config.json tells which), without the target's weights (`draft.set_target_weights` before use)."""
    path = Path(path)
    if (path / CHECKPOINT_CONFIG).is_file() or (path / "checkpoints").is_dir():
        return load_draft(resolve_checkpoint(path))
    config_file = path / sglang.CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{str(path)!r} is neither a checkpoint ({CHECKPOINT_CONFIG}), a run directory "
                         "(checkpoints/) nor an export directory (config.json + model.safetensors)")
    config = json.loads(config_file.read_text())
    formats = registry.export_formats()
    fmt = next((f for f in formats.values() if f.recognizes(config)), None)
    if fmt is None:
        raise ValueError(f"{config_file}: architectures {config.get('architectures')} is no known export format "
                         f"({', '.join(formats)}); write the draft with `eagle-export`")
    return fmt.read(path)


def target_fingerprint_of(path: str | Path) -> str | None:
    """The fingerprint (targets.loading.target_fingerprint) of the target the draft at `path` (as for `read_draft`)
    was trained on, from its config alone; None where it records none (a checkpoint from before they were)."""
    path = Path(path)
    if (path / CHECKPOINT_CONFIG).is_file() or (path / "checkpoints").is_dir():
        extra = json.loads((resolve_checkpoint(path) / CHECKPOINT_CONFIG).read_text()).get("extra", {})
    else:
        extra = json.loads((path / sglang.CONFIG_FILE).read_text()).get(sglang.PROVENANCE_KEY, {}).get("extra", {})
    return extra.get(sglang.TARGET_FINGERPRINT)


__all__ = ["export_eagle1_sglang", "export_eagle1_vllm", "export_sglang", "export_vllm", "read_draft", "read_eagle1",
           "read_sglang", "read_vllm", "target_fingerprint_of"]

"""Writers of trained drafts in the serving engines' formats, and readers back for round-trip tests.

    sglang.py      EAGLE-3 plain format, SGLang LlamaForCausalLMEagle3 (vLLM loads it too); shared checks
    vllm.py        EAGLE-3 speculators format, vLLM's native Eagle3Speculator
    aux_layers.py  the aux-layer-id key and convention each engine reads
    reader.py      either format back into an Eagle3Draft
    cli.py         the `eagle-export` console script (format name -> writer)
"""

from __future__ import annotations

from eagle_trainer.export.reader import read_sglang, read_vllm
from eagle_trainer.export.sglang import export_sglang
from eagle_trainer.export.vllm import export_vllm

# Format name -> writer(checkpoint_dir, out_dir, dtype=..., overwrite=...) -> Path.
WRITERS = {
    "sglang": export_sglang,
    "vllm": export_vllm,
}

__all__ = ["WRITERS", "export_sglang", "export_vllm", "read_sglang", "read_vllm"]

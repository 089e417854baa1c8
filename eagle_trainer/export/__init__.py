"""Writers of trained drafts in the serving engines' formats, and readers back for round-trip tests.

    sglang.py      EAGLE-3 plain format, SGLang LlamaForCausalLMEagle3 (vLLM loads it too); shared checked writing
    vllm.py        EAGLE-3 speculators format, vLLM's native Eagle3Speculator
    eagle1.py      EAGLE-1/2 drafts: SGLang LlamaForCausalLMEagle (eagle1-sglang), vLLM EagleLlamaForCausalLM
                   (eagle1-vllm)
    aux_layers.py  the aux-layer-id key and convention each engine reads
    reader.py      each format back into its draft (Eagle3Draft, Eagle1Draft)
    cli.py         the `eagle-export` console script (format name -> writer)
"""

from __future__ import annotations

from eagle_trainer.export.eagle1 import export_eagle1_sglang, export_eagle1_vllm
from eagle_trainer.export.reader import read_eagle1, read_sglang, read_vllm
from eagle_trainer.export.sglang import export_sglang
from eagle_trainer.export.vllm import export_vllm

# Format name -> writer(checkpoint_dir, out_dir, dtype=..., overwrite=...) -> Path.
WRITERS = {
    "sglang": export_sglang,
    "vllm": export_vllm,
    "eagle1-sglang": export_eagle1_sglang,
    "eagle1-vllm": export_eagle1_vllm,
}

__all__ = ["WRITERS", "export_eagle1_sglang", "export_eagle1_vllm", "export_sglang", "export_vllm", "read_eagle1",
           "read_sglang", "read_vllm"]

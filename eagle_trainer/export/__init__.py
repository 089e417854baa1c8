"""Writers of trained drafts in the serving engines' formats, and readers back for round-trip tests.

    sglang.py   EAGLE-3 plain format for SGLang LlamaForCausalLMEagle3 (config.json + model.safetensors)
    reader.py   that format back into an Eagle3Draft
    cli.py      the `eagle-export` console script (format name -> writer)
"""

from __future__ import annotations

from eagle_trainer.export.reader import read_sglang
from eagle_trainer.export.sglang import export_sglang

# Format name -> writer(checkpoint_dir, out_dir, dtype=..., overwrite=...) -> Path.
WRITERS = {
    "sglang": export_sglang,
}

__all__ = ["WRITERS", "export_sglang", "read_sglang"]

"""eagle_trainer: train EAGLE-1/2/3 speculative-decoding drafts for a frozen target LLM.

Layers (DESIGN.md section 2): train.py -> trainer -> {targets, drafts, parallel, data, export, evaluate}
-> kernels, types. The extension API lives in `eagle_trainer.registry`.
"""

__version__ = "0.1.0"

"""eagle_trainer: train EAGLE-1/2/3 speculative-decoding drafts for a frozen target LLM.

Layers, bottom to top (docs/design.md, Layers): kernels, types, config -> registry -> drafts, data, parallel
-> targets -> checkpoint, flops, metrics -> evaluate, export, trainer -> app -> train. The extension API lives in
`eagle_trainer.registry`.
"""

__version__ = "0.1.0"

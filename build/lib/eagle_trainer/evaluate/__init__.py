"""Real speculative decoding with target and draft, and acceptance length (docs/design.md, Evaluation).

    speculative.py  chain and EAGLE-2 tree drafting, greedy tree verification, KV caches on both sides
    acceptance.py   prompts, acceptance-length report over many prompts, histogram plot
    simulated.py    the simulated acceptance length from a draft's per-step TTT accuracy (eagle-eval reports it)
"""

from eagle_trainer.evaluate.acceptance import measure_acceptance
from eagle_trainer.evaluate.speculative import DecodeConfig, greedy_generate, speculative_generate

__all__ = ["DecodeConfig", "greedy_generate", "measure_acceptance", "speculative_generate"]

"""Real speculative decoding with target and draft, and acceptance length (DESIGN section 9).

Arrives with the export/evaluation issue; until then the trainer reports the simulated acceptance length
from per-step accuracy (drafts/ttt.py).
"""

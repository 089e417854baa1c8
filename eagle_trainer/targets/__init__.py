"""Frozen target adapters: load a local HF checkpoint, capture hidden states, compute the teacher.

Registers the built-in target entries with the registry on import. HF transformers' modeling code is the
model definition; an entry says where things live and which kernels to bind.
"""

from __future__ import annotations

from eagle_trainer import registry

QWEN3 = registry.register_target(registry.TargetSpec(architectures=("Qwen3ForCausalLM",)))

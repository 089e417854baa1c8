"""The extension API: which targets and draft algorithms the trainer knows.

A target architecture is described by a frozen `TargetSpec` (where its layers, embedding, final norm
and lm_head live, and how to bind faster kernels); a draft algorithm by an `AlgorithmSpec` (how to
build the draft module). `resolve(architecture, algorithm)` pairs the two into a `DraftSpec`.

    from eagle_trainer import registry
    registry.register_target(registry.TargetSpec(architectures=("MyForCausalLM",)))
    spec = registry.resolve("MyForCausalLM", algorithm="eagle3")

Unknown names raise KeyError listing the known ones; registering a name twice raises ValueError.
Built-in entries are registered when `eagle_trainer.targets` and `eagle_trainer.drafts` are imported,
which `resolve` does on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from eagle_trainer.types import TargetInfo


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3 aux layers as 0-based decoder-layer outputs: [1, L//2 - 1, L - 4] (DESIGN section 4)."""
    if num_layers < 5:
        raise ValueError(f"EAGLE-3 needs a target with at least 5 layers for its default aux layers, got {num_layers}; "
                         "set target.aux_layer_ids explicitly")
    return (1, num_layers // 2 - 1, num_layers - 4)


def info_from_hf_config(architecture: str, config: Any) -> TargetInfo:
    """Read a TargetInfo from an HF config of the Llama/Qwen3 family (standard key names; MoE fields when present)."""
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope)
    theta = rope.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return TargetInfo(
        architecture=architecture,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else rope,
        max_position_embeddings=config.max_position_embeddings,
        num_experts=getattr(config, "num_experts", None),
        num_experts_per_tok=getattr(config, "num_experts_per_tok", None),
        moe_intermediate_size=getattr(config, "moe_intermediate_size", None),
    )


@dataclass(frozen=True)
class TargetSpec:
    """How the trainer finds its way around one family of HF causal-LM targets."""

    architectures: tuple[str, ...]  # HF config.architectures[0] values this entry serves
    backbone: str = "model"  # the base model (returns hidden states, not logits)
    layers: str = "model.layers"  # decoder layers: hooks and FSDP2 units
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    experts: str | None = None  # module path of routed experts inside each layer, for expert parallelism
    # (model, target_config) after loading: swap in Triton cores as the recipe asks (see targets/moe.py)
    bind_kernels: Callable[[nn.Module, Any], Any] | None = None
    read_info: Callable[[str, Any], TargetInfo] = info_from_hf_config
    aux_layers: Callable[[int], tuple[int, ...]] = default_aux_layers
    # evaluate/ verifies a draft tree in one target forward and then keeps the accepted KV entries; a target
    # with recurrent layers (a linear-attention state) cannot do either, and is verified token by token
    # along the accepted path instead (DecodeConfig.verify="walk": the same tokens, more forwards)
    tree_verify: bool = True


@dataclass(frozen=True)
class AlgorithmSpec:
    """A draft algorithm: how to build its module and which target outputs it consumes."""

    name: str
    build_draft: Callable[..., nn.Module]  # (target_info, draft_config, aux_layer_ids) -> draft module
    # (draft, batch, target_outputs, draft_config, attention, global_counts=None) -> TTTLoss-like; global_counts
    # (drafts/ttt.py GlobalCounts) gives the per-step token counts the losses are normalised by under data parallelism
    loss: Callable[..., Any]
    needs_aux_hidden: bool = True
    needs_last_hidden: bool = False
    needs_target_head: bool = False  # the draft decodes with the target's lm_head [V, H] (EAGLE-1/2)


@dataclass(frozen=True)
class DraftSpec:
    """A target family paired with a draft algorithm: everything `trainer` needs to wire them."""

    target: TargetSpec
    algorithm: AlgorithmSpec


_TARGETS: dict[str, TargetSpec] = {}
_ALGORITHMS: dict[str, AlgorithmSpec] = {}
_BUILTINS = ("eagle_trainer.targets", "eagle_trainer.drafts")


def register_target(spec: TargetSpec) -> TargetSpec:
    for arch in spec.architectures:
        if arch in _TARGETS:
            raise ValueError(f"target architecture {arch!r} is already registered")
    for arch in spec.architectures:
        _TARGETS[arch] = spec
    return spec


def register_algorithm(spec: AlgorithmSpec) -> AlgorithmSpec:
    if spec.name in _ALGORITHMS:
        raise ValueError(f"draft algorithm {spec.name!r} is already registered")
    _ALGORITHMS[spec.name] = spec
    return spec


def _load_builtins() -> None:
    for module in _BUILTINS:
        importlib.import_module(module)


def target_spec(architecture: str) -> TargetSpec:
    _load_builtins()
    if architecture not in _TARGETS:
        raise KeyError(f"unknown target architecture {architecture!r}; registered: {sorted(_TARGETS)}. "
                       "Register it with eagle_trainer.registry.register_target(TargetSpec(...))")
    return _TARGETS[architecture]


def algorithm_spec(algorithm: str) -> AlgorithmSpec:
    _load_builtins()
    if algorithm not in _ALGORITHMS:
        raise KeyError(f"unknown draft algorithm {algorithm!r}; registered: {sorted(_ALGORITHMS)}")
    return _ALGORITHMS[algorithm]


def resolve(architecture: str, algorithm: str) -> DraftSpec:
    """Pair the target entry for `architecture` with the draft `algorithm`."""
    return DraftSpec(target=target_spec(architecture), algorithm=algorithm_spec(algorithm))


def known_targets() -> list[str]:
    _load_builtins()
    return sorted(_TARGETS)

"""The extension API: which targets, draft algorithms and serving formats the trainer knows.

A target architecture is described by a frozen `TargetSpec` (where its layers, embedding, final norm
and lm_head live, and how to bind faster kernels); a draft algorithm by an `AlgorithmSpec` (its config class,
builder, unroll, loss, serving cache and export formats). `resolve(architecture, algorithm)` pairs the two into a
`DraftSpec`. Nothing outside drafts/ asks which kind a draft is: it looks the kind up here.

    from eagle_trainer import registry
    registry.register_target(registry.TargetSpec(architectures=("MyForCausalLM",)))
    spec = registry.resolve("MyForCausalLM", algorithm=recipe.draft.algorithm)

Unknown names raise UnknownName (a KeyError) listing the known ones and how to load a plugin that registers more;
registering a name twice raises ValueError.
Built-in entries are registered when `eagle_trainer.targets`, `eagle_trainer.drafts` and `eagle_trainer.export`
are imported, which the lookups do on first use (the registry itself imports none of them at import time).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from eagle_trainer.types import TargetInfo


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3 aux layers as 0-based decoder-layer outputs: [1, L//2 - 1, L - 4] (docs/design.md, aux layers)."""
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
    # evaluate/ verifies a draft tree in one target forward and then keeps the accepted KV entries. A target with
    # recurrent layers (a linear-attention state, which takes no tree mask and cannot drop entries) names here what
    # carries their states per tree node instead: (model) -> an object with begin(parents), commit(rows),
    # attention_mask(mask), close() (targets/gdn.py RecurrentStates)
    recurrent_states: Callable[[nn.Module], Any] | None = None


@dataclass(frozen=True)
class ExportFormat:
    """One serving format a draft kind can be written in, and read back from (for eval and round-trip tests)."""

    name: str  # the --format name, e.g. "sglang"
    write: Callable[..., Any]  # (checkpoint_dir, out_dir, dtype=..., overwrite=..., **options) -> Path
    read: Callable[[Any], nn.Module]  # (export_dir) -> the draft, float32, without the target's weights
    recognizes: Callable[[dict], bool]  # (an export's config.json) -> whether it is this format
    options: tuple[str, ...] = ()  # keyword options `write` takes besides dtype/overwrite (e.g. "verifier")


@dataclass(frozen=True)
class AlgorithmSpec:
    """A draft algorithm: everything that differs between draft kinds, so that the trainer, IO, export and
    evaluation look it up here instead of asking which kind a draft is.

    The model side (config, builder, unroll, loss, serving cache) is registered by the draft's module in drafts/;
    the serving formats are added to `exporters` by export/ (`register_export_format`), which sits above drafts/.
    """

    name: str
    config_class: type  # the draft's config dataclass: .save(path), .load(path); its `algorithm` field is `name`
    draft_class: type  # nn.Module built from a config_class instance
    # (target_info, recipe DraftConfig, aux_layer_ids) -> config_class instance
    build_config: Callable[..., Any]
    # the reference K-step unroll through draft.step: (draft, input_ids, features, num_steps, attention,
    # position_ids=None, documents=None) -> K step outputs [B, T, H], each what `cache_class` gives drafting that
    # step after that prefix (the contract tests/drafts/test_llama.py checks for every registered kind); a loss may
    # run a faster arrangement of it (EAGLE-3: unroll.unroll_eagle3)
    unroll: Callable[..., list]
    # (draft, batch, target_outputs, recipe DraftConfig, attention, global_counts=None) -> drafts.loss.TTTLoss;
    # global_counts (drafts/loss.py GlobalCounts) gives the per-step token counts the losses are normalised by under
    # data parallelism
    loss: Callable[..., Any]
    # the serving-style KV cache the evaluator drafts with: (draft, capacity=None, graphs=True) -> .extend /
    # .truncate / .reset / len (drafts.llama.KVCache: growing, or preallocated to `capacity` and CUDA-graphed)
    cache_class: type
    kind: str = ""  # what messages call it, e.g. "EAGLE-3"
    feature: str = "aux_hidden"  # the captured target state the draft reads: "aux_hidden" or "final_hidden"
    needs_target_head: bool = False  # the draft decodes with the target's lm_head [V, H] (EAGLE-1/2)
    exporters: dict[str, ExportFormat] = field(default_factory=dict)  # filled by register_export_format

    @property
    def needs_aux_hidden(self) -> bool:
        return self.feature == "aux_hidden"

    def build_draft(self, info: TargetInfo, draft_cfg: Any, aux_layer_ids) -> nn.Module:
        """An untrained draft shaped for the target `info`."""
        return self.draft_class(self.build_config(info, draft_cfg, aux_layer_ids))


@dataclass(frozen=True)
class DraftSpec:
    """A target family paired with a draft algorithm: everything `trainer` needs to wire them."""

    target: TargetSpec
    algorithm: AlgorithmSpec


class UnknownName(KeyError):
    """A lookup of a name nothing registered; a KeyError whose str() is its message (a command reports it as a user
    error, not a bug)."""

    def __str__(self) -> str:
        return str(self.args[0])


_TARGETS: dict[str, TargetSpec] = {}
_ALGORITHMS: dict[str, AlgorithmSpec] = {}
# imported on first lookup: they register the built-in targets, draft algorithms and export formats
_BUILTINS = ("eagle_trainer.targets", "eagle_trainer.drafts", "eagle_trainer.export")
# how the commands load the user code that registers more (app/plugins.py), for the messages of failed lookups
HOW_TO_LOAD = ("--plugin MODULE_OR_FILE (eagle-data, eagle-eval, eagle-export), plugins=[...] (eagle-train), or "
               "the eagle_trainer.plugins entry-point group of an installed package")


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


def register_export_format(fmt: ExportFormat, algorithms: tuple[str, ...]) -> ExportFormat:
    """Add a serving format to the entries of the draft `algorithms` that can be written in it."""
    taken = {name for spec in _ALGORITHMS.values() for name in spec.exporters}
    if fmt.name in taken:
        raise ValueError(f"export format {fmt.name!r} is already registered")
    for name in algorithms:
        if name not in _ALGORITHMS:
            raise KeyError(f"export format {fmt.name!r}: unknown draft algorithm {name!r}; register it first")
        _ALGORITHMS[name].exporters[fmt.name] = fmt
    return fmt


def _load_builtins() -> None:
    for module in _BUILTINS:
        importlib.import_module(module)


def target_spec(architecture: str) -> TargetSpec:
    _load_builtins()
    if architecture not in _TARGETS:
        raise UnknownName(f"unknown target architecture {architecture!r}; registered: {sorted(_TARGETS)}. "
                          "Register it with eagle_trainer.registry.register_target(TargetSpec(...)) in a plugin, "
                          f"and load that: {HOW_TO_LOAD}")
    return _TARGETS[architecture]


def algorithm_spec(algorithm: str) -> AlgorithmSpec:
    """The entry of a draft algorithm by name (eagle3, eagle1, eagle2 and whatever was registered)."""
    _load_builtins()
    if algorithm not in _ALGORITHMS:
        raise UnknownName(f"unknown draft algorithm {algorithm!r}; registered: {sorted(_ALGORITHMS)}. A plugin "
                          f"registers one (register_algorithm): {HOW_TO_LOAD}")
    return _ALGORITHMS[algorithm]


def algorithm_of(config: Any) -> AlgorithmSpec:
    """The entry of a draft config (an instance of some entry's config_class)."""
    return algorithm_spec(config.algorithm)


def export_formats() -> dict[str, ExportFormat]:
    """Every registered serving format, by name."""
    _load_builtins()
    return {name: fmt for spec in _ALGORITHMS.values() for name, fmt in spec.exporters.items()}


def resolve(architecture: str, algorithm: str) -> DraftSpec:
    """Pair the target entry for `architecture` with the draft `algorithm`."""
    return DraftSpec(target=target_spec(architecture), algorithm=algorithm_spec(algorithm))


def known_algorithms() -> list[str]:
    _load_builtins()
    return sorted(_ALGORITHMS)


def known_targets() -> list[str]:
    _load_builtins()
    return sorted(_TARGETS)

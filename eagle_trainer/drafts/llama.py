"""What every draft kind shares: its config fields, the Llama decoder layer, the draft base class, the KV cache.

A draft kind (eagle3.py, eagle1.py) differs only in what it feeds the layers and how many it has; it implements
one method, `step`, and everything that drives a draft goes through it:

    step(tokens [B, n], hidden [B, n, F], positions [B, n], attend) -> the step's output [B, n, H]
    attend(layer_index, q [B, nh, n, D], k [B, nkv, n, D], v [B, nkv, n, D]) -> attention output [B, nh, n, D]

`KVCache` passes an `attend` that appends k/v to each layer's cache (serving-style drafting, the evaluator and the
tests' oracle); `unroll.unroll` passes one that builds the TTT attention pattern. The draft never decides which.

Shapes: B batch, n / T tokens, H hidden, F the feature a step reads (EAGLE-3 g [H], EAGLE-1 f [H]), nh/nkv heads,
D head dim, V target vocab, Vd draft vocab, S cache length.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eagle_trainer.config import DraftConfig
from eagle_trainer.drafts.layers import RMSNorm, Rotary, SwiGLU, apply_rotary, set_frozen_embedding
from eagle_trainer.types import TargetInfo


@dataclass(frozen=True)
class LlamaDraftConfig:
    """The fields every draft kind has; a kind's config adds its own (keyword-only) fields."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # target vocab V
    draft_vocab_size: int  # Vd
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None
    num_layers: int = 1
    target_architecture: str = ""
    algorithm: str = ""  # the registry entry that builds, trains and exports this draft
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path):
        raw = json.loads(Path(path).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def shape_from_target(info: TargetInfo, cfg: DraftConfig) -> dict:
    """The fields every draft takes from its target: H = Ht, the target's attention shape and RoPE unless
    overridden, its vocab."""
    if cfg.draft_vocab_size > info.vocab_size:
        raise ValueError(f"draft.draft_vocab_size={cfg.draft_vocab_size} exceeds the target vocab {info.vocab_size}; "
                         f"set draft.draft_vocab_size <= {info.vocab_size}")
    return dict(
        hidden_size=info.hidden_size,
        num_heads=cfg.num_heads or info.num_heads,
        num_kv_heads=cfg.num_kv_heads or info.num_kv_heads,
        head_dim=cfg.head_dim or info.head_dim,
        intermediate_size=cfg.intermediate_size or info.intermediate_size,
        vocab_size=info.vocab_size,
        draft_vocab_size=cfg.draft_vocab_size,
        rms_norm_eps=info.rms_norm_eps,
        rope_theta=info.rope_theta,
        rope_scaling=info.rope_scaling,
        max_position_embeddings=info.max_position_embeddings,
        num_layers=cfg.num_layers,
        target_architecture=info.architecture,
    )


class DecoderLayer(nn.Module):
    """A Llama decoder layer over an input of `in_features`: attention (q/k/v from the normed input, RoPE), o_proj
    into the residual, then a pre-norm SwiGLU MLP. The input norms are optional: EAGLE-1's layer 0 has none (its
    input is fc's output); EAGLE-3's layer normalises the token and hidden halves of its input separately
    (`input_layernorm`, `hidden_norm`) before joining them, so the draft applies them."""

    def __init__(self, cfg: LlamaDraftConfig, in_features: int, input_norm: bool = True, hidden_norm: bool = False):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps) if input_norm else None
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps) if hidden_norm else None
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(in_features, cfg.num_heads * d, bias=False)
        self.self_attn.k_proj = nn.Linear(in_features, cfg.num_kv_heads * d, bias=False)
        self.self_attn.v_proj = nn.Linear(in_features, cfg.num_kv_heads * d, bias=False)
        self.self_attn.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = SwiGLU(h, cfg.intermediate_size)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The attention input x [B, T, in_features] (already normed) -> q [B, nh, T, D], k/v [B, nkv, T, D]
        (RoPE by cos/sin [B, T, D] applied to q and k)."""
        b, t, _ = x.shape
        q = self.self_attn.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.self_attn.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.self_attn.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def out(self, residual: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream [B, T, H] and attention output [B, nh, T, D] -> the layer's output [B, T, H]."""
        b, _, t, _ = attn.shape
        h = residual + self.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.post_attention_layernorm(h))


class Draft(nn.Module):
    """The base of every draft kind: the frozen target embedding, RoPE, the draft vocab map, and the interface the
    trainer, the evaluator and IO drive. A kind adds its modules and implements `step`, `project`, `logits`."""

    config: LlamaDraftConfig
    # the elementwise-heavy functions of the kind's training unroll that drafts/policy.py may wrap (recompute,
    # compile) from outside; None: the unroll runs the modules as they are
    unroll_pieces = None

    def __init__(self, cfg: LlamaDraftConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        """The target decoder layers whose outputs the draft reads (none unless the kind reads aux states)."""
        return tuple(getattr(self.config, "aux_layer_ids", ()))

    def set_target_weights(self, embedding: torch.Tensor, target_head: torch.Tensor | None = None,
                           share: bool = False) -> None:
        """The target's input embedding [V, Ht], frozen: copied, or with `share` held as it is where it can be
        (layers.set_frozen_embedding). A kind that decodes with the target's lm_head takes `target_head` too."""
        set_frozen_embedding(self.embed_tokens, embedding, share)

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the draft's products run in: autocast's where it is on, else its trained parameters'."""
        # not the frozen target embedding (frozen_weights_to may hold it narrower); a draft frozen whole (none
        # trained) has one dtype
        weight = next((p for p in self.parameters() if p.requires_grad), None)
        weight = next(self.parameters()) if weight is None else weight
        device = weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint or export holds: all weights but the frozen target embedding."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed_tokens.")}

    def target_features(self, states) -> torch.Tensor:
        """The captured target state the draft reads (types.CapturedStates or TargetOutputs)."""
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Target features -> the hidden input of the first step."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """A step's output -> logits over the vocab the draft proposes from (`draft_to_target` maps its ids)."""
        raise NotImplementedError

    def draft_to_target(self, ids: torch.Tensor) -> torch.Tensor:
        return ids + self.d2t[ids]


class KVCache:
    """Serving-style incremental decoding for one draft: each layer's keys/values grow by the tokens fed in.

    New tokens attend to every cached key plus, causally, to each other, exactly as an engine's draft worker
    extends its cache. Used as the oracle of the TTT unroll and by the evaluator.

    With `capacity` the keys/values are preallocated to that many positions instead of grown: a new entry is
    written at its index, the unused tail is masked out. Every extend of n tokens then has the same shapes whatever
    the cache length, so that on a GPU (no autograd, no autocast) a step of n tokens seen a second time is captured
    as a CUDA graph and replayed from then on: a draft step is dozens of small kernels, each launched from Python,
    and a replay launches them at once. The evaluator uses one such cache for all its prompts (`reset`).
    """

    def __init__(self, draft: Draft, capacity: int | None = None, graphs: bool = True):
        self.draft = draft
        self.capacity = capacity
        self.graphs = graphs
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * draft.config.num_layers  # [B, nkv, S, D]
        self.length = 0
        self._seen: dict[tuple, int] = {}  # static step shapes -> times run eagerly
        self._captured: dict[tuple, tuple] = {}  # -> (graph, static inputs, static output)

    def extend(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Feed [B, n] tokens with their hidden inputs [B, n, F]; returns the step's outputs [B, n, H] for them.

        `allowed` [n, S] (S = cache length after appending) says which cached keys each new token sees;
        by default every earlier key and, causally, the new ones (a tree decoder passes its ancestor mask).
        """
        n, start = tokens.shape[1], self.length
        if self.capacity is not None and start + n > self.capacity:
            raise ValueError(f"the draft KV cache holds {self.capacity} positions; extending {start} by {n} "
                             "overflows it: build it with a larger capacity")
        self.length += n
        if self.capacity is None:
            return self.draft.step(tokens, hidden, positions, self._growing_attend(allowed))
        device = tokens.device
        index = torch.arange(start, self.length, device=device)
        if allowed is None:  # every earlier key and, causally, the new ones
            mask = torch.arange(self.capacity, device=device) <= index[:, None]
        else:
            mask = torch.zeros(n, self.capacity, dtype=torch.bool, device=device)
            mask[:, :self.length] = allowed
        return self._static_step(tokens, hidden, positions, index, mask)

    def _growing_attend(self, allowed: torch.Tensor | None):
        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if self.kv[i] is not None:
                k, v = torch.cat([self.kv[i][0], k], dim=2), torch.cat([self.kv[i][1], v], dim=2)
            self.kv[i] = (k, v)
            n, s = q.shape[2], k.shape[2]
            mask = allowed
            if mask is None:
                mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(diagonal=s - n)  # [n, S]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return attend

    def _run_static(self, tokens, hidden, positions, index, mask) -> torch.Tensor:
        """One step on the preallocated cache: new keys/values written at `index` [n], attention under `mask`
        [n, capacity]. Buffers are allocated on the first call (the k/v dtype is the step's)."""
        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if self.kv[i] is None:
                shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
                self.kv[i] = (k.new_zeros(shape), v.new_zeros(shape))
            keys, values = self.kv[i]
            keys.index_copy_(2, index, k)
            values.index_copy_(2, index, v)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.draft.step(tokens, hidden, positions, attend)

    def _static_step(self, tokens, hidden, positions, index, mask) -> torch.Tensor:
        inputs = (tokens, hidden, positions, index, mask)
        graphable = (self.graphs and tokens.is_cuda and not torch.is_grad_enabled()
                     and not torch.is_autocast_enabled("cuda"))
        if not graphable:
            return self._run_static(*inputs)
        key = tuple((x.shape, x.dtype) for x in inputs)
        if key not in self._captured:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < 2:  # a shape seen once (a prompt's prefill) is not worth a graph
                return self._run_static(*inputs)
            self._captured[key] = self._capture(inputs)
        graph, static_inputs, static_output = self._captured[key]
        for dst, src in zip(static_inputs, inputs):
            dst.copy_(src)
        graph.replay()
        return static_output.clone()  # the next replay overwrites the static output

    def _capture(self, inputs: tuple) -> tuple:
        static_inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()  # warm-up off the capturing stream, as CUDA graph capture asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run_static(*static_inputs)  # writes the same k/v the replay below writes
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a background checkpoint writer, NCCL's watchdog) may go on
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_output = self._run_static(*static_inputs)
        return graph, static_inputs, static_output

    @property
    def num_graphs(self) -> int:
        """Step shapes captured as CUDA graphs so far."""
        return len(self._captured)

    def __len__(self) -> int:
        return self.length

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (a preallocated cache masks the rest and writes over them later)."""
        self.length = length
        if self.capacity is None:
            self.kv = [None if kv is None or length == 0 else (kv[0][:, :, :length], kv[1][:, :, :length])
                       for kv in self.kv]

    def reset(self) -> None:
        """Empty, for the next sequence (a preallocated cache keeps its buffers and graphs)."""
        self.truncate(0)

"""Data passed between layers. torch and dataclasses only.

Shapes: B batch, T tokens, Ht target hidden, V target vocab, Vd draft vocab. A packed batch (data.pack) is
one row of N tokens holding D documents: [1, N] wherever [B, T] is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class HostCopy:
    """A tensor's values on their way to the host: the copy is queued at construction (pinned memory, no wait) and
    `tolist()` waits for that copy alone. `.item()` and `.tolist()` on a GPU tensor wait for everything queued on the
    stream so far: read after backward is queued, for all of backward, while the host could be queuing the next
    update."""

    def __init__(self, x: torch.Tensor):
        x = x.detach()
        self._done = None
        if x.is_cuda:
            self._host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self._host.copy_(x, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = x.clone()

    def tolist(self):
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


@dataclass
class Batch:
    """Tokenised conversations: right-padded rows [B, T], or (data.pack) all of them packed into one row [1, N].

    A packed batch holds its documents back to back with no padding between them; `position_ids` restart at 0
    at each document and `cu_seqlens` gives the document starts. Padding added after the last document
    (`pad_to_multiple`) is a document of its own, masked out of both masks, so nothing real attends into it.
    """

    input_ids: torch.Tensor  # [B, T] int64 ([1, N] packed)
    loss_mask: torch.Tensor  # [B, T] bool: token is part of an assistant turn (end-of-turn included)
    attention_mask: torch.Tensor  # [B, T] bool: real token (False on padding)
    # packed batches only (None on padded ones): position in its document [1, N] int64, and the document starts
    # [D+1] int32 (first 0, last N; D = the packed examples, plus one padding document after pad_to_multiple)
    position_ids: torch.Tensor | None = field(default=None, kw_only=True)
    cu_seqlens: torch.Tensor | None = field(default=None, kw_only=True)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def document_ids(self) -> torch.Tensor | None:
        """[1, N] int64: the document each token of a packed batch belongs to (None when not packed)."""
        if self.cu_seqlens is None:
            return None
        n = self.input_ids.shape[1]
        tokens = torch.arange(n, device=self.cu_seqlens.device, dtype=self.cu_seqlens.dtype)
        return torch.searchsorted(self.cu_seqlens[1:], tokens, right=True).to(torch.int64)[None]

    def document_lengths(self) -> list[int]:
        """Real tokens per document (per row when not packed; padding documents left out), on the host."""
        real = self.attention_mask.sum(1) if self.cu_seqlens is None else _segment_sums(self.attention_mask[0],
                                                                                        self.cu_seqlens)
        return [n for n in real.tolist() if n > 0]

    def pad_to_multiple(self, multiple: int, pad_id: int) -> "Batch":
        """Pad T up to a multiple (fewer distinct shapes for compiled kernels); padding is masked. A packed batch
        gets the padding as one more document (positions from 0, a cu_seqlens entry at the new end)."""
        extra = -self.input_ids.shape[1] % multiple
        if extra == 0:
            return self
        pad = lambda x, v: torch.cat([x, x.new_full((x.shape[0], extra), v)], dim=1)
        packing = {}
        if self.packed:
            positions = torch.arange(extra, dtype=self.position_ids.dtype, device=self.position_ids.device)
            end = self.cu_seqlens.new_full((1,), self.input_ids.shape[1] + extra)
            packing = {"position_ids": torch.cat([self.position_ids, positions[None]], dim=1),
                       "cu_seqlens": torch.cat([self.cu_seqlens, end])}
        return Batch(pad(self.input_ids, pad_id), pad(self.loss_mask, False), pad(self.attention_mask, False),
                     **packing)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda x: None if x is None else x.to(device, non_blocking=True)
        return Batch(move(self.input_ids), move(self.loss_mask), move(self.attention_mask),
                     position_ids=move(self.position_ids), cu_seqlens=move(self.cu_seqlens))


def _segment_sums(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum of x [N] over each segment [cu_seqlens[i], cu_seqlens[i+1]) -> [D] int64."""
    c = torch.cat([x.new_zeros(1, dtype=torch.int64), x.to(torch.int64).cumsum(0)])
    cu = cu_seqlens.to(torch.int64)
    return c[cu[1:]] - c[cu[:-1]]


@dataclass
class TargetOutputs:
    """What the frozen target gives the draft for one batch (online or read back from disk)."""

    aux_hidden: torch.Tensor | None  # [B, T, 3*Ht] EAGLE-3: aux layer outputs, low/mid/high concatenated (None: none kept)
    final_hidden: torch.Tensor  # [B, T, Ht] after the final norm: the EAGLE-1 feature (what engines feed it)
    teacher_logits: torch.Tensor  # [B, T, Vd] the target's logits over the draft vocab, in the head's dtype (bf16 on a
    # GPU: half the bytes of fp32 probabilities; the teacher is softmax(teacher_logits.float()))
    teacher_valid: torch.Tensor  # [B, T] bool: full-vocab argmax lies in the draft vocab (all True when off)

    def teacher_probs(self) -> torch.Tensor:
        """[B, T, Vd] fp32: the teacher distribution, softmax over the draft vocab."""
        return self.teacher_logits.float().softmax(-1)


@dataclass
class CapturedStates:
    """What one target forward captures, before the teacher is formed (online, or stored by offline dumps)."""

    aux_hidden: torch.Tensor | None  # [B, T, 3*Ht] aux layer outputs (None when no aux layers are captured)
    final_hidden: torch.Tensor  # [B, T, Ht] after the final norm: the teacher is rebuilt from it
    argmax_valid: torch.Tensor  # [B, T] bool: the full-vocab target argmax lies in the draft vocab

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "CapturedStates":
        """On `device`, with the hidden states (not argmax_valid) cast to `dtype` when given."""
        move = lambda x: None if x is None else x.to(device, dtype=dtype, non_blocking=True)
        return CapturedStates(aux_hidden=move(self.aux_hidden), final_hidden=move(self.final_hidden),
                              argmax_valid=self.argmax_valid.to(device, non_blocking=True))


@dataclass
class OfflineBatch(Batch):
    """A Batch read from an offline dump: the target's captured states come with it (zeros on padding).
    Packed like its tokens when data.pack is on ([1, N, ...])."""

    states: CapturedStates  # [B, T, ...] like the token tensors; argmax_valid is False on padding
    # fp8 dumps: state name -> per-token scale [B, T, 1] fp32 of a state held as float8_e4m3fn; `to` moves the
    # one-byte values and dequantises them on the device (value = q * scale, fp32)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    def pad_to_multiple(self, multiple: int, pad_id: int) -> "OfflineBatch":
        """Pad T up to a multiple as Batch does; the states get zero rows and argmax_valid False there."""
        extra = -self.input_ids.shape[1] % multiple
        if extra == 0:
            return self
        tokens = Batch.pad_to_multiple(self, multiple, pad_id)

        def pad(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], dim=1)

        s = self.states
        states = CapturedStates(aux_hidden=pad(s.aux_hidden), final_hidden=pad(s.final_hidden),
                                argmax_valid=pad(s.argmax_valid))
        scales = {name: pad(scale) for name, scale in self.scales.items()}
        return OfflineBatch(tokens.input_ids, tokens.loss_mask, tokens.attention_mask, states, scales,
                            position_ids=tokens.position_ids, cu_seqlens=tokens.cu_seqlens)

    def to(self, device: torch.device | str) -> "OfflineBatch":
        tokens = Batch.to(self, device)
        states = self.states.to(device)
        for name, scale in self.scales.items():
            q = getattr(states, name)
            setattr(states, name, q.float() * scale.to(device, non_blocking=True))
        return OfflineBatch(tokens.input_ids, tokens.loss_mask, tokens.attention_mask, states,
                            position_ids=tokens.position_ids, cu_seqlens=tokens.cu_seqlens)


@dataclass(frozen=True)
class TargetInfo:
    """The facts about a target that a draft needs to be built (no weights)."""

    architecture: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    # MoE targets only (None for dense ones); intermediate_size above is then the config's dense MLP width.
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None

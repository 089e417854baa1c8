"""The frozen target in the training loop: one forward, hooks on the aux layers, teacher over the draft vocab.

Only the aux layers' outputs and the final norm's are kept (forward hooks, `StateHooks`, at the paths the
TargetSpec names; no output_hidden_states over all layers). The teacher
is formed from the final (normed) hidden state as the logits `h @ lm_head[draft_ids].T` over the draft vocab (the
loss takes their fp32 softmax), so the [B, T, V] logits are never materialised; the optional argmax mask scans the
full vocab in chunks.

Batches are right-padded, so real tokens never attend to padding under the causal mask and no attention
mask is passed to the model. A packed batch (data.pack, one row of documents back to back) passes its
position_ids (RoPE sees each document's own positions) and runs inside `targets.packing.documents`: the
full-attention layers then build no mask and attend causally within each document through flex_attention
(targets/packed_attention.py, target.packed_attention=flex), and recurrent layers restart their state at each
document (Qwen3-Next's gated delta net: targets/gdn.py). With packed_attention=hf, HF's `create_causal_mask`
finds the documents where the positions restart and builds an [N, N] causal, same-document mask instead.

Shapes: B batch, T tokens, Ht target hidden, V target vocab, Vd draft vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from eagle_trainer.kernels.soft_ce import row_max, row_max_reference
from eagle_trainer.registry import TargetSpec
from eagle_trainer.targets.packing import documents
from eagle_trainer.types import Batch, CapturedStates, TargetOutputs


def _row_max(logits: torch.Tensor):
    """(max fp32, argmax) per row: the Triton kernel on a GPU (one read of the chunk), torch's reduction elsewhere."""
    return row_max(logits) if logits.is_cuda else row_max_reference(logits)


@torch.no_grad()
def chunked_argmax(h: torch.Tensor, weight: torch.Tensor, max_elems: int = 1 << 26) -> torch.Tensor:
    """argmax_v (h @ weight.T) for h [N, Ht], weight [V, Ht], holding at most `max_elems` logits at a time.
    Lowest id wins ties."""
    col_chunk = min(weight.shape[0], 32768, max_elems)
    row_chunk = max(1, max_elems // col_chunk)
    out = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
    for r in range(0, h.shape[0], row_chunk):
        rows = h[r:r + row_chunk]
        best = torch.full((rows.shape[0],), float("-inf"), device=h.device)
        arg = torch.zeros(rows.shape[0], dtype=torch.long, device=h.device)
        for c in range(0, weight.shape[0], col_chunk):
            val, idx = _row_max(rows @ weight[c:c + col_chunk].T)  # the max is exact in any dtype
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + c, arg)
        out[r:r + row_chunk] = arg
    return out


@torch.no_grad()
def teacher_outputs(states: CapturedStates, draft_head: torch.Tensor, mask_teacher_argmax: bool) -> TargetOutputs:
    """TargetOutputs from captured states: teacher logits final @ draft_head.T over the draft vocab (the teacher is
    their fp32 softmax). Online (FrozenTarget.forward) and offline (OfflineTarget) training both go through here,
    so they agree."""
    final = states.final_hidden
    logits = final @ draft_head.T  # [B, T, Vd]
    if mask_teacher_argmax:
        valid = states.argmax_valid
    else:
        valid = torch.ones(final.shape[:2], dtype=torch.bool, device=final.device)
    return TargetOutputs(aux_hidden=states.aux_hidden, final_hidden=final, teacher_logits=logits,
                         teacher_valid=valid)


class StateHooks:
    """Forward hooks that keep what one target forward leaves at the outputs of `spec.layers[i]` for the aux layers
    and of `spec.final_norm`: the training target (FrozenTarget) and evaluation's decoding target
    (evaluate.speculative.TargetCache) both read the target's states through these, at the paths the registered
    TargetSpec names. `take()` after a forward -> (aux [.., T, len(aux) * Ht] or None, final [.., T, Ht])."""

    def __init__(self, model: nn.Module, spec: TargetSpec, aux_layer_ids):
        layers = model.get_submodule(spec.layers)
        num_layers = len(layers)
        bad = [i for i in aux_layer_ids if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"aux layer ids {bad} are outside the target's {num_layers} decoder layers (0-based)")
        self.aux_layer_ids = tuple(aux_layer_ids)
        self._captured: dict[int | str, torch.Tensor] = {}
        self._hooks = [layers[i].register_forward_hook(self._keep(i)) for i in sorted(set(self.aux_layer_ids))]
        self._hooks.append(model.get_submodule(spec.final_norm).register_forward_hook(self._keep("final")))

    def _keep(self, key):
        def hook(_module, _inputs, output):
            self._captured[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def clear(self) -> None:
        self._captured.clear()

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The states of the forward just run (aux layers concatenated low to high); forgets them."""
        aux = torch.cat([self._captured[i] for i in self.aux_layer_ids], dim=-1) if self.aux_layer_ids else None
        final = self._captured["final"]
        self._captured.clear()
        return aux, final

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class FrozenTarget:
    """Wraps a loaded HF causal LM; `forward(batch)` returns the TargetOutputs a draft trains on."""

    def __init__(self, model: nn.Module, spec: TargetSpec, aux_layer_ids, draft_ids: torch.Tensor,
                 t2d: torch.Tensor, mask_teacher_argmax: bool = True, argmax_chunk_elems: int = 1 << 26):
        self.model, self.spec = model, spec
        self.backbone = model.get_submodule(spec.backbone)
        self.hooks = StateHooks(model, spec, aux_layer_ids)
        self.aux_layer_ids = self.hooks.aux_layer_ids
        head = self._target_head = model.get_submodule(spec.lm_head).weight  # [V, Ht]
        self.draft_ids = draft_ids.to(head.device)  # [Vd] target ids of the draft vocab
        self.t2d = t2d.to(head.device)
        self.mask_teacher_argmax = mask_teacher_argmax
        self.argmax_chunk_elems = argmax_chunk_elems

    def input_embedding(self) -> torch.Tensor:
        return self.model.get_submodule(self.spec.embed).weight

    @property
    def draft_head(self) -> torch.Tensor:
        """The lm_head rows of the draft ids [Vd, Ht], gathered per call (about 0.1 ms on an H100 at Qwen3-30B-A3B
        widths): held between batches, the copy (0.12 GiB there) would be alive at the draft step's peak."""
        return self._target_head[self.draft_ids]

    def target_head(self) -> torch.Tensor:
        """The lm_head weight [V, Ht] (EAGLE-1 drafts decode with it)."""
        return self._target_head

    @torch.no_grad()
    def capture(self, batch: Batch, argmax: bool | None = None) -> CapturedStates:
        """One target forward: the aux layers, the final (normed) hidden state, and the teacher mask.
        `argmax` (default: mask_teacher_argmax) scans the full vocab; without it argmax_valid is all True."""
        argmax = self.mask_teacher_argmax if argmax is None else argmax
        self.hooks.clear()
        with documents(batch.cu_seqlens):  # None unless packed
            self.backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        aux, final = self.hooks.take()  # final [B, T, Ht]: the final norm's output (the backbone's last hidden state)
        if argmax:
            flat = final.reshape(-1, final.shape[-1])
            argmax_valid = self.t2d[chunked_argmax(flat, self._target_head, self.argmax_chunk_elems)].view(final.shape[:2])
        else:
            argmax_valid = torch.ones(final.shape[:2], dtype=torch.bool, device=final.device)
        return CapturedStates(aux_hidden=aux, final_hidden=final, argmax_valid=argmax_valid)

    @torch.no_grad()
    def forward(self, batch: Batch) -> TargetOutputs:
        return teacher_outputs(self.capture(batch), self.draft_head, self.mask_teacher_argmax)

    def close(self) -> None:
        self.hooks.close()

"""Binding the Triton GDN core (kernels/gdn) into HF's Qwen3-Next linear-attention modules, per instance.

HF's `Qwen3NextGatedDeltaNet.forward` stays the model definition: our forward reuses the module's own
projections, conv weight, A_log, dt_bias, gated-norm weight and out_proj, and swaps the four steps between them
for our kernels (conv1d + SiLU, g/beta gating, the chunked gated delta rule, the gated RMSNorm). HF's
`fix_query_key_value_ordering` splits the in_proj_qkvz output into q, k, v and z and copies v and z into head
order, and the conv input is their concatenation, another copy: instead, that method is run once on column
numbers (`ProjectionLayout`), and the conv reads its channels and the gated norm its z straight out of the
projection's output, the gating its a and b out of in_proj_ba's, the delta rule q, k and v out of the conv's (about
10 ms of copies a step at 48 layers and T=4096 on an H100). A layout that is not runs and strides falls back to HF's
method and the copies.
The frozen target's training forward has no cache and no attention mask (batches are right-padded: the causal
conv and the delta rule never carry padding into earlier tokens); any call with a cache (evaluation's incremental
decoding) or a mask goes to HF's original forward.

Packed batches (data.pack): FrozenTarget sets the documents' starts (targets/packing.py) around the forward,
and our forward hands them to the conv and the delta rule as cu_seqlens, so both restart at each document.
HF's torch path cannot: with gdn_impl=hf each module gets a forward pre-hook that refuses a packed batch
(ValueError naming the fixes) and leaves HF's forward to run unchanged otherwise.

    gdn_impl   auto (the default: triton on a GPU, else hf) | hf | triton (GPU, or the CPU under
               TRITON_INTERPRET=1)

Shapes: B batch, T tokens, C conv channels (2*Hk*Dk + Hv*Dv), Hk/Hv key/value heads, Dk/Dv head dims.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eagle_trainer.targets.moe import bind_instances, resolve_kernel_impl
from eagle_trainer.targets.packing import current_documents, refuse_documents

IMPLEMENTATIONS = ("auto", "triton", "hf")
LINEAR_ATTENTION_CLASS = "Qwen3NextGatedDeltaNet"


def _refuse_packed(module: nn.Module, args) -> None:
    """Forward pre-hook on HF's linear attention: its state would run on from one packed document into the next."""
    refuse_documents("HF's gated delta net forward (target.gdn_impl=hf, or auto off the GPU)",
                     "set target.gdn_impl=triton (on the CPU with TRITON_INTERPRET=1)")


HF_FORWARD_ARGUMENTS = ("cache_params", "cache", "attention_mask")  # (transformers 5 renamed cache_params to cache)


def _gdn_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    if any(a is not None for a in args) or any(kwargs.get(name) is not None for name in HF_FORWARD_ARGUMENTS):
        _refuse_packed(self, ())
        return type(self).forward(self, hidden_states, *args, **kwargs)
    from eagle_trainer.kernels.gdn import causal_conv1d_silu, chunk_gated_delta_rule, gated_rms_norm, gdn_gating
    cu_seqlens = current_documents()  # [D+1] of a packed batch (B = 1): conv and state restart per document
    b, t, _ = hidden_states.shape
    qkvz, ba = self.in_proj_qkvz(hidden_states), self.in_proj_ba(hidden_states)
    layout = projection_layout(self, qkvz.device)
    if layout is not None and qkvz.is_contiguous():  # q, k, v and z read where the projection wrote them
        g, beta = gdn_gating(ba, ba, self.A_log, self.dt_bias, a_columns=layout.a_columns,
                             b_columns=layout.beta_columns)  # [B, T, Hv], read out of in_proj_ba's output
        mixed = causal_conv1d_silu(qkvz, self.conv1d.weight, self.conv1d.bias, cu_seqlens=cu_seqlens,
                                   column_starts=layout.conv_starts, column_align=layout.conv_align)  # [B, T, C]
        z = layout.gate(qkvz)  # [B, T, Hk, G, Dv], a view
    else:
        query, key, value, z, beta_in, a = self.fix_query_key_value_ordering(qkvz, ba)
        g, beta = gdn_gating(a, beta_in, self.A_log, self.dt_bias)  # [B, T, Hv]
        mixed = torch.cat([x.reshape(b, t, -1) for x in (query, key, value)], dim=-1)  # [B, T, C]
        mixed = causal_conv1d_silu(mixed, self.conv1d.weight, self.conv1d.bias, cu_seqlens=cu_seqlens)
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(b, t, -1, self.head_k_dim)  # [B, T, Hk, Dk]
    key = key.reshape(b, t, -1, self.head_k_dim)
    value = value.reshape(b, t, -1, self.head_v_dim)  # [B, T, Hv, Dv]
    core = chunk_gated_delta_rule(query, key, value, g, beta, cu_seqlens=cu_seqlens, l2norm_qk=True)  # [B, T, Hv, Dv]
    core = gated_rms_norm(core, z, self.norm.weight, self.norm.variance_epsilon)
    return self.out_proj(core.reshape(b, t, -1))


@dataclass(frozen=True)
class ProjectionLayout:
    """Where HF's `fix_query_key_value_ordering` takes q, k, v, z, b and a from the two input projections' columns,
    in the forms our kernels read without copies: the conv channels (q, k, v flattened, in HF's concatenation
    order) as runs of consecutive columns of in_proj_qkvz's output, z as a strided view of it, b and a as column
    indices of in_proj_ba's output."""

    conv_starts: torch.Tensor  # [C / S] int32: the first column of each run of S conv channels
    conv_align: int  # the largest power of two up to 16 dividing every start
    gate_offset: int  # z: column of (key head 0, group member 0, dim 0)
    gate_shape: tuple[int, int, int]  # (Hk, G, Dv)
    gate_strides: tuple[int, int]  # columns from one key head to the next, and between a group's members
    beta_columns: torch.Tensor  # [Hv] int64
    a_columns: torch.Tensor  # [Hv] int64

    def gate(self, qkvz: torch.Tensor) -> torch.Tensor:
        """z [B, T, Hk, G, Dv] as a view of the contiguous in_proj_qkvz output [B, T, W]."""
        b, t, width = qkvz.shape
        return qkvz.as_strided((b, t, *self.gate_shape), (t * width, width, *self.gate_strides, 1),
                               qkvz.storage_offset() + self.gate_offset)


def _runs(columns: torch.Tensor, longest: int = 128) -> tuple[torch.Tensor, int] | None:
    """`columns` [C] as runs of S consecutive columns (the longest power of two up to `longest` that divides C and
    holds), -> (their starts, S); None if no run of 16 or more does."""
    run = longest
    while run >= 16:
        if columns.numel() % run == 0:
            grid = columns.view(-1, run)
            if torch.equal(grid - grid[:, :1], torch.arange(run).expand_as(grid)):
                return grid[:, 0], run
        run //= 2
    return None


def _derive_layout(module: nn.Module) -> ProjectionLayout | None:
    """Run the module's own `fix_query_key_value_ordering` on column numbers: whatever HF's layout, the tensors it
    returns say which column each element comes from. None when that is not expressible as runs and strides."""
    hk, hv, dv = module.num_k_heads, module.num_v_heads, module.head_v_dim
    group = hv // hk
    qkvz_cols = torch.arange(module.in_proj_qkvz.out_features).view(1, 1, -1)
    ba_cols = torch.arange(module.in_proj_ba.out_features).view(1, 1, -1)
    query, key, value, z, beta_cols, a_cols = module.fix_query_key_value_ordering(qkvz_cols, ba_cols)
    conv = _runs(torch.cat([x.reshape(-1) for x in (query, key, value)]))
    z = z.reshape(hk, group, dv)
    offset = int(z[0, 0, 0])
    step_head = int(z[1, 0, 0]) - offset if hk > 1 else 0
    step_member = int(z[0, 1, 0]) - offset if group > 1 else 0
    expect = (offset + torch.arange(hk)[:, None, None] * step_head + torch.arange(group)[None, :, None] * step_member
              + torch.arange(dv)[None, None, :])
    if conv is None or step_head < 0 or step_member < 0 or not torch.equal(z, expect):
        return None
    align = 16
    while align > 1 and bool((conv[0] % align).any()):
        align //= 2
    return ProjectionLayout(conv_starts=conv[0].to(torch.int32), conv_align=align, gate_offset=offset,
                            gate_shape=(hk, group, dv), gate_strides=(step_head, step_member),
                            beta_columns=beta_cols.reshape(-1), a_columns=a_cols.reshape(-1))


def projection_layout(module: nn.Module, device: torch.device) -> ProjectionLayout | None:
    """The module's ProjectionLayout on `device`, derived once and kept on the module."""
    cached = module.__dict__.get("_eagle_projection_layout")
    if cached is None or cached[0] != device:
        layout = _derive_layout(module)
        if layout is not None:
            layout = dataclasses.replace(layout, **{name: getattr(layout, name).to(device)
                                                    for name in ("conv_starts", "beta_columns", "a_columns")})
        cached = module._eagle_projection_layout = (device, layout)
    return cached[1]


def resolve_gdn_impl(impl: str, device: torch.device) -> str:
    return resolve_kernel_impl("gdn_impl", impl, IMPLEMENTATIONS, device)


def bind_gdn(model: nn.Module, cfg: Any) -> str:
    """Give every linear-attention module of `model` our forward, or HF's back behind the packed-batch guard, per
    `cfg.gdn_impl`; returns the implementation bound."""
    impl = resolve_gdn_impl(cfg.gdn_impl, next(model.parameters()).device)
    bind_instances(model, "gdn_impl", impl, (LINEAR_ATTENTION_CLASS,), _gdn_forward)
    for module in model.modules():
        if type(module).__name__ == LINEAR_ATTENTION_CLASS:
            guard = module.__dict__.pop("_eagle_packing_guard", None)  # from an earlier binding
            if guard is not None:
                guard.remove()
            if impl != "triton":
                module._eagle_packing_guard = module.register_forward_pre_hook(_refuse_packed)
    return impl


class RecurrentStates:
    """The gated delta net layers' state through speculative decoding, so that one target forward verifies a whole
    draft tree (or chain) on Qwen3-Next, as it does on attention-only targets.

    An attention layer sees a tree through its mask and is rolled back by dropping KV entries; a recurrent layer has
    one state per sequence, which neither works for. So while attached, each linear-attention module runs this
    object's forward instead of its own, with the states kept here, not in HF's cache (the full-attention layers keep
    using it):

        committed   per layer: the last K-1 conv inputs [K-1, C] and the recurrent state [Hv, Dk, Dv] after the
                    committed tokens
        chain       begin(None), then a forward of n tokens that continue the committed ones (the prefill): the
                    states run on through them and are committed at once
        tree        begin(parents), then a forward of n nodes, parents first (parents[i] the node index of node i's
                    parent, -1 for the committed sequence): node i's conv window is its own ancestors' inputs (then
                    the committed ones) and its recurrent state its parent's, advanced by its own token. Every
                    node's state is kept until commit(rows) names the nodes accepted (a root-first chain): the
                    committed state becomes the last one's, without running the accepted tokens again.

    The update is HF's token-by-token gated delta rule (l2-normalised q and k, q scaled by Dk^-0.5, state decayed by
    exp(g), delta rule with beta), in fp32 or the inputs' wider dtype. A module bound to our GDN core
    (gdn_impl=triton: the GPU default) decodes with our kernels: g/beta gating, one launch per layer that normalises
    q and k and walks the nodes (kernels/gdn/tree.py), the gated RMSNorm. Otherwise HF's element-wise ops and the
    rule's plain-torch reference run. A long chain (the prefill) uses the module's own chunked form when its modeling
    code has one. Shapes: n tokens of a forward, C conv channels, K conv width.
    """

    CHUNKED_FROM = 16  # a chain this long (the prefill) runs the chunked form

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if type(m).__name__ == LINEAR_ATTENTION_CLASS]
        if not self.modules:
            raise ValueError(f"{type(model).__name__} has no {LINEAR_ATTENTION_CLASS} modules")
        self.conv: list[torch.Tensor | None] = [None] * len(self.modules)  # [K-1, C] committed conv inputs
        self.state: list[torch.Tensor | None] = [None] * len(self.modules)  # [Hv, Dk, Dv] committed state
        self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.modules)  # tree nodes'
        self.parents: list[int] | None = None
        self._parents_tensor = self._window = None  # made by a forward's first layer, for all of them
        self._saved = [m.__dict__.get("forward") for m in self.modules]
        # a module bound to our GDN core (gdn_impl=triton) decodes with our kernels too, else with HF's element-wise
        # ops and the torch reference of the tree rule
        self.kernels = [getattr(saved, "__func__", None) is _gdn_forward for saved in self._saved]
        for index, module in enumerate(self.modules):
            module.forward = functools.partial(self._forward, index, module)

    def close(self) -> None:
        """Give every module its own forward back (the one bound before, or its class's)."""
        for module, saved in zip(self.modules, self._saved):
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved

    @staticmethod
    def attention_mask(mask: torch.Tensor) -> dict:
        """A prepared [1, 1, n, S] mask for the full-attention layers; the recurrent ones take none."""
        return {"full_attention": mask, "linear_attention": None}

    def begin(self, parents: list[int] | None) -> None:
        """The next forward: a chain continuing the committed tokens (None), or tree nodes with these parents."""
        self.parents = parents
        self._parents_tensor = self._window = None

    def commit(self, rows: list[int]) -> None:
        """Commit tree nodes `rows` (a chain from the committed sequence, root first) of the last forward."""
        for index, pending in enumerate(self.pending):
            inputs, states = pending
            self.conv[index] = torch.cat([self.conv[index], inputs[rows]])[-self.conv[index].shape[0]:]
            self.state[index] = states[rows[-1]]
            self.pending[index] = None

    def _forward(self, index: int, module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.shape[0] != 1:
            raise ValueError(f"speculative decoding runs one sequence, got a batch of {hidden_states.shape[0]}")
        n = hidden_states.shape[1]
        query, key, value, z, beta_in, a = module.fix_query_key_value_ordering(module.in_proj_qkvz(hidden_states),
                                                                               module.in_proj_ba(hidden_states))
        inputs = torch.cat([x.reshape(n, -1) for x in (query, key, value)], dim=-1)  # [n, C]
        width = module.conv_kernel_size
        if self.conv[index] is None:
            self.conv[index] = inputs.new_zeros(width - 1, inputs.shape[1])
        mixed = F.silu(self._conv(index, module, inputs, width))
        query, key, value = torch.split(mixed, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
        query = query.reshape(1, n, -1, module.head_k_dim)  # [1, n, Hk, Dk]
        key = key.reshape(1, n, -1, module.head_k_dim)
        value = value.reshape(1, n, -1, module.head_v_dim)  # [1, n, Hv, Dv]
        from eagle_trainer.kernels.gdn import gated_rms_norm, gdn_gating
        if self.kernels[index]:
            g, beta = gdn_gating(a, beta_in, module.A_log, module.dt_bias)  # [1, n, Hv]
        else:
            beta = beta_in.sigmoid()  # [1, n, Hv]
            g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
        core, states = self._recurrence(index, module, query, key, value, g, beta)  # [1, n, Hv, Dv]
        if self.parents is not None:  # kept until commit() names the accepted nodes
            self.pending[index] = (inputs, states)
        if self.kernels[index]:
            core = gated_rms_norm(core, z, module.norm.weight, module.norm.variance_epsilon)
        else:
            core = module.norm(core.reshape(-1, core.shape[-1]), z.reshape(-1, z.shape[-1]))
        return module.out_proj(core.reshape(1, n, -1))

    def _conv(self, index: int, module: nn.Module, inputs: torch.Tensor, width: int) -> torch.Tensor:
        """Causal depthwise conv of `inputs` [n, C] over each token's own history -> [n, C] (before the SiLU)."""
        weight, bias = module.conv1d.weight[:, 0, :], module.conv1d.bias  # [C, K]
        sources = torch.cat([self.conv[index], inputs]).to(weight.dtype)  # [K-1+n, C]: committed, then the new
        if self.parents is None:  # a chain: committed at once
            out = F.conv1d(sources.T[None], weight[:, None, :], bias, groups=weight.shape[0])[0].T
            self.conv[index] = sources[-(width - 1):].to(inputs.dtype)
        else:
            gathered = sources[self._conv_window(inputs.shape[0], width, inputs.device)]  # [n, K, C]
            out = (gathered * weight.T[None]).sum(1) + (0 if bias is None else bias)
        return out.to(inputs.dtype)

    def _conv_window(self, n: int, width: int, device: torch.device) -> torch.Tensor:
        """[n, K] rows of [committed conv inputs (K-1), the n new ones] in node i's conv window, oldest first: its
        ancestors' inputs back from itself, then the committed ones from the newest; made once per tree forward."""
        if self._window is None:
            window = []
            for i in range(n):
                row, node, back = [], i, width - 2
                while len(row) < width:
                    if node >= 0:
                        row.append(width - 1 + node)
                        node = self.parents[node]
                    else:
                        row.append(back)
                        back -= 1
                window.append(row[::-1])
            self._window = torch.tensor(window, device=device)
        return self._window

    def _recurrence(self, index: int, module: nn.Module, query, key, value, g, beta):
        """-> (output [1, n, Hv, Dv], every node's state [n, Hv, Dk, Dv] or None for the chunked form); a chain
        commits its last state."""
        n, dtype = value.shape[1], value.dtype
        chunked = getattr(sys.modules[type(module).__module__], "torch_chunk_gated_delta_rule", None)
        if self.parents is None and n >= self.CHUNKED_FROM and chunked is not None:
            before = self.state[index]
            group = value.shape[2] // key.shape[2]  # heads expanded here: transformers 5.17's function expects it
            query, key = (x.repeat_interleave(group, dim=2) for x in (query, key))
            out, after = chunked(query, key, value, g=g, beta=beta,
                                 initial_state=None if before is None else before[None],
                                 output_final_state=True, use_qk_l2norm_in_kernel=True)
            self.state[index] = after[0]
            return out.to(dtype), None
        from eagle_trainer.kernels.gdn import tree_gated_delta_rule, tree_gated_delta_rule_reference
        committed = self.state[index]
        if committed is None:
            committed = value.new_zeros(value.shape[2], key.shape[-1], value.shape[-1],
                                        dtype=torch.promote_types(dtype, torch.float32))
        rule = tree_gated_delta_rule if self.kernels[index] else tree_gated_delta_rule_reference
        # q and k as projected: the rule normalises them, scales q by Dk^-0.5 and groups the value heads
        out, states = rule(query[0], key[0], value[0], g[0], beta[0], self._parent_index(n, value.device), committed)
        if self.parents is None:
            self.state[index] = states[-1]
        return out[None].to(dtype), states

    def _parent_index(self, n: int, device: torch.device) -> torch.Tensor:
        """The forward's parents [n] on `device` (a chain's: each token the previous one's child), made once for all
        of its layers."""
        if self._parents_tensor is None:
            parents = self.parents if self.parents is not None else list(range(-1, n - 1))
            self._parents_tensor = torch.tensor(parents, device=device)
        return self._parents_tensor

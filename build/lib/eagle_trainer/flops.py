"""FLOP counts of one training step, for throughput in TFLOP/s and MFU.

Counted the way Megatron-LM counts them: matrix multiplies only, 2 FLOPs per multiply-add, the backward pass
twice the forward; causal attention counts the (T+1)/2 keys a token sees on average (Megatron: T/2). Norms, activations, softmax and the
router's top-k are not counted.

    target forward, per token of a sequence of T tokens (summed over layers):
      attention layer     2 * [H * (q + k + v + gate) + q * (T+1)/2 * 2 + q * H]  q = nh*D, k = v = nkv*D,
                                                                                   gate = q with an output gate
      gated delta net     2 * [H * (2*qk + 2*v + 2*Hv) + Kc * (2*qk + v) + 4 * Hv * Dv^2 + v * H]
                          (qk = Hk*Dk, v = Hv*Dv; Kc the conv kernel; Megatron's Qwen3-Next accounting)
      dense MLP           2 * 3 * H * I
      MoE MLP             2 * [H * E + 3 * H * I_moe * k + 3 * H * I_shared + H]   router, top-k experts,
                                                                                   shared expert and its gate
      teacher             2 * H * (Vd + V)    draft-vocab logits, and the full-vocab argmax mask when on
    draft (one TTT step k of K, per token): its layer's projections and MLP, attention over the t+1 causal
    step-0 keys plus k diagonal ones, its lm_head over Vd (EAGLE-1: the target lm_head's Vd rows); EAGLE-3 adds
    fc over the 3 aux states once. Training = 3 x the draft forward (the frozen embedding gets no gradient).

Shapes: H hidden, nh/nkv heads, D head dim, I MLP width, E experts, k top-k, V vocab, Vd draft vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

from eagle_trainer.types import TargetInfo

# Dense bf16 tensor-core peak of each GPU (TFLOP/s, no sparsity), by a substring of its CUDA name.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak for a device name ('NVIDIA H100 80GB HBM3' -> 989.4), or None if unknown."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # H200 before H20
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


@dataclass(frozen=True)
class TargetFlops:
    """A target's shape, as far as FLOPs go; `from_target` reads dense Qwen3, Qwen3-MoE and Qwen3-Next."""

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attn_output_gate: bool
    layer_types: tuple[str, ...]  # per layer: "full_attention" | "linear_attention"
    mlp_types: tuple[str, ...]  # per layer: "dense" | "moe"
    intermediate_size: int
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0

    @classmethod
    def from_target(cls, info: TargetInfo, config) -> "TargetFlops":
        """The widths, head counts and expert counts the registered TargetSpec read (`spec.read_info`: `info`);
        from the HF `config` only what TargetInfo does not describe: which layers are linear attention (and its
        widths), which MLPs are sparse, and the shared expert's width."""
        layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * info.num_layers)
        layer_types = tuple("linear_attention" if t == "linear_attention" else "full_attention" for t in layer_types)
        num_experts = info.num_experts or 0
        sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
        dense_only = set(getattr(config, "mlp_only_layers", None) or [])
        mlp_types = tuple("moe" if num_experts and i not in dense_only and (i + 1) % sparse_step == 0 else "dense"
                          for i in range(info.num_layers))
        return cls(
            hidden_size=info.hidden_size, vocab_size=info.vocab_size, num_heads=info.num_heads,
            num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
            attn_output_gate="linear_attention" in layer_types,  # Qwen3-Next's full attention has an output gate
            layer_types=layer_types, mlp_types=mlp_types, intermediate_size=info.intermediate_size,
            num_experts=num_experts, top_k=info.num_experts_per_tok or 0,
            moe_intermediate_size=info.moe_intermediate_size or 0,
            shared_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
            linear_key_heads=getattr(config, "linear_num_key_heads", 0) or 0,
            linear_value_heads=getattr(config, "linear_num_value_heads", 0) or 0,
            linear_key_head_dim=getattr(config, "linear_key_head_dim", 0) or 0,
            linear_value_head_dim=getattr(config, "linear_value_head_dim", 0) or 0,
            linear_conv_kernel=getattr(config, "linear_conv_kernel_dim", 0) or 0,
        )

    def attention(self, seq_len: int) -> float:
        """One full-attention layer's forward, per token, at sequence length T (causal: (T+1)/2 keys on average)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        gate = q if self.attn_output_gate else 0
        return 2 * (h * (q + 2 * kv + gate) + q * (seq_len + 1) / 2 * 2 + q * h)

    def gated_delta_net(self) -> float:
        """One gated-delta-net layer's forward, per token (linear in T: no T term)."""
        h, hv = self.hidden_size, self.linear_value_heads
        qk, v = self.linear_key_heads * self.linear_key_head_dim, hv * self.linear_value_head_dim
        return 2 * (h * (2 * qk + 2 * v + 2 * hv) + self.linear_conv_kernel * (2 * qk + v)
                    + 4 * hv * self.linear_value_head_dim**2 + v * h)

    def mlp(self, kind: str) -> float:
        h = self.hidden_size
        if kind == "dense":
            return 2 * 3 * h * self.intermediate_size
        shared = 3 * h * self.shared_intermediate_size + (h if self.shared_intermediate_size else 0)
        return 2 * (h * self.num_experts + 3 * h * self.moe_intermediate_size * self.top_k + shared)

    def forward(self, seq_len: int, draft_vocab: int, argmax_mask: bool = True) -> float:
        """Forward FLOPs of one sequence of `seq_len` tokens, teacher included."""
        per_token = sum(self.attention(seq_len) if t == "full_attention" else self.gated_delta_net()
                        for t in self.layer_types)
        per_token += sum(self.mlp(kind) for kind in self.mlp_types)
        per_token += 2 * self.hidden_size * (draft_vocab + (self.vocab_size if argmax_mask else 0))
        return per_token * seq_len


def draft_forward(cfg, seq_len: int, num_steps: int) -> float:
    """Forward FLOPs of the draft's K-step unroll over one sequence, from the shape fields every draft config has
    (drafts/llama.py): the layers' input width, and fc's input width and whether it runs every step."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = 2 * (cfg.layer_input_size * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size)
    per_step = layer * cfg.num_layers + 2 * h * cfg.draft_vocab_size  # + lm_head over the draft vocab
    fc = 2 * cfg.fc_in_features * h
    if cfg.fc_every_step:
        per_step += fc
    total = per_step * seq_len * num_steps
    if not cfg.fc_every_step:
        total += fc * seq_len  # once, before the unroll
    for k in range(num_steps):  # attention: causal step-0 keys (t+1 on average (T+1)/2) plus k diagonal keys
        total += cfg.num_layers * 2 * 2 * q * seq_len * ((seq_len + 1) / 2 + k)
    return total


def step_flops(target: TargetFlops | None, draft_cfg, lengths: list[int], num_steps: int, argmax_mask: bool) -> float:
    """FLOPs of one training step over sequences of `lengths`: target forward (None: offline, no target) plus
    3 x the draft forward (forward, and a backward of twice its cost)."""
    total = 0.0
    for n in lengths:
        if target is not None:
            total += target.forward(n, draft_cfg.draft_vocab_size, argmax_mask)
        total += 3 * draft_forward(draft_cfg, n, num_steps)
    return total

"""Qwen3-Next gated delta net (linear attention) forward for frozen targets.

    conv.py        causal depthwise conv1d + SiLU over packed documents (cu_seqlens)
    gating.py      g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)
    chunk.py       the chunked gated delta rule (chunk 64, WY form): a parallel prepare kernel (T = (I + A)^-1,
                   Aqk, q/k norms) and a recurrent kernel that keeps the state on chip; grouped value heads
    norm.py        gated RMSNorm * silu(z) epilogue
    tree.py        the delta rule over a draft tree (each node from its parent's state; every node's state kept;
                   q and k normalised and grouped inside), one launch per layer, for verifying speculative drafts
                   on Qwen3-Next (targets/gdn.py)
    reference.py   plain-torch references of all four (the delta rule token by token in fp64)

Bound into the Qwen3-Next target by targets/gdn.py (gdn_impl auto = these kernels on a GPU). Tested in fp32
under the Triton interpreter against the references and HF's pure-torch code, and in bf16 on an H100 against
HF's torch path and fla; `benchmarks/gdn.py` times the core against fla's chunk_gated_delta_rule.

Shapes: T tokens (or T_total packed with cu_seqlens [N+1] int32), C conv channels (2*key_dim + value_dim),
Hk/Hv key/value heads, D head dim.
"""

from eagle_trainer.kernels.gdn.chunk import chunk_gated_delta_rule
from eagle_trainer.kernels.gdn.conv import causal_conv1d_silu
from eagle_trainer.kernels.gdn.gating import gdn_gating
from eagle_trainer.kernels.gdn.norm import gated_rms_norm
from eagle_trainer.kernels.gdn.reference import gated_delta_rule_reference, tree_gated_delta_rule_reference
from eagle_trainer.kernels.gdn.tree import tree_gated_delta_rule

__all__ = ["causal_conv1d_silu", "chunk_gated_delta_rule", "gated_delta_rule_reference", "gated_rms_norm",
           "gdn_gating", "tree_gated_delta_rule", "tree_gated_delta_rule_reference"]

"""TTT attention with a fused step-0 kernel and the diagonal terms merged through the log-sum-exp.

At TTT step k, query t attends the step-0 keys <= t (causal; with packing also same-document) and the k diagonal
keys of steps 1..k at t. The step-0 block is one library attention call that also returns its log-sum-exp; the
diagonal terms join it in Triton kernels through the log-sum-exp, forward and backward.

    ttt_attention(q [B, nh, T, D], k0, v0 [B, nkv, T, D], diag_k, diag_v: lists of [B, nkv, T, D],
                  step0=step0_kernel(device, documents), store=DiagonalStore(K - 1)) -> [B, nh, T, D]

    attention.py   ttt_attention, its autograd Function and the unroll's DiagonalStore
    step0.py       the step-0 attention: FlashAttention-2 (varlen when packed) or aten's CPU flash attention
    merge.py       the Triton merge kernels (forward, backward) and their launchers
    reference.py   the merge kernels in plain torch
"""

from eagle_trainer.kernels.ttt_attention.attention import DiagonalStore, ttt_attention
from eagle_trainer.kernels.ttt_attention.merge import merge_backward, merge_forward
from eagle_trainer.kernels.ttt_attention.step0 import step0_kernel

__all__ = ["DiagonalStore", "merge_backward", "merge_forward", "step0_kernel", "ttt_attention"]

"""Fused RMSNorm forward for frozen targets: one read of x, one write of y (HF's module makes ~6 passes).

    rms_norm(x [..., D], weight [D], eps, zero_centred=False) -> [..., D]

    fused.py       the Triton kernel, its launcher and rms_norm (plain and zero-centred, HF's arithmetic)
    reference.py   both forms in plain torch

Rows are independent: batch invariant by construction. Bound into the targets by targets/norms.py.
"""

from eagle_trainer.kernels.rmsnorm.fused import rms_norm

__all__ = ["rms_norm"]

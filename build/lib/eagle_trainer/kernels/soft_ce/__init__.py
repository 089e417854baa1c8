"""Soft cross-entropy of draft logits against a teacher given by its logits, with the gradient, in one kernel.

    soft_ce_rows(z [C, V], teacher [C, V], weight [C] fp32[, stats]) -> (dz [C, V], ce [C] fp32, hit [C] fp32)
    teacher_stats(teacher [C, V]) -> (log-sum-exp [C] fp32, argmax [C] int64)     what soft_ce_rows reads of it
    row_max(x [C, V]) -> (max [C] fp32, argmax [C] int64)

    rows.py        the Triton kernels, their launchers and the public functions (the arithmetic is there)
    reference.py   the same functions in plain torch (the loss head's CPU path)

Rows are independent.
"""

from eagle_trainer.kernels.soft_ce.reference import row_max_reference, soft_ce_rows_reference, teacher_stats_reference
from eagle_trainer.kernels.soft_ce.rows import row_max, soft_ce_rows, teacher_stats

__all__ = ["row_max", "row_max_reference", "soft_ce_rows", "soft_ce_rows_reference", "teacher_stats",
           "teacher_stats_reference"]

"""Plain-torch references of the soft cross-entropy row kernel and the row statistics (soft_ce/rows.py)."""

from __future__ import annotations

import torch


def soft_ce_rows_reference(z: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor):
    """z [C, V] draft logits, teacher [C, V] target logits, weight [C] fp32 ->
    (dz [C, V] in z's dtype, ce [C] fp32 (fp64 for fp64 z), hit [C] likewise). See soft_ce/rows.py."""
    acc = torch.promote_types(z.dtype, torch.float32)
    zf, tf = z.to(acc), teacher.to(acc)
    lse = zf.logsumexp(-1)
    p = tf.softmax(-1)
    ce = lse - (p * zf).sum(-1)
    hit = (zf.argmax(-1) == tf.argmax(-1)).to(acc)
    dz = (torch.exp(zf - lse[:, None]) - p) * weight[:, None].to(acc)
    return dz.to(z.dtype), ce, hit


def teacher_stats_reference(teacher: torch.Tensor):
    """teacher [C, V] -> (log-sum-exp [C] fp32 (fp64 for fp64), argmax [C] int64). See soft_ce/rows.py."""
    acc = torch.promote_types(teacher.dtype, torch.float32)
    return teacher.to(acc).logsumexp(-1), teacher.argmax(-1)


def row_max_reference(x: torch.Tensor):
    """x [C, V] -> (max [C] fp32 (fp64 for fp64), argmax [C] int64). See soft_ce/rows.py."""
    value, arg = x.max(-1)
    return value.to(torch.promote_types(x.dtype, torch.float32)), arg

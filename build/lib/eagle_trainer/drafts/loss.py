"""The TTT loss: which positions each step trains on, and the per-step loss loop every draft kind uses.

Step k at position t predicts token t+2+k from the target distribution at t+1+k (`step_valid_mask` says where
that exists). Each step's loss is averaged over its valid tokens (all ranks' under data parallelism, see
`GlobalCounts`) and weighted step_weight**k; `step_losses` is that loop, and a kind supplies the per-step term
(EAGLE-3: soft cross-entropy, `ttt_loss`; EAGLE-1: feature regression plus soft cross-entropy). The fused EAGLE-3
head (soft_ce.py) runs the same loop inside one autograd function.

Shapes: B batch, T tokens, Vd draft vocab, K steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from eagle_trainer.types import HostCopy


def shift_left(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x[:, t] <- x[:, t + n] along dim 1, padding the last n positions with `fill`."""
    if n == 0:
        return x
    kept = x[:, n:]
    pad = x.new_full((x.shape[0], x.shape[1] - kept.shape[1], *x.shape[2:]), fill)
    return torch.cat([kept, pad], dim=1)


@dataclass
class TTTLoss:
    """A batch's TTT loss and per-step metrics. They stay on the device until `start_host_copy` or a first read
    (one host copy of all of them); the trainer queues the copy before backward and reads it after queuing backward,
    so the read waits for the forward pass alone."""

    loss: torch.Tensor  # scalar, weighted over steps
    stats: torch.Tensor  # [K, 3 + len(extra_names)]: per step the loss, accuracy, valid count, then extra columns
    extra_names: tuple[str, ...] = ()  # further per-step metrics to log (e.g. EAGLE-1 feature_loss)
    # applied to [loss, stats] before they are copied to the host: under data parallelism their sum over ranks
    # (each rank's loss and per-step metrics are its part of the global batch's, see GlobalCounts)
    reduce_metrics: Callable[[torch.Tensor], torch.Tensor] | None = None

    def start_host_copy(self) -> None:
        """Queue the copy of the loss and the metrics to the host now, without waiting. Called before backward is
        queued, a later read waits for the forward pass alone: a read (`.item()`) queued behind backward waits for
        all of it, and the GPU then idles while the host queues the optimizer step and the next batch."""
        self._copy  # noqa: B018 (the cached property queues the copy)

    @functools.cached_property
    def _copy(self) -> HostCopy:
        values = torch.cat([self.loss.detach().reshape(1).to(self.stats.dtype), self.stats.detach().flatten()])
        return HostCopy(values if self.reduce_metrics is None else self.reduce_metrics(values))

    @functools.cached_property
    def _values(self) -> list[float]:
        return self._copy.tolist()

    @property
    def host_loss(self) -> float:
        """The loss as a float (from the copy `start_host_copy` queued, else queued now)."""
        return self._values[0]

    @functools.cached_property
    def _host(self) -> list[list[float]]:
        return torch.tensor(self._values[1:], dtype=torch.float64).view(self.stats.shape).T.tolist()  # exact floats

    @property
    def step_loss(self) -> list[float]:
        return self._host[0]

    @property
    def step_acc(self) -> list[float]:
        return self._host[1]

    @property
    def step_count(self) -> list[int]:
        return [int(c) for c in self._host[2]]

    @property
    def extra(self) -> dict[str, list[float]]:
        return dict(zip(self.extra_names, self._host[3:], strict=True))


def step_valid_mask(loss_mask: torch.Tensor, attention_mask: torch.Tensor, teacher_valid: torch.Tensor,
                    num_steps: int, documents: torch.Tensor | None = None) -> list[torch.Tensor]:
    """valid[k][b, t]: step k at t predicts token t+2+k, which must exist and be an assistant token,
    and the label position t+1+k must have a usable teacher. Positions past the end are masked.
    Packed (documents [B, T]): token t+2+k must also be in t's document (so are its input tokens and label)."""
    predicts_loss_token = shift_left(loss_mask & attention_mask, 1, fill=False)  # at p: token p+1 is a loss token
    label_ok = predicts_loss_token & teacher_valid
    valid = [shift_left(label_ok, 1 + k, fill=False) for k in range(num_steps)]
    if documents is not None:
        valid = [v & (documents == shift_left(documents, 2 + k, fill=-1)) for k, v in enumerate(valid)]
    return valid


# (this rank's valid tokens per TTT step [K]) -> the counts each step's loss is normalised by: the identity on one
# process; under data parallelism their sum over ranks, so that the ranks' losses add up to the loss of the global
# batch (the trainer scales the backward by the world size, as DDP averages the gradients)
GlobalCounts = Callable[[torch.Tensor], torch.Tensor]


def step_counts(valid: list[torch.Tensor], global_counts: GlobalCounts | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's valid tokens per step [K] int64, the counts the step losses are normalised by)."""
    counts = torch.stack([v.sum() for v in valid])
    return counts, counts if global_counts is None else global_counts(counts)


def step_losses(valid: list[torch.Tensor], step_weight: float, global_counts: GlobalCounts | None,
                dtype: torch.dtype, step_term: Callable, extra_names: tuple[str, ...] = ()) -> TTTLoss:
    """sum_k step_weight**k * loss_k, with per-step metrics. `step_term(k, mask, n)` -> (loss_k, accuracy_k,
    extras_k): step k's loss over its valid tokens (`mask` [B, T] in `dtype`, normalised by `n`) as a scalar, its
    accuracy (draft argmax == teacher argmax), and a tuple of further detached metrics named by `extra_names`."""
    counts, norm = step_counts(valid, global_counts)
    total = torch.zeros((), dtype=dtype, device=valid[0].device)
    stats = []  # per step: loss, accuracy, count, extras (kept on device; one host copy at the end)
    for k in range(len(valid)):
        mask = valid[k].to(dtype)
        n = norm[k].to(dtype).clamp_min(1)
        step, accuracy, extras = step_term(k, mask, n)
        total = total + step_weight**k * step
        stats.append(torch.stack([step.detach(), accuracy, counts[k].to(dtype), *extras]))
    return TTTLoss(total, torch.stack(stats), extra_names=extra_names)


def soft_cross_entropy(logits: torch.Tensor, teacher_probs: torch.Tensor, teacher_top: torch.Tensor, k: int,
                       mask: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step k's soft cross-entropy of `logits` [B, T, Vd] against the teacher at t+1+k, averaged over the valid
    tokens, and its accuracy (argmax against the teacher's argmax `teacher_top` [B, T]), in `mask`'s dtype."""
    labels = shift_left(teacher_probs, 1 + k)  # [B, T, Vd]: target distribution at t+1+k
    ce = -(labels * F.log_softmax(logits.to(mask.dtype), dim=-1)).sum(-1)  # [B, T]
    with torch.no_grad():
        hit = (logits.argmax(-1) == shift_left(teacher_top, 1 + k)).to(mask.dtype)
        accuracy = (hit * mask).sum() / n
    return (ce * mask).sum() / n, accuracy


def ttt_loss(step_logits: list[torch.Tensor], teacher_probs: torch.Tensor, valid: list[torch.Tensor],
             step_weight: float, global_counts: GlobalCounts | None = None) -> TTTLoss:
    """Soft cross-entropy against the teacher per step (the unfused EAGLE-3 head and the reference of the fused
    one)."""
    teacher_top = teacher_probs.argmax(-1)

    def step_term(k, mask, n):
        return *soft_cross_entropy(step_logits[k], teacher_probs, teacher_top, k, mask, n), ()

    return step_losses(valid, step_weight, global_counts, torch.float32, step_term)


def simulated_acceptance(step_acc: list[float]) -> float:
    """Expected tokens per target forward with a K-token chain: 1 + sum_k prod_{j<=k} acc_j.

    acc_j is measured with ground-truth inputs, so this is the usual optimistic proxy; evaluate/ measures
    the real thing."""
    tau, run = 1.0, 1.0
    for acc in step_acc:
        run *= acc
        tau += run
    return tau

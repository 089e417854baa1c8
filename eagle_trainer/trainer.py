"""The training loop: batch -> frozen target -> draft loss -> AdamW step; logging, eval, checkpoints.

The loop knows nothing of a concrete target or draft: the target gives TargetOutputs, the registry's
algorithm entry gives the loss. Draft weights stay fp32 (master weights); on the GPU the draft runs under
bf16 autocast. Only rank 0 writes files.

Under data parallelism (parallel.ParallelDims over several ranks) each rank runs its part of every global batch
through the draft under DDP. The step losses are normalised by the valid tokens of all ranks (`GlobalCounts`), so
the ranks' losses add up to the global batch's and the summed gradients are the global batch's; the backward is
scaled by the world size because DDP averages. Logged metrics are summed over ranks before the host reads them,
so every rank sees the same loss and takes the same skip decisions.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from eagle_trainer.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from eagle_trainer.config import DraftConfig, LogConfig, OptimConfig, TrainConfig
from eagle_trainer.drafts import frozen_weights_to
from eagle_trainer.drafts.attention import pick_attention
from eagle_trainer.drafts.loss import simulated_acceptance
from eagle_trainer.drafts.policy import apply_compile, apply_recompute, recompute_on
from eagle_trainer.metrics import MetricsLogger, plot_metrics
from eagle_trainer.parallel import ParallelDims, all_ranks_sum, replicate
from eagle_trainer.registry import DraftSpec
from eagle_trainer.types import Batch, HostCopy


def cosine_schedule(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine down to `min_lr_ratio`."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `guarded_step` can skip this optimizer's update on the device: torch's fused Adam and AdamW read a
    `found_inf` flag (as GradScaler sets it) and, where it is 1, leave the parameters, moments and step count as
    they were."""
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))


def guarded_step(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
    """optimizer.step(), skipped where `grad_norm` is not finite: on the device for `skips_on_device` optimizers (no
    host sync, so the host queues the update and the next batch while the GPU still runs backward), else by
    reading the norm."""
    if not skips_on_device(optimizer):
        if math.isfinite(float(grad_norm)):
            optimizer.step()
        return
    optimizer.found_inf = (~torch.isfinite(grad_norm)).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@dataclass
class Summary:
    steps: int = 0
    final_loss: float = float("nan")
    train_acc: list[float] = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0  # all ranks' tokens
    world_size: int = 1
    wall_s: float = 0.0
    checkpoint: str = ""
    accept_before: dict = field(default_factory=dict)  # mode -> real acceptance length
    accept_after: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)  # {"step", "accept_len", "mode", "checkpoint"} of checkpoints/best
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    flop_rates: dict = field(default_factory=dict)  # {"tflops_per_s", "mfu"} over the training time


class DraftLoss(torch.nn.Module):
    """The draft and its algorithm's loss as one module: what DDP wraps (its forward must be the draft's whole
    use in a step for DDP to reduce the gradients)."""

    def __init__(self, draft: torch.nn.Module, loss: Callable, draft_cfg: DraftConfig, attention: str,
                 global_counts: Callable | None):
        super().__init__()
        self.draft, self.loss = draft, loss
        self.draft_cfg, self.attention, self.global_counts = draft_cfg, attention, global_counts

    def forward(self, batch: Batch, outputs):
        return self.loss(self.draft, batch, outputs, self.draft_cfg, self.attention, global_counts=self.global_counts)


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a NaN/inf loss or gradient (train.max_nonfinite_steps)."""


class Trainer:
    def __init__(self, spec: DraftSpec, target, draft: torch.nn.Module, draft_cfg: DraftConfig, optim: OptimConfig,
                 train: TrainConfig, train_batches: Callable[[int, int], Iterable[Batch]], eval_batches: list[Batch],
                 device: torch.device, parallel: ParallelDims | None = None, acceptance: Callable[[], dict] | None = None,
                 accept_every: int = 0, log: LogConfig | None = None, data_fingerprint: str = "",
                 resume_from: str | Path | None = None, run_config: dict | None = None,
                 flops: Callable[[list[int]], float] | None = None, peak_tflops: float | None = None):
        """`train_batches(epoch, start)` yields this rank's batches of one epoch from batch `start` on (padded
        or packed: tokens/s and FLOPs count real tokens, per document).
        `flops(lengths)`: FLOPs of a training step over sequences of those lengths (flops.step_flops), logged as
        TFLOP/s, and as MFU against `peak_tflops` (the device's bf16 dense peak) when that is known.
        `parallel`: the ranks of a data-parallel run (None: one process)."""
        self.spec, self.target, self.draft = spec, target, draft
        self.draft_cfg, self.optim_cfg, self.train_cfg = draft_cfg, optim, train
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.parallel = parallel or ParallelDims()
        self.device, self.rank, self.world_size = device, self.parallel.rank, self.parallel.world_size
        self.flops, self.peak_tflops = flops, peak_tflops
        self.run_dir = Path(train.run_dir)
        self.attention = pick_attention(draft_cfg.attention, device)
        # policy from outside the draft: recompute first, so that compile traces the checkpointed pieces (policy.py)
        if recompute_on(draft_cfg.recompute, device):
            apply_recompute(draft)
        if device.type == "cuda":
            apply_compile(draft)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        if self.autocast is not None:
            frozen_weights_to(draft, torch.bfloat16)
        global_counts = (lambda c: all_ranks_sum(c, self.parallel)) if self.parallel.distributed else None
        self.step_loss = DraftLoss(draft, spec.algorithm.loss, draft_cfg, self.attention, global_counts)
        self.replicated = replicate(self.step_loss, self.parallel, device)  # DDP over the ranks (itself on one)
        params = [p for p in draft.parameters() if p.requires_grad]
        # fused: one kernel per step on a GPU; it skips a non-finite update on the device (`guarded_step`)
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay, fused=device.type in ("cuda", "cpu"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_schedule(optim, train.max_steps))
        # the loop's position: optimizer steps taken, and examples (all ranks) used of the current epoch
        self.step, self.epoch, self.examples_in_epoch = 0, 0, 0
        self.skipped_steps, self.nonfinite_in_a_row = 0, 0
        self.last_grad_norm = float("nan")  # of the last update the host has read
        self.data_fingerprint = data_fingerprint
        # acceptance() -> {mode: report} by real speculative decoding (evaluate/acceptance.py); measured every
        # accept_every steps (0: with each checkpoint), at the start and at the end
        self.acceptance, self.accept_every = acceptance, accept_every
        self.best: dict = {}
        self.resumed_from: Path | None = None
        if resume_from is not None:
            self.resume(resume_from)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0, log=log,
                                     resume_step=self.step if self.resumed_from else None, run_config=run_config)

    def _loss(self, batch: Batch, train: bool = False):
        """The batch's loss (through DDP when `train`); its metrics summed over ranks when they are read."""
        with record_function("target forward"):  # the labels name a step's parts in a profile (quality.py --profile)
            outputs = self.target.forward(batch)
        module = self.replicated if train else self.step_loss
        with self.autocast or contextlib.nullcontext(), record_function("draft forward and loss"):
            out = module(batch, outputs)
        if self.parallel.distributed:
            out.reduce_metrics = lambda values: all_ranks_sum(values, self.parallel)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted TTT loss and per-step accuracy on the held-out batches."""
        if not self.eval_batches:
            return {}
        self.draft.eval()
        k = self.draft_cfg.ttt_steps
        loss_sum, weight, hits, counts = 0.0, 0, [0.0] * k, [0] * k
        bar = tqdm(self.eval_batches, desc="eval", leave=False, disable=not self.train_cfg.progress or self.rank != 0)
        for batch in bar:
            out = self._loss(batch.to(self.device))
            loss_sum += out.host_loss * out.step_count[0]  # batches weighted by their step-0 tokens
            weight += out.step_count[0]
            for j in range(k):
                hits[j] += out.step_acc[j] * out.step_count[j]
                counts[j] += out.step_count[j]
        self.draft.train()
        acc = [h / max(c, 1) for h, c in zip(hits, counts)]
        return {"loss": loss_sum / max(weight, 1), "acc": acc, "sim_accept_len": simulated_acceptance(acc)}

    def evaluate_and_log(self) -> dict:
        result = self.evaluate()
        if result:
            self.metrics.log({"split": "eval", "step": self.step, **result})
        return result

    def measure_acceptance(self) -> dict:
        """Real acceptance length per decoding mode, logged; a new best (first mode) is kept in checkpoints/best."""
        if self.acceptance is None:
            return {}
        reports = self.acceptance()
        taus = {mode: rep["accept_len"] for mode, rep in reports.items()}
        self.metrics.log({"split": "accept", "step": self.step, "accept_len": taus,
                          "histogram": {mode: rep["histogram"] for mode, rep in reports.items()}})
        mode, tau = next(iter(taus.items()))
        if not self.best or tau > self.best["accept_len"]:
            path = self.save_checkpoint("best")
            self.best = {"step": self.step, "accept_len": tau, "mode": mode, "checkpoint": str(path)}
            if self.rank == 0:
                (path / "best.json").write_text(json.dumps(self.best))
        return taus

    def trainer_state(self) -> dict:
        """What resumes the loop besides weights, optimizer and RNG (checkpoint.py writes it as JSON)."""
        return {"step": self.step, "epoch": self.epoch, "examples_in_epoch": self.examples_in_epoch,
                "batch_size": self.optim_cfg.batch_size, "world_size": self.world_size,
                "skipped_steps": self.skipped_steps, "data_fingerprint": self.data_fingerprint}

    def save_checkpoint(self, name: str | None = None) -> Path:
        """checkpoints/step_N (or checkpoints/<name>), written atomically; old step_N beyond keep_last deleted."""
        root = self.run_dir / "checkpoints"
        path = save_checkpoint(root / (name or f"step_{self.step:07d}"), self.draft, self.optimizer, self.scheduler,
                               self.trainer_state(), self.device)
        if self.rank == 0 and name is None:
            prune_checkpoints(root, self.train_cfg.keep_last)
        return path

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, scheduler, RNG, step and data position."""
        state = load_checkpoint(path, self.draft, self.optimizer, self.scheduler, self.device)
        if self.data_fingerprint and state.get("data_fingerprint") not in (None, self.data_fingerprint):
            raise ValueError(f"checkpoint {path} was trained on other data (fingerprint {state['data_fingerprint']}, "
                             f"this run {self.data_fingerprint}); the data position would be wrong. Resume with the "
                             "same data.path/tokenizer/max_length, or start fresh with train.resume=none")
        self.step, self.epoch, self.skipped_steps = state["step"], state["epoch"], state.get("skipped_steps", 0)
        per_batch = self.optim_cfg.batch_size * self.world_size
        self.examples_in_epoch = state["examples_in_epoch"] // per_batch * per_batch  # a whole number of batches
        if self.examples_in_epoch != state["examples_in_epoch"]:
            print(f"resume: {state['examples_in_epoch']} examples of epoch {self.epoch} were used with batch "
                  f"{state['batch_size']} x {state['world_size']} ranks; with {self.optim_cfg.batch_size} x "
                  f"{self.world_size} the epoch continues at example {self.examples_in_epoch}")
        best = self.run_dir / "checkpoints" / "best" / "best.json"
        if best.is_file():
            self.best = json.loads(best.read_text())
        self.resumed_from = Path(path)

    def fit(self) -> Summary:
        """Train to max_steps (or epochs); eval at the start, at each checkpoint and at the end."""
        try:
            return self._fit()
        except KeyboardInterrupt:
            self._report_interrupt()
            raise
        finally:
            self.metrics.close()  # flush the TensorBoard / wandb sinks however the run ends

    def _report_interrupt(self) -> None:
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        where = (f"the last checkpoint is {latest}; continue from it with train.resume=latest "
                 f"(train.run_dir={self.run_dir})" if latest else
                 f"no checkpoint was written yet (train.save_every={self.train_cfg.save_every}); start again")
        print(f"interrupted at step {self.step}: {where}", file=sys.stderr)

    def _fit(self) -> Summary:
        cfg = self.train_cfg
        if self.resumed_from is None:
            summary = Summary(eval_before=self.evaluate_and_log(), accept_before=self.measure_acceptance())
        else:  # the start was measured by the run that wrote the checkpoint
            summary = Summary(eval_before=self._first_logged("eval"), accept_before=self._first_logged("accept"))
            print(f"resumed from {self.resumed_from} at step {self.step} (epoch {self.epoch}, "
                  f"{self.examples_in_epoch} examples into it)")
        self.draft.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not cfg.progress or self.rank != 0,
                   dynamic_ncols=True)
        start, tokens, window_tokens, window_start = time.perf_counter(), 0, 0, time.perf_counter()
        total_flops, window_flops = 0.0, 0.0
        paused_total = 0.0  # seconds of checkpoints and evals inside the loop
        accum = self.optim_cfg.grad_accum
        per_batch = self.optim_cfg.batch_size * self.world_size  # examples per micro-batch, all ranks
        # an update `guarded_step` queued whose gradient norm the host has not read: (step, loss, norm). It is read
        # one batch later, when that backward is long done, or where the host needs it (logs, saves, the end).
        pending = None
        while self.step < cfg.max_steps and self.epoch < cfg.epochs:
            micro, finite = 0, True
            self.optimizer.zero_grad(set_to_none=True)  # an unfinished accumulation at an epoch's end is dropped
            for batch in self.train_batches(self.epoch, self.examples_in_epoch // per_batch):
                n_tok = int(batch.attention_mask.sum())  # real tokens, on the host copy: no device sync
                if self.flops is not None:  # per document (a packed row's attention stays within each one)
                    step = self.flops(batch.document_lengths())
                    total_flops, window_flops = total_flops + step, window_flops + step
                batch = batch.to(self.device)
                syncing = (micro + 1) % accum == 0  # DDP reduces the gradients in the last micro-batch's backward
                with contextlib.nullcontext() if syncing or not self.parallel.distributed else self.replicated.no_sync():
                    out = self._loss(batch, train=True)
                    # the loss and metrics are copied to the host before backward is queued and read after it: the
                    # read waits for the forward pass alone, and the GPU runs forward into backward without a wait.
                    # A non-finite loss makes non-finite gradients; the update is skipped below either way.
                    out.start_host_copy()
                    with record_function("draft backward"):
                        (out.loss * self.world_size / accum).backward()
                loss = out.host_loss
                self._settle(pending)  # the last update: done before this forward pass
                pending = None
                finite = finite and math.isfinite(loss)
                micro += 1
                self.examples_in_epoch += per_batch
                tokens += n_tok
                window_tokens += n_tok
                if micro % accum:
                    continue
                with record_function("clip grad norm"):
                    norm = torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.optim_cfg.max_grad_norm)
                if finite and skips_on_device(self.optimizer):
                    guarded_step(self.optimizer, norm)  # no host sync
                    pending = (self.step + 1, loss, HostCopy(norm))  # read later without draining the stream
                else:
                    grad_norm = self.last_grad_norm = float(norm)
                    if finite and math.isfinite(grad_norm):
                        self.optimizer.step()
                        self.nonfinite_in_a_row = 0
                    else:
                        self._skip_step(self.step + 1, loss, grad_norm)
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                finite = True
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc0=f"{out.step_acc[0]:.2f}")
                logging = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
                saving = bool(cfg.save_every) and self.step % cfg.save_every == 0 and self.step < cfg.max_steps
                measuring = self.step < cfg.max_steps and (saving if self.accept_every == 0
                                                           else self.step % self.accept_every == 0)
                if logging or saving or measuring:  # they report or save the skipped-step count
                    self._settle(pending)
                    pending = None
                if logging:
                    now = time.perf_counter()
                    rates = self._flop_rates(window_flops, now - window_start)
                    self.metrics.log({
                        "split": "train", "step": self.step, "epoch": self.epoch, "loss": loss,
                        "acc": out.step_acc, "step_loss": out.step_loss,
                        "sim_accept_len": simulated_acceptance(out.step_acc),
                        "lr": self.scheduler.get_last_lr()[0], "grad_norm": self.last_grad_norm,
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "skipped_steps": self.skipped_steps, **rates, **out.extra,
                    })
                    window_tokens, window_flops, window_start = 0, 0.0, now
                    summary.final_loss, summary.train_acc = loss, out.step_acc
                if saving or measuring:  # not training time: kept out of tokens/s
                    paused = time.perf_counter()
                    if saving:
                        self.save_checkpoint()
                        self.evaluate_and_log()
                    if measuring:
                        self.measure_acceptance()
                    if saving:
                        self._plot()
                    paused = time.perf_counter() - paused
                    window_start += paused
                    paused_total += paused
                if self.step >= cfg.max_steps:
                    break
            else:
                self.epoch, self.examples_in_epoch = self.epoch + 1, 0
        self._settle(pending)
        bar.close()
        if self.step == 0:  # nothing trained: no checkpoint or export of an untrained draft
            raise ValueError(f"no training step was taken: an epoch of the training data gave fewer than "
                             f"optim.grad_accum={accum} batches of {per_batch} examples (optim.batch_size="
                             f"{self.optim_cfg.batch_size} x {self.world_size} ranks); lower optim.batch_size or "
                             "optim.grad_accum, or add data")
        summary.wall_s = time.perf_counter() - start
        if self.parallel.distributed:  # every rank's tokens
            tokens = int(all_ranks_sum(torch.tensor(tokens, device=self.device), self.parallel).item())
        summary.steps, summary.tokens_per_s = self.step, tokens / max(summary.wall_s - paused_total, 1e-9)
        summary.world_size = self.world_size
        summary.flop_rates = self._flop_rates(total_flops, summary.wall_s - paused_total)
        summary.skipped_steps = self.skipped_steps
        summary.eval_after = self.evaluate_and_log()
        summary.checkpoint = str(self.save_checkpoint())
        summary.accept_after = self.measure_acceptance()
        summary.best = dict(self.best)
        self._plot()
        return summary

    def _flop_rates(self, flops: float, seconds: float) -> dict:
        """{"tflops_per_s", "mfu"} of `flops` done in `seconds` (empty without a FLOP counter; no mfu without a peak)."""
        if self.flops is None:
            return {}
        tflops = flops / max(seconds, 1e-9) / 1e12
        return {"tflops_per_s": tflops, **({"mfu": tflops / self.peak_tflops} if self.peak_tflops else {})}

    def _settle(self, pending: tuple[int, float, HostCopy] | None) -> None:
        """Read the gradient norm of an update `guarded_step` queued (waiting for it if need be) into
        `last_grad_norm`, and count it: a skipped update is logged under its own step."""
        if pending is None:
            return
        step, loss, norm = pending
        self.last_grad_norm = float(norm.tolist())
        if math.isfinite(self.last_grad_norm):
            self.nonfinite_in_a_row = 0
        else:
            self._skip_step(step, loss, self.last_grad_norm)

    def _skip_step(self, step: int, loss: float, grad_norm: float) -> None:
        """A NaN/inf loss or gradient: no update at `step`; too many in a row stop the run."""
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        self.metrics.log({"split": "skip", "step": step, "loss": loss, "grad_norm": grad_norm})
        limit = self.train_cfg.max_nonfinite_steps
        print(f"step {step}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
              f"({self.nonfinite_in_a_row} in a row, stop at {limit})")
        if self.nonfinite_in_a_row >= limit:
            latest = latest_checkpoint(self.run_dir / "checkpoints")  # skipped steps never wrote NaN weights
            raise NonFiniteLossError(
                f"stopped at step {step}: {self.nonfinite_in_a_row} steps in a row had a non-finite loss or "
                f"gradient (train.max_nonfinite_steps={limit}). Lower optim.lr or raise optim.warmup_steps, check the "
                f"data for degenerate rows, then resume from the latest checkpoint "
                f"({latest or 'none yet'}) with train.resume=latest")

    def _first_logged(self, split: str) -> dict:
        """The first record of a split from the restored metrics (a resumed run's 'before' numbers)."""
        record = next((r for r in self.metrics.records if r.get("split") == split), None)
        if record is None:
            return {}
        return dict(record["accept_len"]) if split == "accept" else {k: record[k] for k in ("loss", "acc", "sim_accept_len")}

    def _plot(self) -> None:
        if self.rank == 0 and self.metrics.records:
            plot_metrics(self.metrics.records, self.run_dir / "plots")

"""The training loop: batch -> frozen target -> draft loss -> AdamW step; logging, eval, checkpoints.

The loop knows nothing of a concrete target or draft: the target gives TargetOutputs, the registry's
algorithm entry gives the loss. Draft weights stay fp32 (master weights); on the GPU the draft runs under
bf16 autocast. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from eagle_trainer.config import DraftConfig, OptimConfig, TrainConfig
from eagle_trainer.drafts.io import save_draft
from eagle_trainer.drafts.ttt import pick_attention, simulated_acceptance
from eagle_trainer.metrics import MetricsLogger, plot_metrics
from eagle_trainer.registry import DraftSpec
from eagle_trainer.types import Batch


def cosine_schedule(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine down to `min_lr_ratio`."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class Summary:
    steps: int = 0
    final_loss: float = float("nan")
    train_acc: list[float] = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    checkpoint: str = ""
    accept_before: dict = field(default_factory=dict)  # mode -> real acceptance length
    accept_after: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)  # {"step", "accept_len", "mode", "checkpoint"} of checkpoints/best


class Trainer:
    def __init__(self, spec: DraftSpec, target, draft: torch.nn.Module, draft_cfg: DraftConfig, optim: OptimConfig,
                 train: TrainConfig, train_batches: Callable[[int], Iterable[Batch]], eval_batches: list[Batch],
                 device: torch.device, rank: int = 0, acceptance: Callable[[], dict] | None = None,
                 accept_every: int = 0):
        self.spec, self.target, self.draft = spec, target, draft
        self.draft_cfg, self.optim_cfg, self.train_cfg = draft_cfg, optim, train
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.device, self.rank = device, rank
        self.run_dir = Path(train.run_dir)
        self.attention = pick_attention(draft_cfg.attention, device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        params = [p for p in draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay, fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_schedule(optim, train.max_steps))
        self.metrics = MetricsLogger(self.run_dir, enabled=rank == 0)
        self.step = 0
        # acceptance() -> {mode: report} by real speculative decoding (evaluate/acceptance.py); measured every
        # accept_every steps (0: with each checkpoint), at the start and at the end
        self.acceptance, self.accept_every = acceptance, accept_every
        self.best: dict = {}

    def _loss(self, batch: Batch):
        outputs = self.target.forward(batch)
        if self.autocast is None:
            return self.spec.algorithm.loss(self.draft, batch, outputs, self.draft_cfg, self.attention)
        with self.autocast:
            return self.spec.algorithm.loss(self.draft, batch, outputs, self.draft_cfg, self.attention)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted TTT loss and per-step accuracy on the held-out batches."""
        if not self.eval_batches:
            return {}
        self.draft.eval()
        k = self.draft_cfg.ttt_steps
        loss_sum, weight, hits, counts = 0.0, 0, [0.0] * k, [0] * k
        for batch in self.eval_batches:
            out = self._loss(batch.to(self.device))
            loss_sum += out.loss.item() * out.step_count[0]  # batches weighted by their step-0 tokens
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

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Write checkpoints/step_N (or checkpoints/<name>) atomically (temp dir, then rename)."""
        final = self.run_dir / "checkpoints" / (name or f"step_{self.step:07d}")
        if self.rank != 0:
            return final
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_draft(tmp, self.draft)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def fit(self) -> Summary:
        """Train to max_steps (or epochs); eval at the start, at each checkpoint and at the end."""
        cfg = self.train_cfg
        summary = Summary(eval_before=self.evaluate_and_log(), accept_before=self.measure_acceptance())
        self.draft.train()
        bar = tqdm(total=cfg.max_steps, desc="train", disable=not cfg.progress or self.rank != 0, dynamic_ncols=True)
        start, tokens, window_tokens, window_start = time.perf_counter(), 0, 0, time.perf_counter()
        paused_total = 0.0  # seconds of checkpoints and evals inside the loop
        accum = self.optim_cfg.grad_accum
        done = False
        for epoch in range(cfg.epochs):
            micro = 0
            for batch in self.train_batches(epoch):
                n_tok = int(batch.attention_mask.sum())  # counted on the host copy: no device sync
                batch = batch.to(self.device)
                out = self._loss(batch)
                (out.loss / accum).backward()
                micro += 1
                tokens += n_tok
                window_tokens += n_tok
                if micro % accum:
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.optim_cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss.item():.3f}", acc0=f"{out.step_acc[0]:.2f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    self.metrics.log({
                        "split": "train", "step": self.step, "epoch": epoch, "loss": out.loss.item(),
                        "acc": out.step_acc, "step_loss": out.step_loss,
                        "sim_accept_len": simulated_acceptance(out.step_acc),
                        "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    })
                    window_tokens, window_start = 0, now
                    summary.final_loss, summary.train_acc = out.loss.item(), out.step_acc
                saving = bool(cfg.save_every) and self.step % cfg.save_every == 0 and self.step < cfg.max_steps
                measuring = self.step < cfg.max_steps and (saving if self.accept_every == 0
                                                           else self.step % self.accept_every == 0)
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
                    done = True
                    break
            if done:
                break
        bar.close()
        summary.wall_s = time.perf_counter() - start
        summary.steps, summary.tokens_per_s = self.step, tokens / max(summary.wall_s - paused_total, 1e-9)
        summary.eval_after = self.evaluate_and_log()
        summary.checkpoint = str(self.save_checkpoint())
        summary.accept_after = self.measure_acceptance()
        summary.best = dict(self.best)
        self._plot()
        return summary

    def _plot(self) -> None:
        if self.rank == 0 and self.metrics.records:
            plot_metrics(self.metrics.records, self.run_dir / "plots")

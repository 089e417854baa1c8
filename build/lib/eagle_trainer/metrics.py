"""Run metrics: `metrics.jsonl` (one JSON object per logged record), optional TensorBoard and wandb sinks, and
PNG curves.

A record is a flat dict with a `split` (train | eval | accept) and a `step`; values are numbers, lists of numbers
(per TTT step: `acc`) or dicts of numbers (per decoding mode: `accept_len`). Only rank 0 writes; other ranks
construct the logger with `enabled=False`, which creates no files and no sinks.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from eagle_trainer.config import LogConfig


class MetricsLogger:
    """metrics.jsonl and `records` always; TensorBoard (<run_dir>/tensorboard) and wandb (<run_dir>/wandb) as
    `log` asks. With `resume_step` the records up to that step are kept, in the file and in `records`, so the
    plots cover the whole run; later ones (logged after the checkpoint we resume from) are dropped.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, log: LogConfig | None = None,
                 resume_step: int | None = None, run_config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict] = []
        self._tensorboard = None  # torch.utils.tensorboard.SummaryWriter
        self._wandb = None  # wandb.Run
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self.records = truncate_metrics(self.path, resume_step)
        log = log or LogConfig()
        if log.tensorboard:
            self._tensorboard = open_tensorboard(self.run_dir / "tensorboard", resume_step)
        if log.wandb:
            self._wandb = open_wandb(self.run_dir, log, run_config)
            for record in self.records:  # a new wandb run per launch: replay the kept history into it
                self._wandb.log(flatten_record(record), step=record["step"])

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.records.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = flatten_record(record)
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, global_step=record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        """Flush and close the sinks (metrics.jsonl is closed after every record). Safe to call twice."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> list[dict]:
    """Keep the records of `path` with step <= last_step (rewritten atomically) and return them.

    A missing file is an empty history. A last line without its newline was cut by a crash mid-write: dropped.
    """
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")[:-1]  # the piece after the last newline is "" or a cut line
    records = [r for r in map(json.loads, filter(str.strip, lines)) if r["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return records


def flatten_record(record: dict) -> dict[str, float]:
    """Scalars named <split>/<key>: lists give <key>_<i>, dicts <key>_<name>; anything else (histograms) is skipped.

    {"split": "train", "step": 3, "loss": 1.2, "acc": [0.5, 0.3]} -> {"train/loss": 1.2, "train/acc_0": 0.5,
    "train/acc_1": 0.3}; {"split": "accept", "accept_len": {"chain": 2.1}} -> {"accept/accept_len_chain": 2.1}.
    """
    split = record["split"]
    scalars = {}
    for key, value in record.items():
        if key in ("split", "step", "time"):
            continue
        if isinstance(value, list):
            items = [(f"{key}_{i}", v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            items = [(f"{key}_{name}", v) for name, v in value.items()]
        else:
            items = [(key, value)]
        scalars.update((f"{split}/{name}", float(v)) for name, v in items
                       if isinstance(v, (int, float)) and not isinstance(v, bool))
    return scalars


def open_tensorboard(log_dir: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(f"log.tensorboard=true needs the tensorboard package ({e}): `pip install tensorboard`, "
                         "or set log.tensorboard=false") from e
    # on resume, events past the checkpoint (written before the restart) are hidden in TensorBoard
    purge_step = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def open_wandb(run_dir: Path, log: LogConfig, run_config: dict | None):
    try:
        import wandb
    except ImportError as e:
        raise ValueError(f"log.wandb=true needs the wandb package ({e}): `pip install wandb`, "
                         "or set log.wandb=false") from e
    return wandb.init(project=log.wandb_project, dir=str(run_dir), mode=log.wandb_mode, config=run_config)


def plot_metrics(records: list[dict], out_dir: str | Path) -> list[Path]:
    """loss.png (train and eval), accuracy.png (per TTT step), acceptance.png (simulated and real tau),
    throughput.png (train tokens/s). Records lacking a key (no eval, an older run) are left out of that curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    accepts = [r for r in records if r.get("split") == "accept"]
    written = []

    def curve(ax, rs, value, *args, **kwargs):
        """Plot value(r) against step over the records where value(r) is not None."""
        points = [(r["step"], value(r)) for r in rs]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), *args, **kwargs)

    def save(fig, ax, name, **legend):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**legend)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    curve(ax, train, lambda r: r.get("loss"), label="train")
    curve(ax, evals, lambda r: r.get("loss"), "o-", label="eval")
    ax.set(xlabel="step", ylabel="TTT loss", title="loss")
    save(fig, ax, "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    num_steps = max((len(r["acc"]) for r in train + evals if "acc" in r), default=0)
    for k in range(num_steps):
        def acc_k(r):
            return r["acc"][k] if len(r.get("acc", ())) > k else None
        curve(ax, train, acc_k, color=f"C{k}", alpha=0.6, label=f"acc_{k}")
        curve(ax, evals, acc_k, "o", color=f"C{k}")
    ax.set(xlabel="step", ylabel="top-1 accuracy vs target", ylim=(0, 1),
           title="per-TTT-step accuracy (lines: train, dots: eval)")
    save(fig, ax, "accuracy.png", ncol=2, fontsize=8)

    fig, ax = plt.subplots(figsize=(6, 4))
    curve(ax, train, lambda r: r.get("sim_accept_len"), alpha=0.6, label="simulated (train)")
    curve(ax, evals, lambda r: r.get("sim_accept_len"), "o-", label="simulated (eval)")
    modes = dict.fromkeys(mode for r in accepts for mode in r.get("accept_len", {}))  # first-seen order
    for mode in modes:
        curve(ax, accepts, lambda r: r.get("accept_len", {}).get(mode), "s-", label=f"real, {mode} (held-out prompts)")
    ax.set(xlabel="step", ylabel="tokens per target forward", title="acceptance length: simulated and real")
    save(fig, ax, "acceptance.png", fontsize=8)

    fig, ax = plt.subplots(figsize=(6, 4))
    curve(ax, train, lambda r: r.get("tokens_per_s"), label="train")
    ax.set(xlabel="step", ylabel="tokens / s", title="training throughput")
    save(fig, ax, "throughput.png")

    return written

"""Run metrics: `metrics.jsonl` (one JSON object per logged step), console lines, and PNG curves.

Only rank 0 writes; other ranks construct the logger with `enabled=False`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(records: list[dict], out_dir: str | Path) -> list[Path]:
    """loss.png (train and eval), accuracy.png (per TTT step), acceptance.png (simulated and real tau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    def train_and_eval(key, ylabel, title, name):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        if evals:
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label="eval")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend()
        save(fig, name)

    train_and_eval("loss", "TTT loss", "loss", "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["sim_accept_len"] for r in train], alpha=0.6, label="simulated (train)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["sim_accept_len"] for r in evals], "o-", label="simulated (eval)")
    accepts = [r for r in records if r.get("split") == "accept"]
    for mode in (accepts[0]["accept_len"] if accepts else {}):
        ax.plot([r["step"] for r in accepts], [r["accept_len"][mode] for r in accepts], "s-",
                label=f"real, {mode} (held-out prompts)")
    ax.set(xlabel="step", ylabel="tokens per target forward", title="acceptance length: simulated and real")
    ax.legend(fontsize=8)
    save(fig, "acceptance.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    num_steps = len((train or evals)[0]["acc"]) if (train or evals) else 0
    for k in range(num_steps):
        color = f"C{k}"
        ax.plot([r["step"] for r in train], [r["acc"][k] for r in train], color=color, alpha=0.6, label=f"acc_{k}")
        if evals:
            ax.plot([r["step"] for r in evals], [r["acc"][k] for r in evals], "o", color=color)
    ax.set(xlabel="step", ylabel="top-1 accuracy vs target", ylim=(0, 1),
           title="per-TTT-step accuracy (lines: train, dots: eval)")
    ax.legend(ncol=2, fontsize=8)
    save(fig, "accuracy.png")

    return written

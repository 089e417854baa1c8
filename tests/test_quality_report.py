"""The quality benchmark's report (benchmarks/quality_report.py) on made-up runs: each comparison's peer is
SpecForge at the same seeds, and runs that shared the GPU count for quality but never for time."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from quality_report import report  # noqa: E402
from quality_train import TTT_STEPS, run_name  # noqa: E402

STEPS = 10
PREP = {"tiny": True, "device": "cpu", "draft_vocab_size": 64, "max_length": 128,
        "sources": {"train": {"humaneval": 2, "synthesized": 3}, "eval": {"humaneval": 1, "synthesized": 1}},
        "dataset": {"num_examples": 5, "num_tokens": 500, "num_loss_tokens": 300},
        "eval_dataset": {"num_examples": 2}, "sizes": {"prompt_tokens": 16, "response_tokens": 16}}


def run(side, seed, tau, *, ms=100.0, shared=False, seconds=None):
    matched = run_name("specforge", seed, STEPS) if seconds else ""
    settings = {"side": side, "seed": seed, "steps": STEPS, "seconds": seconds, "matched": matched, "untimed": 2,
                "lr": 1e-4, "batch_size": 1, "warmup_ratio": 0.015, "data": "d"}
    log = {"settings": settings, "steps": STEPS, "timed_s": (STEPS - 2) * ms / 1e3, "wall_s": STEPS * ms / 1e3,
           "untimed_steps": 2, "median_step_s": ms / 1e3, "mean_step_s": ms / 1e3, "peak_gib": None,
           "device": "cpu", "shared_gpu": shared,
           "records": [{"step": s, "t": s * ms / 1e3, "loss": 1.0, "acc": [0.5] * TTT_STEPS} for s in (5, 10)]}
    modes = {m: {"accept_len": tau, "num_prompts": 2, "decode": {"max_new_tokens": 16}} for m in ("chain", "tree")}
    result = {"modes": modes, "simulated": {"sim_accept_len": tau, "acc": [0.5] * TTT_STEPS}}
    return f"{side}-{seed}-{seconds}", (log, result)


@pytest.fixture
def rows(tmp_path):
    runs = dict([
        run("specforge", 0, 2.0, ms=200.0), run("specforge", 1, 4.0, ms=999.0, shared=True),
        run("ours-eagle3", 0, 2.2, ms=100.0), run("ours-eagle3", 1, 4.4, ms=999.0, shared=True),
        run("ours-eagle3", 0, 3.0, seconds=1.6),  # equal time: seed 0 only
    ])
    results = tmp_path / "RESULTS.md"
    report(PREP, runs, STEPS, results, tmp_path / "q.png")
    return [line for line in results.read_text().splitlines() if line.startswith("| tiny")]


def cells(rows, *words):
    (line,) = [r for r in rows if all(w in r for w in words)]
    return [c.strip() for c in line.split("|")[2:6]]


def test_equal_time_is_compared_with_specforge_of_the_same_seed(rows):
    ours, peer, _, ratio = cells(rows, "equal GPU time", "EAGLE-2 tree")
    assert (ours, peer, ratio) == ("3.000", "2.000", "1.50")  # not SpecForge's mean over seeds 0 and 1 (3.0)
    ours, peer, _, ratio = cells(rows, "equal steps", "EAGLE-2 tree")
    assert (ours, peer, ratio) == ("3.300 (2.200, 4.400)", "3.000 (2.000, 4.000)", "1.10")


def test_runs_that_shared_the_gpu_count_for_quality_not_for_time(rows):
    ours, peer, _, ratio = cells(rows, "equal steps", "time per step")
    assert ours.startswith("100.0 ms") and peer.startswith("200.0 ms") and ratio == "2.00"  # seed 0's alone
    assert "[times: seed 0 alone on the GPU]" in ours and "999" not in ours + peer

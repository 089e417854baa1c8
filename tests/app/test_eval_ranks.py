"""eagle-eval under torchrun: the ranks share the prompts of one target sharded over them (FSDP2 + expert parallel),
and eval.json holds the numbers one process measures on the same prompts, plus how it ran."""

from __future__ import annotations

import json

import pytest

from eagle_trainer.app.evaluate import main
from ranks import run_ranks

OPTIONS = ["--num-prompts", "5", "--max-new-tokens", "12", "--ttt-steps", "3", "--no-progress"]


def eval_argv(demo_dir, out) -> list[str]:
    return ["--target", str(demo_dir / "target"), "--draft", str(demo_dir), "--data",
            str(demo_dir / "data/eval.jsonl"), "--out", str(out), *OPTIONS]


def eval_on_rank(rank: int, argv: list[str]) -> None:
    main(argv)


def measured(path) -> dict:
    result = json.loads(path.read_text())
    for report in result["modes"].values():
        report.pop("wall_s")
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """eval.json of one process on a demo run's draft, measured once per demo (the ranks' runs compare with it)."""
    results = {}

    def measure(demo: str, demo_dir) -> dict:
        if demo not in results:
            out = tmp_path_factory.mktemp(demo) / "one.json"
            main(eval_argv(demo_dir, out))
            results[demo] = measured(out)
        return json.loads(json.dumps(results[demo]))  # a copy: the test pops from it
    return measure


# world 2 on both targets, Qwen3-Next's tree verification with sharded gated delta net layers included:
# tests/parallel/test_data_parallel.py (the trainer's in-loop measurement, the same measure_acceptance in the same
# lock step); here the command at world 4
@pytest.mark.parametrize("demo, world, ep", [("demo_moe_run", 4, 2)])
def test_sharded_eval_equals_one_process(request, tmp_path, one_process, demo, world, ep):
    demo_dir, _ = request.getfixturevalue(demo)
    run_ranks(world, eval_on_rank, eval_argv(demo_dir, tmp_path / "ranks.json") + ["parallel=fsdp_ep",
                                                                                   f"parallel.ep={ep}"])
    one, ranks = one_process(demo, demo_dir), measured(tmp_path / "ranks.json")
    assert one.pop("run") == {"world_size": 1, "ep": 1, "sharded": False}
    assert ranks.pop("run") == {"world_size": world, "ep": ep, "sharded": True}
    assert ranks["modes"]["tree"]["accept_len"] > 1.2  # a trained draft: the comparison sees accepted drafts
    assert ranks["modes"] == one["modes"]
    # the simulated acceptance: the same forwards on the same batches, equal to fp32 rounding
    assert ranks["simulated"]["acc"] == pytest.approx(one["simulated"]["acc"], rel=1e-5)
    assert (tmp_path / "ranks.png").is_file()


def test_ep_that_does_not_divide_the_experts_is_refused_before_loading(demo_moe_run, tmp_path):
    demo_dir, _ = demo_moe_run
    with pytest.raises(ValueError, match=r"parallel.ep=3 does not divide the world size 1"):
        main(eval_argv(demo_dir, tmp_path / "x.json") + ["parallel=fsdp_ep", "parallel.ep=3"])
    with pytest.raises(ValueError, match=r"'ep=2' is not a parallel option"):
        main(eval_argv(demo_dir, tmp_path / "x.json") + ["ep=2"])

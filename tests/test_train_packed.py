"""data.pack end to end: training on packed batches gives the losses of training on the same batches padded.

Each batch's examples are the same either way (packing happens in collate only), the target keeps documents
apart, and each TTT step's loss is a mean over the same (document, position) pairs, so the curves agree up to
float rounding; tokens/s and FLOPs count the same real tokens per document.
"""

import torch
from hydra import compose, initialize_config_dir

import eagle_trainer.app.train as train_module
import eagle_trainer.app.train_data as train_data_module
from eagle_trainer.metrics import read_metrics
from eagle_trainer.app.train import RECIPES, run, to_config


def compose_cfg(demo_dir, run_dir, pack):
    overrides = {
        "demo.enabled": "false", "target.path": demo_dir / "target", "data.path": demo_dir / "data/train.jsonl",
        "data.eval_path": demo_dir / "data/eval.jsonl", "data.cache_dir": demo_dir / "cache",
        "train.run_dir": run_dir, "train.max_steps": 6, "train.save_every": 0, "train.log_every": 1,
        "train.eval_batches": 2, "train.progress": "false", "accept.enabled": "false", "train.export_formats": "[]",
        "optim.batch_size": 4, "data.pack": str(pack).lower(),
    }
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose("config", overrides=[f"{k}={v}" for k, v in overrides.items()]))


def test_packed_training_equals_padded(demo_run, tmp_path, monkeypatch):
    demo_dir, _ = demo_run
    flop_lengths = []

    def recording_step_flops(target, draft_cfg, lengths, *args):
        flop_lengths[-1].append(list(lengths))
        return step_flops(target, draft_cfg, lengths, *args)

    def recording_batches(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            shapes[-1].append((batch.packed, batch.input_ids.shape[0]))
            yield batch

    step_flops, batches, shapes = train_module.step_flops, train_data_module.batches, []
    monkeypatch.setattr(train_module, "step_flops", recording_step_flops)
    monkeypatch.setattr(train_data_module, "batches", recording_batches)
    summaries, losses = {}, {}
    for pack in (False, True):
        flop_lengths.append([])
        shapes.append([])
        run_dir = tmp_path / f"pack_{pack}"
        summaries[pack] = run(compose_cfg(demo_dir, run_dir, pack))
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
        losses[pack] = {r["step"]: (r["loss"], *r["step_loss"]) for r in records}
    assert set(shapes[0]) == {(False, 4)} and set(shapes[1]) == {(True, 1)}  # eval and train batches
    assert sorted(losses[True]) == sorted(losses[False]) == list(range(1, 7))
    rel = lambda a, b: abs(a / b - 1)
    diffs = [rel(a, b) for step in losses[False] for a, b in zip(losses[True][step], losses[False][step], strict=True)]
    diffs += [rel(getattr(summaries[True], when)["loss"], getattr(summaries[False], when)["loss"])
              for when in ("eval_before", "eval_after")]
    # CPU: fp32, only the order of float sums differs (seen: 2e-7). GPU: bf16 autocast and a bf16 target, whose
    # rounding depends on the matmul shapes, [4, T] against [1, N] (seen on an H100: 1.0e-3)
    assert max(diffs) < (1e-5 if not torch.cuda.is_available() else 5e-3), diffs
    # the FLOP counter saw the same documents (real tokens, one length per example) in both runs
    assert flop_lengths[0] == flop_lengths[1] and all(len(x) == 4 for x in flop_lengths[0])

"""The recipe checked at startup, so that a mistake fails in a second with the key to fix, not at the end of a run.

    check_recipe(cfg)              the recipe alone: draft algorithm registered, export formats the draft can be
                                   written as, numbers in range
    target_entry(cfg)              the target's registry entry and shapes, from its config.json only
    check_target(cfg, info, ...)   the recipe against those shapes: aux layer ids within the target's layers,
                                   draft vocab within its vocab
    check_run_dir(cfg)             train.run_dir a directory; one that holds an earlier run only with train.resume
                                   or train.overwrite (the demo overwrites its own)
    check_demo_paths(cfg, keys)    demo.enabled does not replace a target.path / data.path the user set
    check_batches(cfg, n, ranks)   the training set fills at least one optimizer step (before the weights are read)

Each problem is a ValueError naming the key, its value and the fix.
"""

from __future__ import annotations

from pathlib import Path

from eagle_trainer import registry
from eagle_trainer.config import Config
from eagle_trainer.targets.loading import target_info
from eagle_trainer.types import TargetInfo

DECODE_MODES = ("chain", "tree")


def algorithm_entry(cfg: Config) -> registry.AlgorithmSpec:
    """The registry entry of draft.algorithm, or a ValueError naming the registered ones."""
    try:
        return registry.algorithm_spec(cfg.draft.algorithm)
    except KeyError as e:
        raise ValueError(f"draft.algorithm={cfg.draft.algorithm!r} is not a registered draft algorithm ({e.args[0]}); "
                         "pick one of those (e.g. the draft=eagle1 group) or register it") from None


def target_entry(cfg: Config) -> tuple[registry.TargetSpec, TargetInfo]:
    """The target's registry entry and shapes from its config.json (no weights), or a ValueError when no entry
    serves its architecture."""
    try:
        return target_info(cfg.target)
    except KeyError as e:
        raise ValueError(f"target.path={cfg.target.path!r}: {e.args[0]}") from None


def check_export_formats(cfg: Config, algorithm: registry.AlgorithmSpec) -> None:
    formats = sorted(algorithm.exporters)
    for fmt in cfg.train.export_formats:
        if fmt not in algorithm.exporters:
            raise ValueError(f"train.export_formats has {fmt!r}, which an {algorithm.name} draft cannot be written as; "
                             f"use [{', '.join(formats)}] (or [] for no export)")


def _minimums(cfg: Config) -> list[tuple[str, float, float]]:
    """(key, value, the smallest value that makes sense) of the counts and sizes in a recipe."""
    d, o, t, a, data = cfg.draft, cfg.optim, cfg.train, cfg.accept, cfg.data
    return [
        ("draft.ttt_steps", d.ttt_steps, 1), ("draft.num_layers", d.num_layers, 1),
        ("draft.draft_vocab_size", d.draft_vocab_size, 1), ("draft.feature_noise", d.feature_noise, 0),
        ("optim.batch_size", o.batch_size, 1), ("optim.grad_accum", o.grad_accum, 1),
        ("optim.warmup_steps", o.warmup_steps, 0), ("optim.weight_decay", o.weight_decay, 0),
        ("optim.max_grad_norm", o.max_grad_norm, 0),
        ("train.max_steps", t.max_steps, 1), ("train.epochs", t.epochs, 1), ("train.log_every", t.log_every, 1),
        ("train.save_every", t.save_every, 0), ("train.eval_batches", t.eval_batches, 0),
        ("train.keep_last", t.keep_last, 0), ("train.max_nonfinite_steps", t.max_nonfinite_steps, 1),
        ("data.max_length", data.max_length, 2), ("data.eval_holdout", data.eval_holdout, 0),
        ("accept.every", a.every, 0), ("accept.num_prompts", a.num_prompts, 0),
        ("accept.max_new_tokens", a.max_new_tokens, 1), ("accept.steps", a.steps, 1), ("accept.topk", a.topk, 1),
        ("accept.depth", a.depth, 1), ("accept.total_tokens", a.total_tokens, 1),
    ]


def check_numbers(cfg: Config) -> None:
    for key, value, least in _minimums(cfg):
        if value < least:
            raise ValueError(f"{key}={value} is out of range; set it to at least {least}")
    o, d = cfg.optim, cfg.draft
    if not o.lr > 0:
        raise ValueError(f"optim.lr={o.lr} is out of range; set a positive learning rate (e.g. 1e-4)")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={o.min_lr_ratio} is out of range; set a fraction of optim.lr in [0, 1]")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas={list(o.betas)} is out of range; set two AdamW betas in [0, 1), e.g. [0.9, 0.95]")
    if not d.step_weight > 0:
        raise ValueError(f"draft.step_weight={d.step_weight} is out of range; set a positive decay (e.g. 0.8)")
    bad_modes = [m for m in cfg.accept.modes if m not in DECODE_MODES]
    if bad_modes:
        raise ValueError(f"accept.modes={list(cfg.accept.modes)} has {bad_modes}; use modes among {list(DECODE_MODES)}")


def check_recipe(cfg: Config) -> registry.AlgorithmSpec:
    """What can be checked from the recipe alone; -> the draft algorithm's registry entry."""
    algorithm = algorithm_entry(cfg)
    check_export_formats(cfg, algorithm)
    check_numbers(cfg)
    if cfg.draft.init_vocab not in ("draft", "data"):
        raise ValueError(f"draft.init_vocab={cfg.draft.init_vocab!r} is not one of draft, data")
    return algorithm


def check_target(cfg: Config, info: TargetInfo, algorithm: registry.AlgorithmSpec) -> None:
    """The recipe against the target's shapes (read from config.json; no weights)."""
    if algorithm.needs_aux_hidden and cfg.target.aux_layer_ids is not None:
        bad = [i for i in cfg.target.aux_layer_ids if not 0 <= i < info.num_layers]
        if bad:
            raise ValueError(f"target.aux_layer_ids={list(cfg.target.aux_layer_ids)} has {bad}, outside the target's "
                             f"{info.num_layers} decoder layers; use 0-based ids below {info.num_layers} (or null "
                             "for the default [1, L//2-1, L-4])")
    if cfg.draft.draft_vocab_size > info.vocab_size:
        raise ValueError(f"draft.draft_vocab_size={cfg.draft.draft_vocab_size} exceeds the target's vocab of "
                         f"{info.vocab_size}; set it to at most {info.vocab_size}")


# What a run writes into its run dir (the demo's target/, data/ and the tokenisation cache/ are inputs, reused), and
# those of them that only training writes: a run dir with one of these holds a run (one refused at startup does not).
RUN_OUTPUTS = ("checkpoints", "export", "metrics.jsonl", "config.json", "plots", "logs", "tensorboard", "wandb")
RUN_MARKERS = ("checkpoints", "export", "metrics.jsonl")


def check_run_dir(cfg: Config) -> list[Path]:
    """train.run_dir must be a directory (or not exist yet). One that holds an earlier run takes a new run
    (train.resume=none) only with train.overwrite=true, or in demo mode, which starts its own run dir over:
    -> the earlier run's files to move aside (none when there are none, or when the run resumes)."""
    t = cfg.train
    run_dir = Path(t.run_dir)
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"train.run_dir={t.run_dir!r}: {blocker} is a file, not a directory; set train.run_dir to "
                         "a directory (new or of an earlier run)")
    if t.overwrite and t.resume != "none":
        raise ValueError(f"train.overwrite=true starts over, train.resume={t.resume} continues: set one of them")
    markers = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if not markers or t.resume != "none":
        return []
    if not (t.overwrite or cfg.demo.enabled):
        raise ValueError(f"train.run_dir={t.run_dir!r} holds an earlier run ({', '.join(markers)}); "
                         "continue it with train.resume=latest, start over with train.overwrite=true (which moves it "
                         f"to {run_dir.name}.old-<time>), or set another train.run_dir")
    return [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def check_demo_paths(cfg: Config, set_keys: set[str]) -> None:
    """Demo mode trains on assets it builds in the run dir; a target or data path the user set (`set_keys`: the
    keys given on the command line) is never replaced by them, but refused."""
    if not cfg.demo.enabled:
        return
    run_dir = Path(cfg.train.run_dir)
    own = {"target.path": run_dir / "target", "data.path": run_dir / "data/train.jsonl",
           "data.eval_path": run_dir / "data/eval.jsonl"}
    values = {"target.path": cfg.target.path, "data.path": cfg.data.path, "data.eval_path": cfg.data.eval_path}
    for key, path in own.items():
        if key in set_keys and values[key] is not None and Path(values[key]).resolve() != path.resolve():
            raise ValueError(f"{key}={values[key]} is set, but demo.enabled=true trains on the demo's own tiny target "
                             "and synthetic data instead; train on yours with +experiment=<name> (eagle_trainer/recipes/experiment/) "
                             "or add demo.enabled=false")


def check_batches(cfg: Config, num_examples: int, world_size: int) -> None:
    """An epoch of the training set (`num_examples` after any eval holdout) must fill one optimizer step:
    optim.grad_accum batches of optim.batch_size examples on each of `world_size` ranks."""
    o = cfg.optim
    per_step = o.batch_size * world_size * o.grad_accum
    if num_examples >= per_step:
        return
    fits = num_examples // (world_size * o.grad_accum)
    fix = (f"set optim.batch_size to at most {fits}" if fits else
           "lower optim.grad_accum or the number of ranks (each rank needs at least one example per batch)")
    raise ValueError(f"optim.batch_size={o.batch_size} x {world_size} ranks x optim.grad_accum={o.grad_accum} needs "
                     f"{per_step} training examples per step, but the data has {num_examples}; {fix}, or add data")

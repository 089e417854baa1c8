"""Composition root and hydra entry point: `eagle-train` == `python -m eagle_trainer.train`.

    eagle-train                                                   # the demo (recipes/config.yaml)
    torchrun --nproc-per-node 1 -m eagle_trainer.train +experiment=qwen3_8b_eagle3 \
        target.path=/models/Qwen3-8B data.path=chat.jsonl

The only module that sees hydra/OmegaConf objects: it turns the composed recipe into `config.Config`
and wires target, data, draft, trainer and export together.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from eagle_trainer import registry
from eagle_trainer.checkpoint import check_checkpoint, latest_checkpoint
from eagle_trainer.config import AcceptConfig, Config
from eagle_trainer.data import batches, build_dataset, build_vocab_map, draft_ids_from_d2t, load_vocab_map, save_vocab_map
from eagle_trainer.data.regenerate import stop_token_ids
from eagle_trainer.drafts.ttt import pick_attention
from eagle_trainer.evaluate.acceptance import measure_acceptance, prompts_from_dataset
from eagle_trainer.evaluate.speculative import DecodeConfig
from eagle_trainer.export import WRITERS
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target
from eagle_trainer.trainer import Summary, Trainer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ConfigStore.instance().store(name="config_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """The composed recipe as typed dataclasses (hydra's own `hydra` node is not part of it)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name != "cpu":
        raise ValueError(f"train.device={name!r} is not one of auto, cpu, cuda")
    return torch.device("cpu")


def vocab_map(cfg: Config, dataset, stats: dict, vocab_size: int, cache_dir: Path):
    """Load data.vocab_path, or build the map from the training set's loss tokens and cache it beside the data."""
    path = Path(cfg.data.vocab_path) if cfg.data.vocab_path else (
        cache_dir / f"vocab_{cfg.draft.draft_vocab_size}_{stats['fingerprint']}.safetensors")
    if not path.is_file():
        if cfg.data.vocab_path:
            raise ValueError(f"data.vocab_path={str(path)!r} does not exist; build it with `eagle-data vocab` or unset it")
        save_vocab_map(path, *build_vocab_map(dataset, vocab_size, cfg.draft.draft_vocab_size))
    d2t, t2d = load_vocab_map(path)
    if d2t.numel() != cfg.draft.draft_vocab_size or t2d.numel() != vocab_size:
        raise ValueError(f"vocab map {path} is for Vd={d2t.numel()}, V={t2d.numel()} but the run has "
                         f"draft.draft_vocab_size={cfg.draft.draft_vocab_size}, target vocab {vocab_size}")
    return d2t, t2d


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """train.resume: none | latest (newest complete checkpoint of this run dir, else a fresh start) | a directory."""
    if resume == "none":
        return None
    if resume == "latest":
        found = latest_checkpoint(run_dir / "checkpoints")
        print(f"resume: {found}" if found else f"resume: no checkpoint in {run_dir / 'checkpoints'} yet; starting fresh")
        return found
    return check_checkpoint(resume)


def run(cfg: Config) -> Summary:
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.demo.enabled:
        from eagle_trainer.demo import prepare_demo
        cfg = prepare_demo(cfg, device)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    model, tokenizer, target_spec, info = load_target(cfg.target, device)
    spec = registry.resolve(info.architecture, cfg.draft.algorithm)
    cache_dir = Path(cfg.data.cache_dir or run_dir / "cache")
    train_ds, stats = build_dataset(cfg.data, tokenizer, cache_dir)
    print(f"data: {stats['num_examples']} conversations, {stats['num_tokens']} tokens "
          f"({stats['num_loss_tokens']} trained), skipped {stats['skipped']}, truncated {stats['truncated']}, "
          f"dropped {stats['dropped']}")
    if cfg.data.eval_path:
        eval_ds, _ = build_dataset(cfg.data, tokenizer, cache_dir, path=cfg.data.eval_path)
    elif cfg.data.eval_holdout:
        n = len(train_ds)
        if cfg.data.eval_holdout >= n:
            raise ValueError(f"data.eval_holdout={cfg.data.eval_holdout} leaves no training data out of {n} examples")
        train_ds, eval_ds = train_ds.select(range(n - cfg.data.eval_holdout)), train_ds.select(range(n - cfg.data.eval_holdout, n))
    else:
        eval_ds = None
    d2t, t2d = vocab_map(cfg, train_ds, stats, info.vocab_size, cache_dir)

    aux_ids = tuple(cfg.target.aux_layer_ids) if cfg.target.aux_layer_ids else target_spec.aux_layers(info.num_layers)
    draft = spec.algorithm.build_draft(info, cfg.draft, aux_ids)
    target = FrozenTarget(model, target_spec, aux_ids, draft_ids_from_d2t(d2t), t2d, cfg.draft.mask_teacher_argmax,
                          keep_last_hidden=spec.algorithm.needs_last_hidden)
    draft.to(device)
    draft.set_embedding(target.input_embedding())  # copy_ casts in place: no host round trip of [V, H]
    draft.set_vocab_map(d2t, t2d)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multiple = 128 if pick_attention(cfg.draft.attention, device) == "flex" else 1

    def train_batches(epoch: int, start: int):
        for batch in batches(train_ds, cfg.optim.batch_size, seed=cfg.train.seed, epoch=epoch,
                             shuffle=cfg.data.shuffle, pad_id=pad_id, start=start):
            yield batch.pad_to_multiple(multiple, pad_id)

    eval_batches = []
    if eval_ds is not None:
        for batch in batches(eval_ds, cfg.optim.batch_size, seed=0, epoch=0, shuffle=False, pad_id=pad_id):
            if len(eval_batches) == cfg.train.eval_batches:
                break
            eval_batches.append(batch.pad_to_multiple(multiple, pad_id))

    acceptance = build_acceptance(cfg.accept, model, draft, tokenizer, eval_ds)
    trainer = Trainer(spec, target, draft, cfg.draft, cfg.optim, cfg.train, train_batches, eval_batches, device,
                      acceptance=acceptance, accept_every=cfg.accept.every, log=cfg.log,
                      data_fingerprint=stats["fingerprint"], resume_from=resume_path(cfg.train.resume, run_dir),
                      run_config=asdict(cfg))
    summary = trainer.fit()
    for fmt in cfg.train.export_formats:
        if fmt not in WRITERS:
            raise ValueError(f"train.export_formats has {fmt!r}; known formats: {sorted(WRITERS)}")
        extra = {"verifier": str(Path(cfg.target.path).resolve())} if fmt == "vllm" else {}
        WRITERS[fmt](summary.checkpoint, run_dir / "export" / fmt, overwrite=True, **extra)
    print(format_summary(summary, run_dir, stats))
    return summary


def build_acceptance(cfg: AcceptConfig, model, draft, tokenizer, eval_ds):
    """The trainer's real-acceptance hook: speculative decoding of held-out prompts, one report per mode."""
    if not cfg.enabled or eval_ds is None or cfg.num_prompts < 1:
        return None
    prompts = prompts_from_dataset(eval_ds, cfg.num_prompts)
    if not prompts:
        raise ValueError("accept.enabled needs held-out prompts, but no eval example has a trained assistant "
                         "turn; set data.eval_path / data.eval_holdout, or accept.enabled=false")
    decodes = [DecodeConfig(mode=m, steps=cfg.steps, topk=cfg.topk, depth=cfg.depth, total_tokens=cfg.total_tokens,
                            max_new_tokens=cfg.max_new_tokens) for m in cfg.modes]
    stop_ids = tuple(stop_token_ids(tokenizer))
    return lambda: {d.mode: measure_acceptance(model, draft, prompts, d, stop_ids) for d in decodes}


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
        ("tokens/s (target+draft)", f"{s.tokens_per_s:.0f}"),
        *([("data: bad lines skipped / truncated / dropped",
            f"{sum(data_stats['skipped'].values())} {dict(data_stats['skipped']) or ''} / {data_stats['truncated']} / "
            f"{sum(data_stats['dropped'].values())} {dict(data_stats['dropped'])}")] if data_stats else []),
        ("steps skipped (non-finite loss or grad)", f"{s.skipped_steps}"),
        ("wall time", f"{s.wall_s:.1f} s"),
        ("run dir", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "-" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in rows] + ["-" * (width + 40)])


@hydra.main(config_path=str(RECIPES), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run(to_config(cfg))


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()

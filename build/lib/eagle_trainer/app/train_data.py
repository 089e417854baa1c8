"""What the training loop reads: online (tokenised chat data + the live target) or offline (a dump + its teacher).

    online_data(...)   build (or read back) the tokenised data set and the draft vocab map (no model needed: the
                       caller builds the FrozenTarget once the target is loaded)
    offline_data(...)  an `eagle-data dump` directory, checked against this run's target, aux layers and vocab
                       map; OfflineTarget rebuilds the teacher from it (no target model is loaded)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from eagle_trainer.config import Config
from eagle_trainer.data import batches, build_dataset, build_vocab_map, draft_ids_from_d2t, load_vocab_map, save_vocab_map
from eagle_trainer.data.offline import VOCAB_FILE, OfflineStore, expected_manifest
from eagle_trainer.targets.loading import resolve_dtype, target_fingerprint
from eagle_trainer.targets.offline import OfflineTarget


@dataclass
class TrainingData:
    """What the loop reads, online (tokenised data + the live target) or offline (a dump + its teacher)."""

    train: Any  # datasets.Dataset (online) or OfflineStore (offline)
    eval: Any  # the same kind, or None
    batches: Callable  # data.batches (online) or OfflineStore.batches: (source, batch_size, **kw) -> Batches
    stats: dict  # num_examples, num_tokens, num_loss_tokens, skipped, truncated, dropped, fingerprint
    d2t: torch.Tensor
    t2d: torch.Tensor
    target: Any  # OfflineTarget (forward(batch) -> TargetOutputs), or None online (the live target's FrozenTarget)


def check_vocab_map(path: Path, d2t: torch.Tensor, t2d: torch.Tensor, cfg: Config, vocab_size: int) -> None:
    if d2t.numel() != cfg.draft.draft_vocab_size or t2d.numel() != vocab_size:
        raise ValueError(f"vocab map {path} is for Vd={d2t.numel()}, V={t2d.numel()} but the run has "
                         f"draft.draft_vocab_size={cfg.draft.draft_vocab_size}, target vocab {vocab_size}")


def vocab_map(cfg: Config, dataset, stats: dict, vocab_size: int, cache_dir: Path):
    """Load data.vocab_path, or build the map from the training set's loss tokens and cache it beside the data."""
    path = Path(cfg.data.vocab_path) if cfg.data.vocab_path else (
        cache_dir / f"vocab_{cfg.draft.draft_vocab_size}_{stats['fingerprint']}.safetensors")
    if not path.is_file():
        if cfg.data.vocab_path:
            raise ValueError(f"data.vocab_path={str(path)!r} does not exist; build it with `eagle-data vocab` or unset it")
        save_vocab_map(path, *build_vocab_map(dataset, vocab_size, cfg.draft.draft_vocab_size))
    d2t, t2d = load_vocab_map(path)
    check_vocab_map(path, d2t, t2d, cfg, vocab_size)
    return d2t, t2d


def holdout(cfg: Config, train, select):
    """(train, eval) with the last data.eval_holdout examples held out, or (train, None)."""
    n, k = len(train), cfg.data.eval_holdout
    if not k:
        return train, None
    if k >= n:
        raise ValueError(f"data.eval_holdout={k} leaves no training data out of {n} examples")
    return select(train, range(n - k)), select(train, range(n - k, n))


def online_data(cfg: Config, spec, info, aux_ids, tokenizer, device) -> TrainingData:
    cache_dir = Path(cfg.data.cache_dir or Path(cfg.train.run_dir) / "cache")
    train_ds, stats = build_dataset(cfg.data, tokenizer, cache_dir)
    if cfg.data.eval_path:
        eval_ds = build_dataset(cfg.data, tokenizer, cache_dir, path=cfg.data.eval_path)[0]
    else:
        train_ds, eval_ds = holdout(cfg, train_ds, lambda ds, rows: ds.select(rows))
    d2t, t2d = vocab_map(cfg, train_ds, stats, info.vocab_size, cache_dir)
    return TrainingData(train_ds, eval_ds, batches, stats, d2t, t2d, None)


def offline_data(cfg: Config, spec, info, aux_ids, tokenizer, device) -> TrainingData:
    """A dump from `eagle-data dump`, checked against this run's target, aux layers and vocab map."""
    store = OfflineStore(cfg.data.offline_path)
    if cfg.data.eval_path:
        raise ValueError(f"data.eval_path={cfg.data.eval_path!r} has no dumped target states; in offline mode hold "
                         "examples of the dump out with data.eval_holdout=N (or dump the eval set and train on it)")
    vocab_path = Path(cfg.data.vocab_path or Path(cfg.data.offline_path) / VOCAB_FILE)
    if not vocab_path.is_file():
        raise ValueError(f"no draft vocab map at {vocab_path}; pass the one the dump was made with as data.vocab_path")
    d2t, t2d = load_vocab_map(vocab_path)
    check_vocab_map(vocab_path, d2t, t2d, cfg, info.vocab_size)
    expected = expected_manifest(target_fingerprint(cfg.target.path), info.architecture, aux_ids, d2t, t2d)
    if not aux_ids:  # EAGLE-1/2 do not read the aux layers, whichever the dump holds
        expected.pop("aux_layer_ids")
    store.check(expected)
    dtype = store.dtype if cfg.target.dtype == "auto" else resolve_dtype(cfg.target.dtype, device)
    target = OfflineTarget.from_checkpoint(cfg.target.path, draft_ids_from_d2t(d2t), cfg.draft.mask_teacher_argmax,
                                           device, dtype, trust_remote_code=cfg.target.trust_remote_code,
                                           keep_lm_head=spec.algorithm.needs_target_head)
    manifest = store.manifest
    stats = {"num_loss_tokens": "?", "skipped": {}, "truncated": 0, "dropped": {},  # a dump made without the CLI
             **manifest.get("data_stats", {}), "num_examples": manifest["num_examples"],
             "num_tokens": manifest["num_tokens"], "fingerprint": manifest["data_fingerprint"]}
    train, evals = holdout(cfg, store, lambda st, rows: st.select(rows))
    pin = device.type == "cuda"
    return TrainingData(train, evals, lambda st, bs, **kw: st.batches(bs, pin_memory=pin, **kw), stats, d2t, t2d,
                        target)

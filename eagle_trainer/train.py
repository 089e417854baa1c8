"""Composition root and hydra entry point: `eagle-train` == `python -m eagle_trainer.train`.

    eagle-train                                                   # the demo (recipes/config.yaml)
    torchrun --nproc-per-node 1 -m eagle_trainer.train +experiment=qwen3_8b_eagle3 \
        target.path=/models/Qwen3-8B data.path=chat.jsonl
    torchrun --nproc-per-node 8 -m eagle_trainer.train +experiment=qwen3_30b_a3b_eagle3 parallel=fsdp_ep \
        target.path=/models/Qwen3-30B-A3B data.path=chat.jsonl

Under torchrun every rank composes the same recipe. Rank 0 tokenises the data and builds the vocab map first
(the others then read its cache), writes every file of the run, and prints to the console; each rank also logs to
<run_dir>/logs/rank_N.log. A multi-rank target is built on the meta device, sharded (parallel/) and filled from
the safetensors files shard by shard (targets/sharded.py).

The only module that sees hydra/OmegaConf objects: it turns the composed recipe into `config.Config`
and wires target, data, draft, trainer and export together.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from eagle_trainer import registry
from eagle_trainer.checkpoint import check_checkpoint, latest_checkpoint
from eagle_trainer.config import AcceptConfig, Config, TargetConfig
from eagle_trainer.data import batches, build_dataset, build_vocab_map, draft_ids_from_d2t, load_vocab_map, save_vocab_map
from eagle_trainer.data.offline import VOCAB_FILE, OfflineStore, expected_manifest
from eagle_trainer.data.regenerate import stop_token_ids
from eagle_trainer.drafts.ttt import pick_attention
from eagle_trainer.evaluate.acceptance import measure_acceptance, prompts_from_dataset
from eagle_trainer.evaluate.speculative import DecodeConfig
from eagle_trainer.export import WRITERS
from eagle_trainer.flops import TargetFlops, peak_tflops, step_flops
from eagle_trainer.parallel import ParallelDims, check_experts, init_parallel, parallelize_target, whole
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_target, load_tokenizer, read_config, resolve_dtype, target_info
from eagle_trainer.targets.sharded import build_on_meta, fill_from_safetensors, materialize, peak_rss_gib
from eagle_trainer.targets.offline import OfflineTarget
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


@dataclass
class TrainingData:
    """What the loop reads, online (tokenised data + the live target) or offline (a dump + its teacher)."""

    train: Any  # datasets.Dataset (online) or OfflineStore (offline)
    eval: Any  # the same kind, or None
    batches: Callable  # data.batches (online) or OfflineStore.batches: (source, batch_size, **kw) -> Batches
    stats: dict  # num_examples, num_tokens, num_loss_tokens, skipped, truncated, dropped, fingerprint
    d2t: torch.Tensor
    t2d: torch.Tensor
    target: Any  # FrozenTarget or OfflineTarget: forward(batch) -> TargetOutputs


def holdout(cfg: Config, train, select):
    """(train, eval) with the last data.eval_holdout examples held out, or (train, None)."""
    n, k = len(train), cfg.data.eval_holdout
    if not k:
        return train, None
    if k >= n:
        raise ValueError(f"data.eval_holdout={k} leaves no training data out of {n} examples")
    return select(train, range(n - k)), select(train, range(n - k, n))


def online_data(cfg: Config, spec, info, aux_ids, tokenizer, model, target_spec, device) -> TrainingData:
    cache_dir = Path(cfg.data.cache_dir or Path(cfg.train.run_dir) / "cache")
    train_ds, stats = build_dataset(cfg.data, tokenizer, cache_dir)
    if cfg.data.eval_path:
        eval_ds = build_dataset(cfg.data, tokenizer, cache_dir, path=cfg.data.eval_path)[0]
    else:
        train_ds, eval_ds = holdout(cfg, train_ds, lambda ds, rows: ds.select(rows))
    d2t, t2d = vocab_map(cfg, train_ds, stats, info.vocab_size, cache_dir)
    target = FrozenTarget(model, target_spec, aux_ids, draft_ids_from_d2t(d2t), t2d, cfg.draft.mask_teacher_argmax,
                          keep_last_hidden=spec.algorithm.needs_last_hidden)
    return TrainingData(train_ds, eval_ds, batches, stats, d2t, t2d, target)


def offline_data(cfg: Config, spec, info, aux_ids, tokenizer, model, target_spec, device) -> TrainingData:
    """A dump from `eagle-data dump`, checked against this run's target, aux layers and vocab map."""
    store = OfflineStore(cfg.data.offline_path)
    if cfg.data.eval_path:
        raise ValueError(f"data.eval_path={cfg.data.eval_path!r} has no dumped target states; in offline mode hold "
                         "examples of the dump out with data.eval_holdout=N (or dump the eval set and train on it)")
    vocab_path = Path(cfg.data.vocab_path or Path(cfg.data.offline_path) / VOCAB_FILE)
    if not vocab_path.is_file():
        raise ValueError(f"no draft vocab map at {vocab_path}; pass the one the dump was made with as data.vocab_path")
    d2t, t2d = load_vocab_map(vocab_path)
    if d2t.numel() != cfg.draft.draft_vocab_size or t2d.numel() != info.vocab_size:
        raise ValueError(f"vocab map {vocab_path} is for Vd={d2t.numel()}, V={t2d.numel()} but the run has "
                         f"draft.draft_vocab_size={cfg.draft.draft_vocab_size}, target vocab {info.vocab_size}")
    expected = expected_manifest(cfg.target.path, info.architecture, aux_ids, d2t, t2d,
                                 spec.algorithm.needs_last_hidden)
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


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """train.resume: none | latest (newest complete checkpoint of this run dir, else a fresh start) | a directory."""
    if resume == "none":
        return None
    if resume == "latest":
        found = latest_checkpoint(run_dir / "checkpoints")
        print(f"resume: {found}" if found else f"resume: no checkpoint in {run_dir / 'checkpoints'} yet; starting fresh")
        return found
    return check_checkpoint(resume)


def load_sharded_target(cfg: TargetConfig, device: torch.device, dims: ParallelDims, progress: bool = False):
    """load_target for a target sharded over ranks: built on the meta device, sharded as `dims` says, then each
    rank's shards read from the safetensors files. -> (model, tokenizer, spec, info, report)."""
    start = time.perf_counter()
    path, arch, hf_config = read_config(cfg)
    spec = registry.target_spec(arch)
    info = spec.read_info(arch, hf_config)
    check_experts(dims.ep, info.num_experts)
    tokenizer = load_tokenizer(cfg, info)
    model = build_on_meta(hf_config, resolve_dtype(cfg.dtype, device), cfg.attn_implementation, cfg.trust_remote_code)
    parallelize_target(model, spec, dims)
    materialize(model, device)
    fill_from_safetensors(model, path, progress=progress)
    if spec.bind_kernels is not None:
        spec.bind_kernels(model, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())
    report = {"load_s": time.perf_counter() - start, "held_gib": held / 2**30, "peak_rss_gib": peak_rss_gib()}
    print(f"target: rank {dims.rank} of {dims.world_size} holds {report['held_gib']:.2f} GiB of weights "
          f"(ep={dims.ep}); loaded in {report['load_s']:.1f} s, peak host RSS {report['peak_rss_gib']:.2f} GiB")
    return model, tokenizer, spec, info, report


@contextlib.contextmanager
def rank_logs(run_dir: Path, dims: ParallelDims):
    """Each rank's output into <run_dir>/logs/rank_N.log; rank 0's also to the console. One process: no files."""
    if not dims.distributed:
        yield
        return
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "logs" / f"rank_{dims.rank}.log", "a", buffering=1) as log:
        streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = (_Tee(log, *(streams[:1] if dims.rank == 0 else ())),
                                  _Tee(log, *(streams[1:] if dims.rank == 0 else ())))
        try:
            yield
        finally:
            sys.stdout, sys.stderr = streams


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def rank_zero_first(dims: ParallelDims, fn: Callable):
    """fn() on rank 0, then on the other ranks (which then find what rank 0 cached: tokenised data, vocab map)."""
    if dims.rank == 0:
        out = fn()
    if dims.distributed:
        torch.distributed.barrier()
    if dims.rank != 0:
        out = fn()
    return out


def run(cfg: Config) -> Summary:
    device = pick_device(cfg.train.device)
    dims = init_parallel(cfg.parallel, device)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with rank_logs(run_dir, dims):
            return _run(cfg, device, dims, run_dir)
    finally:
        if dims.distributed:
            torch.distributed.destroy_process_group()


def _run(cfg: Config, device: torch.device, dims: ParallelDims, run_dir: Path) -> Summary:
    torch.manual_seed(cfg.train.seed)
    if cfg.demo.enabled:
        from eagle_trainer.demo import prepare_demo
        cfg = rank_zero_first(dims, lambda: prepare_demo(cfg, device))
    if dims.rank == 0:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    offline = cfg.data.offline_path is not None
    if offline:  # no model: the dump holds the target's states; embedding and lm_head rows come from its files
        target_spec, info = target_info(cfg.target)
        model, tokenizer = None, load_tokenizer(cfg.target, info)
    elif dims.distributed and dims.target == "fsdp":
        model, tokenizer, target_spec, info, _ = load_sharded_target(cfg.target, device, dims, cfg.train.progress)
    else:
        model, tokenizer, target_spec, info = load_target(cfg.target, device)
    spec = registry.resolve(info.architecture, cfg.draft.algorithm)
    aux_ids = ()  # EAGLE-1/2 read the final hidden state only
    if spec.algorithm.needs_aux_hidden:
        aux_ids = tuple(cfg.target.aux_layer_ids or target_spec.aux_layers(info.num_layers))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multiple = 128 if pick_attention(cfg.draft.attention, device) == "flex" else 1
    data = rank_zero_first(dims, lambda: (offline_data if offline else online_data)(
        cfg, spec, info, aux_ids, tokenizer, model, target_spec, device))
    stats, d2t, t2d, target = data.stats, data.d2t, data.t2d, data.target
    print(f"data: {stats['num_examples']} conversations, {stats['num_tokens']} tokens "
          f"({stats['num_loss_tokens']} trained), skipped {stats['skipped']}, truncated {stats['truncated']}, "
          f"dropped {stats['dropped']}" + (f"; offline from {cfg.data.offline_path}" if offline else ""))
    global_batch = cfg.optim.batch_size * dims.world_size
    left = len(data.train) % global_batch
    if left:
        print(f"data: each epoch leaves {left} of {len(data.train)} examples out (they do not fill a batch of "
              f"{cfg.optim.batch_size} x {dims.world_size} ranks)"
              f"{'; a different ' + str(left) + ' each epoch (shuffled)' if cfg.data.shuffle else ''}")

    draft = spec.algorithm.build_draft(info, cfg.draft, aux_ids)
    draft.to(device)
    # the draft holds the target's embedding tensor itself where it can (one [V, H] on the GPU, not two), else a
    # copy made in place (copy_ casts: no host round trip); EAGLE-1 also reads the target's lm_head
    lm_head = whole(target.output_head()) if spec.algorithm.needs_target_head else None
    draft.set_target_weights(whole(target.input_embedding()), lm_head, share=True)
    draft.set_vocab_map(d2t, t2d)

    def train_batches(epoch: int, start: int):
        for batch in data.batches(data.train, cfg.optim.batch_size, seed=cfg.train.seed, epoch=epoch,
                                  shuffle=cfg.data.shuffle, pad_id=pad_id, start=start, pack=cfg.data.pack,
                                  rank=dims.rank, world_size=dims.world_size):
            yield batch.pad_to_multiple(multiple, pad_id)

    eval_batches = []
    if data.eval is not None:
        # each rank its own part of every eval batch (the same number of them on every rank: their forwards are
        # collective under FSDP)
        for batch in data.batches(data.eval, cfg.optim.batch_size, seed=0, epoch=0, shuffle=False, pad_id=pad_id,
                                  pack=cfg.data.pack, rank=dims.rank, world_size=dims.world_size):
            if len(eval_batches) == cfg.train.eval_batches:
                break
            eval_batches.append(batch.pad_to_multiple(multiple, pad_id))

    if offline and cfg.accept.enabled:
        print("accept: real acceptance needs the target model, which offline training does not load; measure the "
              "exported draft with `eagle-eval` (accept.enabled=false silences this)")
    if dims.distributed and cfg.accept.enabled:
        # the ranks' decoding loops would run different numbers of (collective) target forwards
        print("accept: real acceptance is not measured in the loop of a multi-rank run; measure the exported draft "
              "with `eagle-eval` (accept.enabled=false silences this)")
    acceptance = None if offline or dims.distributed else build_acceptance(
        cfg.accept, model, draft, tokenizer, data.eval, progress=cfg.train.progress,
        verify="tree" if target_spec.tree_verify else "walk")
    target_flops = None if offline else TargetFlops.from_hf_config(model.config)  # offline: no target forward
    trainer = Trainer(spec, target, draft, cfg.draft, cfg.optim, cfg.train, train_batches, eval_batches, device,
                      parallel=dims, acceptance=acceptance, accept_every=cfg.accept.every, log=cfg.log,
                      data_fingerprint=stats["fingerprint"], resume_from=resume_path(cfg.train.resume, run_dir),
                      run_config=asdict(cfg),
                      flops=lambda lengths: step_flops(target_flops, draft.config, lengths, cfg.draft.ttt_steps,
                                                       cfg.draft.mask_teacher_argmax),
                      peak_tflops=peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    summary = trainer.fit()
    if dims.rank != 0:
        return summary
    for fmt in cfg.train.export_formats:
        if fmt not in WRITERS:
            raise ValueError(f"train.export_formats has {fmt!r}; known formats: {sorted(WRITERS)}")
        extra = {"verifier": str(Path(cfg.target.path).resolve())} if fmt == "vllm" else {}
        WRITERS[fmt](summary.checkpoint, run_dir / "export" / fmt, overwrite=True, **extra)
    print(format_summary(summary, run_dir, stats))
    return summary


def build_acceptance(cfg: AcceptConfig, model, draft, tokenizer, eval_ds, progress: bool = False,
                     verify: str = "tree"):
    """The trainer's real-acceptance hook: speculative decoding of held-out prompts, one report per mode."""
    if not cfg.enabled or eval_ds is None or cfg.num_prompts < 1:
        return None
    prompts = prompts_from_dataset(eval_ds, cfg.num_prompts)
    if not prompts:
        raise ValueError("accept.enabled needs held-out prompts, but no eval example has a trained assistant "
                         "turn; set data.eval_path / data.eval_holdout, or accept.enabled=false")
    decodes = [DecodeConfig(mode=m, steps=cfg.steps, topk=cfg.topk, depth=cfg.depth, total_tokens=cfg.total_tokens,
                            max_new_tokens=cfg.max_new_tokens, verify=verify) for m in cfg.modes]
    stop_ids = tuple(stop_token_ids(tokenizer))
    return lambda: {d.mode: measure_acceptance(model, draft, prompts, d, stop_ids, progress=progress) for d in decodes}


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


@hydra.main(config_path=str(RECIPES), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run(to_config(cfg))


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()

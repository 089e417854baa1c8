"""The `eagle-train` console script (hydra): the composition root of a training run.

    eagle-train                                                   # the demo (eagle_trainer/recipes/config.yaml)
    torchrun --nproc-per-node 1 -m eagle_trainer.train +experiment=qwen3_8b_eagle3 \
        target.path=/models/Qwen3-8B data.path=chat.jsonl
    torchrun --nproc-per-node 8 -m eagle_trainer.train +experiment=qwen3_30b_a3b_eagle3 parallel=fsdp_ep \
        target.path=/models/Qwen3-30B-A3B data.path=chat.jsonl

The recipe's `plugins` (and the eagle_trainer.plugins entry points) are loaded first (plugins.py):
    eagle-train 'plugins=[examples/llama_target.py]' demo.enabled=false target.path=/models/llama data.path=chat.jsonl
target.path, data.path, data.eval_path and draft.init_from also take a Hugging Face Hub id (`Qwen/Qwen3-8B`,
`org/chats@v2/train.jsonl`), resolved by every rank into the Hugging Face cache before anything else (hub.py).
Then the recipe is checked (validation.py: registered draft algorithm and target architecture, export formats the
draft can be written as, aux layers within the target, numbers in range, the run dir), and the data is tokenised and
counted against the batch size, before any target weights are read. A new run into a run dir that holds an earlier
one is refused unless train.overwrite=true moves that aside (the demo does so for its own run dir).
Under torchrun every rank composes the same recipe. Rank 0 tokenises the data and builds the vocab map first
(the others then read its cache), writes every file of the run, and prints to the console; each rank also logs to
<run_dir>/logs/rank_N.log (runtime.py). A multi-rank target is built on the meta device, sharded (parallel/) and
filled from the safetensors files shard by shard (targets/sharded.py).

The only module that sees hydra/OmegaConf objects: it turns the composed recipe into `config.Config`
and wires target, data, draft, trainer and export together.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from eagle_trainer import registry
from eagle_trainer.app import hub, plugins, runtime
from eagle_trainer.app.summary import format_summary
from eagle_trainer.app.train_data import offline_data, online_data
from eagle_trainer.app.validation import (check_batches, check_demo_paths, check_recipe, check_run_dir, check_target,
                                         target_entry)
from eagle_trainer.app.warm_start import load_warm_weights, read_warm_start, warm_vocab_map
from eagle_trainer.checkpoint import check_checkpoint, latest_checkpoint
from eagle_trainer.config import AcceptConfig, Config
from eagle_trainer.data import draft_ids_from_d2t
from eagle_trainer.data.regenerate import stop_token_ids
from eagle_trainer.drafts.attention import pick_attention
from eagle_trainer.evaluate.acceptance import measure_acceptance, prompts_from_dataset
from eagle_trainer.evaluate.speculative import DecodeConfig
from eagle_trainer.export.sglang import TARGET_FINGERPRINT
from eagle_trainer.flops import TargetFlops, peak_tflops, step_flops
from eagle_trainer.parallel import ParallelDims, init_parallel, whole
from eagle_trainer.targets.frozen import FrozenTarget
from eagle_trainer.targets.loading import load_tokenizer, target_fingerprint
from eagle_trainer.targets.sharded import open_target
from eagle_trainer.trainer import Summary, Trainer

RECIPES = runtime.RECIPES
ConfigStore.instance().store(name="config_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """The composed recipe as typed dataclasses (hydra's own `hydra` node is not part of it)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """train.resume: none | latest (newest complete checkpoint of this run dir, else a fresh start) | a directory."""
    if resume == "none":
        return None
    if resume == "latest":
        found = latest_checkpoint(run_dir / "checkpoints")
        print(f"resume: {found}" if found else f"resume: no checkpoint in {run_dir / 'checkpoints'} yet; starting fresh")
        return found
    return check_checkpoint(resume)


def move_aside(run_dir: Path, earlier: list[Path]) -> Path:
    """train.overwrite: the earlier run's files into <run_dir>.old-<time> (a run dir of their own; nothing deleted)."""
    base = run_dir.resolve()
    aside = base.with_name(f"{base.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two runs started within a second
        aside, n = base.with_name(f"{base.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    aside.mkdir(parents=True)
    for path in earlier:
        os.replace(path, aside / path.name)
    print(f"run dir: moved the earlier run ({', '.join(p.name for p in earlier)}) to {aside}")
    return aside


def run(cfg: Config) -> Summary:
    plugins.load_plugins(cfg.plugins, source="recipe plugins")  # every rank: before anything looks up the registry
    algorithm = check_recipe(cfg)  # before anything is built, loaded or joined
    earlier = check_run_dir(cfg)  # every rank, before any of them moves anything (joining the group waits for all)
    # every rank (from the shared cache), before the group is joined: an unknown id stops each rank alike. The demo
    # trains on its own assets, built later in the run dir
    cfg, hub_ids = (cfg, {}) if cfg.demo.enabled else hub.resolve_recipe(cfg)
    device = runtime.pick_device(cfg.train.device)
    with runtime.process_group(device, cfg.parallel.backend):
        dims = init_parallel(cfg.parallel, device)
        run_dir = Path(cfg.train.run_dir)
        if earlier:  # by rank 0, while the others wait: their log files go into the run dir
            runtime.rank_zero_first(lambda: move_aside(run_dir, earlier) if dims.rank == 0 else None, dims.rank,
                                    dims.world_size)
        run_dir.mkdir(parents=True, exist_ok=True)
        runtime.check_shared_dir(run_dir, dims.rank, dims.world_size, "train.run_dir")
        with runtime.rank_logs(run_dir, dims.rank, dims.world_size):
            return _run(cfg, algorithm, device, dims, run_dir, hub_ids)


def _run(cfg: Config, algorithm: registry.AlgorithmSpec, device: torch.device, dims: ParallelDims,
         run_dir: Path, hub_ids: dict[str, hub.HubId]) -> Summary:
    """`cfg` names local paths only; `hub_ids`: the Hub id each key named where it named one."""
    torch.manual_seed(cfg.train.seed)
    local = hub.recipe_paths(cfg)
    for key, hub_id in hub_ids.items():  # the snapshot names the commit the run used
        print(f"{key}: {hub_id} on the Hugging Face Hub, at {local[key]}")
    if cfg.demo.enabled:
        from eagle_trainer.app.demo import prepare_demo
        cfg = runtime.rank_zero_first(lambda: prepare_demo(cfg, device), dims.rank, dims.world_size)
    target_spec, info = target_entry(cfg)  # config.json only: the recipe is checked against it before loading
    check_target(cfg, info, algorithm)
    if dims.rank == 0:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    offline = cfg.data.offline_path is not None
    spec = registry.resolve(info.architecture, cfg.draft.algorithm)
    aux_ids = ()  # EAGLE-1/2 read the final hidden state only
    if spec.algorithm.needs_aux_hidden:
        aux_ids = tuple(cfg.target.aux_layer_ids or target_spec.aux_layers(info.num_layers))
    tokenizer = load_tokenizer(cfg.target, info)
    pad_id = runtime.pad_id(tokenizer)
    multiple = 128 if pick_attention(cfg.draft.attention, device) == "flex" else 1
    # the data first (tokenised, or the dump's manifest), so that a data set too small for a step is refused before
    # the target's weights are read
    data = runtime.rank_zero_first(lambda: (offline_data if offline else online_data)(
        cfg, spec, info, aux_ids, tokenizer, device), dims.rank, dims.world_size)
    stats, d2t, t2d = data.stats, data.d2t, data.t2d
    warm = None
    if cfg.draft.init_from:  # read and checked before the target's weights
        warm = read_warm_start(cfg, spec.algorithm, info, aux_ids)
        d2t, t2d = warm_vocab_map(cfg, warm, d2t, t2d)
        if offline and not torch.equal(d2t, data.d2t):
            raise ValueError(f"draft.init_from={cfg.draft.init_from!r} has another vocab map than the dump "
                             f"{cfg.data.offline_path} was made with; set draft.init_vocab=data")
    print(f"data: {stats['num_examples']} conversations, {stats['num_tokens']} tokens "
          f"({stats['num_loss_tokens']} trained), skipped {stats['skipped']}, truncated {stats['truncated']}, "
          f"dropped {stats['dropped']}" + (f"; offline from {cfg.data.offline_path}" if offline else ""))
    check_batches(cfg, len(data.train), dims.world_size)
    global_batch = cfg.optim.batch_size * dims.world_size
    left = len(data.train) % global_batch
    if left:
        print(f"data: each epoch leaves {left} of {len(data.train)} examples out (they do not fill a batch of "
              f"{cfg.optim.batch_size} x {dims.world_size} ranks)"
              f"{'; a different ' + str(left) + ' each epoch (shuffled)' if cfg.data.shuffle else ''}")
    if offline:  # no model: the dump holds the target's states; embedding and lm_head rows come from its files
        model, target = None, data.target
    else:
        opened = open_target(cfg.target, device, dims, cfg.train.progress)
        model, target_spec, info = opened.model, opened.spec, opened.info
        target = FrozenTarget(model, target_spec, aux_ids, draft_ids_from_d2t(d2t), t2d, cfg.draft.mask_teacher_argmax)

    draft = spec.algorithm.build_draft(info, cfg.draft, aux_ids)
    # checkpoints and exports record the target they were trained for; eagle-eval refuses another one
    draft.config.extra[TARGET_FINGERPRINT] = target_fingerprint(cfg.target.path)
    if warm is not None:
        load_warm_weights(draft, warm)
        print(f"warm start: the draft begins from {cfg.draft.init_from}")
    draft.to(device)
    # the draft holds the target's embedding tensor itself where it can (one [V, H] on the GPU, not two), else a
    # copy made in place (copy_ casts: no host round trip); EAGLE-1 also reads the target's lm_head
    lm_head = whole(target.target_head()) if spec.algorithm.needs_target_head else None
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
    # several ranks share the prompts, their target forwards kept in step (evaluate/acceptance.py)
    acceptance = None if offline else build_acceptance(
        cfg.accept, model, target_spec, draft, tokenizer, data.eval, progress=cfg.train.progress and dims.rank == 0)
    target_flops = None if offline else TargetFlops.from_target(info, model.config)  # offline: no target forward
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
    for fmt in cfg.train.export_formats:  # checked at startup: each is one of the algorithm's exporters
        exporter = spec.algorithm.exporters[fmt]
        # vllm serve finds the target where the recipe named it: on the Hub, or in this local directory
        verifier = hub_ids["target.path"].repo if "target.path" in hub_ids else str(Path(cfg.target.path).resolve())
        extra = {"verifier": verifier} if "verifier" in exporter.options else {}
        exporter.write(summary.checkpoint, run_dir / "export" / fmt, overwrite=True, **extra)
    print(format_summary(summary, run_dir, stats))
    return summary


def build_acceptance(cfg: AcceptConfig, model, spec: registry.TargetSpec, draft, tokenizer, eval_ds,
                     progress: bool = False):
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
    return lambda: {d.mode: measure_acceptance(model, spec, draft, prompts, d, stop_ids, progress=progress)
                    for d in decodes}


def command_line_keys() -> set[str]:
    """The recipe keys set on the command line (`data.path=...`, `+train.x=...`), not by the recipe files."""
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


@hydra.main(config_path=str(RECIPES), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    # here, inside hydra's task: hydra would print a user error raised in it with a traceback
    with runtime.reported_errors():
        config = to_config(cfg)
        check_demo_paths(config, command_line_keys())
        run(config)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()

"""The `train` stage of benchmarks/quality.py: one draft trained on the prepared data by one side, timed.

    ours-eagle3, ours-eagle1   eagle_trainer's Trainer (the loop eagle-train runs), wired through the Python API as
                               app/train.py wires it: the target loaded by targets.load_target, FrozenTarget (aux
                               layers + final norm hooked, teacher over the draft vocab), the draft from the registry
                               entry and the recipe's draft group (recipes/draft/eagle3.yaml, eagle1.yaml), fp32 masters
                               under bf16 autocast on the GPU, fused AdamW, cosine schedule; the Trainer applies
                               recompute and torch.compile to the draft as in any run. The last checkpoint is exported
                               (sglang, eagle1-sglang).
    specforge                  SpecForge 0.2.0's own pieces, as benchmarks/draft_step.py assembles them for its online
                               EAGLE-3 consumer: draft config from the target's config.json (_generate_draft_config),
                               LlamaForCausalLMEagle3 with the target's embedding (its load_embedding) and our vocab map
                               (its load_vocab_mapping), OnlineEagle3Model(length=7), Eagle3TrainStrategy with a
                               TargetHead holding the target's lm_head, FSDPTrainingBackend (FSDP1 over a 1-rank group
                               on the GPU), BF16Optimizer, TrainerCore.train_step. The target is run here each step
                               (the same HF model and hooks as ours; no full-vocab argmax) for the aux states and the
                               final hidden state, which its strategy turns into full-vocab logits. Saved with its
                               TrainerController.save_checkpoint and exported with its export_to_sglang.

The same batches in the same order on every side for a seed: data.batches over the tokenised training set (seeded
shuffle per epoch, right-padded rows, the ragged tail dropped), as the Trainer reads it. SpecForge gets our loss mask
(assistant tokens, end-of-turn included: what its own chat parser marks) with each row's last token cleared, as its
normalizer does; each side then applies its own rule for which positions a step trains.

The schedule, both sides (SpecForge's BF16Optimizer and CosineAnnealingWarmupLR; ours through OptimConfig): AdamW
betas 0.9/0.999, weight decay 0, lr --lr with a linear warm-up over int(warmup_ratio * steps) steps then cosine to
0 at the last step, gradient norm clipped at 0.5, batch --batch-size, TTT length 7, step weight 0.8.

Timed, both sides: the training steps after the first --untimed-steps (default 50), from the end of that step to
the last update finished on the device: batch collation and copy to the device, the target forward (and the
teacher), the draft forward and backward, clipping, the optimizer and the schedule, and the per-step read of the
loss the loop does (ours logs every --log-every steps, SpecForge's step returns host floats every step). The first
steps, trained alike on both sides, are left out because torch.compile works in them (both sides compile, ours the
unroll's pieces, SpecForge flex_attention and its helpers) and how long it takes depends on what its on-disk caches
hold from earlier runs; in a run of real length it is noise. Model loading, draft construction, checkpointing and
export are not timed either. Also recorded: every step's time, and the whole loop's wall-clock (wall_s, compilation
included). Ours: the Trainer's own loop (Summary.wall_s) with the step ends taken from its batch fetches; SpecForge:
perf_counter around its loop, the device synchronised at the end. Peak GPU memory: torch.cuda.max_memory_allocated
over the job (target, draft, optimizer, activations).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples/llama_target.py"
SIDES = ("ours-eagle3", "ours-eagle1", "specforge")
TTT_STEPS = 7
STEP_WEIGHT = 0.8  # SpecForge's ploss_decay, our draft.step_weight
BETAS = (0.9, 0.999)  # torch AdamW's defaults, which BF16Optimizer keeps
MAX_GRAD_NORM = 0.5  # SpecForge's default, ours too
FORMATS = {"ours-eagle3": "sglang", "ours-eagle1": "eagle1-sglang"}


@dataclass
class Run:
    """One training run: which side, seed, how long, and the schedule."""

    side: str
    seed: int
    steps: int  # the schedule's length (and the run's, unless `seconds` stops it first)
    lr: float
    batch_size: int
    warmup_ratio: float
    log_every: int
    untimed: int  # the first steps, left out of the timed training time (module docstring)
    seconds: float | None = None  # stop once the timed training time reaches this (equal-time runs)
    matched: str = ""  # the run whose timed training time `seconds` is (equal-time runs)
    name: str = ""
    shared_gpu: bool = False  # trained beside other runs on one GPU on purpose: its result counts, its times do not
    profile: int = 0  # ours: the last `profile` steps under torch.profiler (a diagnosis run, in no comparison)

    def settings(self, prep: dict) -> dict:
        """What the run's result depends on: compared with a finished run's to skip it."""
        return {"side": self.side, "seed": self.seed, "steps": self.steps, "seconds": self.seconds,
                "matched": self.matched, "untimed": self.untimed, "lr": self.lr, "batch_size": self.batch_size,
                "warmup_ratio": self.warmup_ratio, "ttt_steps": TTT_STEPS, "data": prep["dataset"]["fingerprint"],
                "vocab": prep["vocab"]["sha256"], "target": prep["target_fingerprint"], "device": prep["device"],
                **({"profile": self.profile} if self.profile else {})}


def run_name(side: str, seed: int, steps: int, seconds: float | None = None, matched: str = "") -> str:
    """A run's directory name under <work>/train: side, seed, and its length (steps, or the run it matched in time)."""
    if seconds is None:
        return f"{side}-s{seed}-{steps}steps"  # a profiled run's name ends in -profileN (timed_run)
    return f"{side}-s{seed}-time-of-{matched}" if matched else f"{side}-s{seed}-{seconds:.0f}s"


def logs(work: Path) -> dict[str, dict]:
    """Every finished run's log (train.json) in <work>/train, by run name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((work / "train").glob("*/train.json"))}


def pick_device(name: str) -> torch.device:
    """As every command picks it (app/runtime.py): on a GPU torch's SDPA then never picks cuDNN, for both sides
    (the target forward both read is ours; SpecForge's draft attention is flex_attention)."""
    from eagle_trainer.app.runtime import pick_device as command_device
    return command_device(name, "device")


def cpu_dry_run_settings() -> None:
    """A CPU run: SpecForge's Triton loss interpreted (set before it is imported) and torch.compile'd functions run
    eagerly."""
    os.environ["TRITON_INTERPRET"] = "1"
    torch._dynamo.config.disable = True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def open_data(prep: dict, device: torch.device):
    """(target model, its TargetSpec and TargetInfo, tokenised training set, pad id, d2t, t2d)."""
    from eagle_trainer.app import plugins, runtime
    from eagle_trainer.config import DataConfig, TargetConfig
    from eagle_trainer.data import build_dataset, load_vocab_map
    from eagle_trainer.targets.loading import load_target

    plugins.load_plugins([str(PLUGIN)])  # LlamaForCausalLM (SmolLM2, the tiny target)
    model, tokenizer, spec, info = load_target(TargetConfig(path=prep["target"]), device)
    dataset, stats = build_dataset(DataConfig(path=prep["files"]["train"], max_length=prep["max_length"]), tokenizer,
                                   Path(prep["files"]["cache"]))
    assert stats["fingerprint"] == prep["dataset"]["fingerprint"], "the tokenised data changed since prepare"
    d2t, t2d = load_vocab_map(prep["files"]["vocab"])
    return SimpleNamespace(model=model, spec=spec, info=info, dataset=dataset, pad_id=runtime.pad_id(tokenizer),
                           d2t=d2t, t2d=t2d)


def epoch_batches(data, batch_size: int, seed: int, epoch: int, start: int = 0):
    """One epoch of batches as the Trainer reads them (train.py's train_batches with data.shuffle, no packing; the
    fused and naive TTT attention take any length, so no padding to a multiple)."""
    from eagle_trainer.data import batches
    yield from batches(data.dataset, batch_size, seed=seed, epoch=epoch, shuffle=True, pad_id=data.pad_id,
                       start=start)


class StepClock:
    """Times a loop by the moments it asks for its next batch (step i ends when step i + 1 asks), and ends the
    batches once the steps after the first `untimed` have taken `seconds`."""

    def __init__(self, untimed: int, seconds: float | None):
        self.untimed, self.seconds = untimed, seconds
        self.start: float | None = None
        self.ends: list[float] = []  # when each step ended (the last one's comes from the loop: `finish`)
        self.out_of_time = False

    def wrap(self, batches):
        for batch in batches:
            now = time.perf_counter()
            if self.start is None:
                self.start = now
            else:
                self.ends.append(now)
            if self.seconds is not None and len(self.ends) >= self.untimed and now - self.timed_from >= self.seconds:
                self.out_of_time = True
                return
            yield batch

    @property
    def timed_from(self) -> float:
        return self.ends[self.untimed - 1] if self.untimed else self.start

    def finish(self, wall_s: float, steps: int) -> dict:
        """The loop's times, given its wall-clock from the first fetch (Summary.wall_s) and its steps."""
        self.ends = self.ends[:steps - 1] + [self.start + wall_s]
        return step_times(self.start, self.ends, self.untimed)


class StepProfiler:
    """torch.profiler over the steps [first, last) of a loop that asks for its batches (steps counted by the
    batches handed out); the profile ends when step `last` asks (or the loop ends), and its tables go to `path`:
    operators by device time and by host time, with the kernel launches per step."""

    def __init__(self, first: int, last: int, path: Path, device: torch.device):
        self.first, self.last, self.path, self.device = first, last, path, device
        self.handed, self.prof = 0, None

    def wrap(self, batches):
        try:
            for batch in batches:
                if self.handed == self.first:
                    self.start()
                elif self.handed == self.last:
                    self.stop()
                self.handed += 1
                yield batch
        finally:
            self.stop()

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def stop(self) -> None:
        if self.prof is None:
            return
        sync(self.device)
        self.prof.__exit__(None, None, None)
        steps = min(self.handed, self.last) - self.first
        events = self.prof.key_averages()
        device_key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") if self.device.type == "cuda" else 0
        self.path.write_text(
            f"{steps} steps profiled; CUDA kernels launched: {kernels / max(steps, 1):.0f} a step\n\n"
            f"by device time:\n{events.table(sort_by=device_key, row_limit=30)}\n\n"
            f"by host time:\n{events.table(sort_by='cpu_time_total', row_limit=30)}\n")
        self.prof = None


def step_times(start: float, ends: list[float], untimed: int) -> dict:
    """wall_s (the whole loop), timed_s (the steps after the first `untimed`) and each step's seconds, from the
    loop's start and the steps' end times."""
    untimed = min(untimed, len(ends) - 1)
    return {"wall_s": ends[-1] - start, "timed_s": ends[-1] - (ends[untimed - 1] if untimed else start),
            "untimed_steps": untimed, "step_s": [b - a for a, b in zip([start] + ends[:-1], ends)]}


def draft_recipe(algorithm: str, vd: int):
    """DraftConfig from the recipe's draft group (recipes/draft/<algorithm>.yaml), with our draft vocab size."""
    from omegaconf import OmegaConf

    from eagle_trainer.app.runtime import RECIPES
    from eagle_trainer.config import DraftConfig
    fields = OmegaConf.to_container(OmegaConf.load(RECIPES / "draft" / f"{algorithm}.yaml"))
    return DraftConfig(**{**fields, "draft_vocab_size": vd})


def train_ours(prep: dict, run: Run, run_dir: Path, device: torch.device) -> dict:
    """Train with eagle_trainer's Trainer; -> the run's log (curves, times, export path)."""
    from eagle_trainer import registry
    from eagle_trainer.config import OptimConfig, TrainConfig
    from eagle_trainer.data import draft_ids_from_d2t, num_batches
    from eagle_trainer.export.sglang import TARGET_FINGERPRINT
    from eagle_trainer.targets.frozen import FrozenTarget
    from eagle_trainer.trainer import Trainer

    algorithm = run.side.removeprefix("ours-")
    data = open_data(prep, device)
    spec = registry.resolve(data.info.architecture, algorithm)
    aux_ids = tuple(data.spec.aux_layers(data.info.num_layers)) if spec.algorithm.needs_aux_hidden else ()
    draft_cfg = draft_recipe(algorithm, prep["draft_vocab_size"])
    target = FrozenTarget(data.model, data.spec, aux_ids, draft_ids_from_d2t(data.d2t), data.t2d,
                          draft_cfg.mask_teacher_argmax)
    torch.manual_seed(run.seed)  # as train.py seeds before building the draft
    draft = spec.algorithm.build_draft(data.info, draft_cfg, aux_ids)
    draft.config.extra[TARGET_FINGERPRINT] = prep["target_fingerprint"]
    draft.to(device)
    lm_head = target.target_head() if spec.algorithm.needs_target_head else None
    draft.set_target_weights(target.input_embedding(), lm_head, share=True)
    draft.set_vocab_map(data.d2t, data.t2d)
    optim = OptimConfig(lr=run.lr, min_lr_ratio=0.0, warmup_steps=int(run.warmup_ratio * run.steps),
                        weight_decay=0.0, betas=list(BETAS), max_grad_norm=MAX_GRAD_NORM, batch_size=run.batch_size)
    per_epoch = max(1, num_batches(len(data.dataset), run.batch_size))  # none: the Trainer says so
    train_cfg = TrainConfig(run_dir=str(run_dir), max_steps=run.steps, epochs=math.ceil(run.steps / per_epoch) + 1,
                            seed=run.seed, device=device.type, log_every=run.log_every, save_every=0, eval_batches=0,
                            progress=False, export_formats=[FORMATS[run.side]], keep_last=1)
    clock = StepClock(run.untimed, run.seconds)
    profiler = (StepProfiler(run.steps - run.profile, run.steps, run_dir / "profile.txt", device) if run.profile
                else None)
    trainer = Trainer(spec, target, draft, draft_cfg, optim, train_cfg,
                      lambda epoch, start: (profiler.wrap if profiler else iter)(
                          clock.wrap(epoch_batches(data, run.batch_size, run.seed, epoch, start))),
                      [], device, data_fingerprint=prep["dataset"]["fingerprint"],
                      run_config={"benchmark": "quality", **run.settings(prep)})
    summary = trainer.fit()
    export = run_dir / "export"
    spec.algorithm.exporters[FORMATS[run.side]].write(summary.checkpoint, export, overwrite=True)
    times = clock.finish(summary.wall_s, summary.steps)
    records = [{"step": r["step"], "t": clock.ends[r["step"] - 1] - clock.start, "loss": r["loss"],
                "step_loss": r["step_loss"], "acc": r["acc"], "lr": r["lr"]}
               for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if r.get("split") == "train"]
    return {"steps": summary.steps, **times, "out_of_time": clock.out_of_time, "records": records,
            "export": str(export), "loss_note": "mean over the valid tokens of each TTT step, weighted 0.8**k"}


def init_one_rank_group(directory: Path) -> None:
    """A 1-rank process group for SpecForge's FSDP wrap (its trainer runs under torchrun)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{directory.resolve()}/pg", rank=0, world_size=1)


def build_specforge(prep: dict, run: Run, data, run_dir: Path, aux_ids: tuple[int, ...], device: torch.device):
    """SpecForge's draft, training model, strategy, backend and optimizer for its online EAGLE-3 consumer; ->
    (TrainerCore, the draft config, its attention backend)."""
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.algorithms.eagle3.providers import algorithm_providers
    from specforge.algorithms.model_providers import resolve_eagle_capture_layers
    from specforge.modeling.auto import AutoDraftModel
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.training.backend import FSDPTrainingBackend, ParallelConfig
    from specforge.training.controller import TrainerCore
    from specforge.training.model_loading import _generate_draft_config
    from specforge.training.strategies.base import Eagle3TrainStrategy
    from torch import nn

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # SpecForge's model.torch_dtype; fp32 in the CPU dry run
    cfg = SimpleNamespace(model=SimpleNamespace(target_model_path=prep["target"], cache_dir=None,
                                                trust_remote_code=False, aux_hidden_state_layer_ids=None),
                          training=SimpleNamespace(strategy="eagle3"))
    draft_config = _generate_draft_config(cfg, algorithm_providers().model.draft_config)
    draft_config.draft_vocab_size = prep["draft_vocab_size"]
    # SpecForge resolves the capture layers from a run override, else the draft config's eagle_config, else
    # [1, L//2 - 1, L - 4]: ours. They are written into the draft config, SpecForge's place for them, so that the
    # saved draft names the layers it was trained on (SGLang reads them there).
    assert resolve_eagle_capture_layers(cfg, draft_config, data.model.config) == list(aux_ids)
    draft_config.eagle_config = {"eagle_aux_hidden_state_layer_ids": list(aux_ids), "use_aux_hidden_state": True}
    assert resolve_eagle_capture_layers(cfg, draft_config, data.model.config) == list(aux_ids)
    attention = "flex_attention" if cuda else "sdpa"  # its default; flex needs the GPU
    torch.manual_seed(run.seed)
    draft = AutoDraftModel.from_config(draft_config, attention_backend=attention, torch_dtype=dtype)
    vocab_path = run_dir / "vocab_mapping.pt"
    torch.save({"t2d": data.t2d.cpu(), "d2t": data.d2t.cpu()}, vocab_path)
    draft.load_vocab_mapping(str(vocab_path))
    draft.load_embedding(prep["target"])
    draft.freeze_embedding()
    draft = draft.to(device=device, dtype=dtype)
    model = OnlineEagle3Model(draft_model=draft, length=TTT_STEPS, attention_backend=attention).to(device, dtype)
    # TargetHead.from_pretrained reads lm_head.weight through a *.index.json, which a one-file (and a tied)
    # checkpoint lacks: its head is built empty and given the loaded target's lm_head tensor instead
    with torch.device("meta"):
        target_head = TargetHead(prep["target"])
    target_head.fc.weight = nn.Parameter(data.model.get_output_embeddings().weight.detach(), requires_grad=False)
    target_head.freeze_weights()
    target_head.eval()

    def optimizer(module):  # assembly.py's _ConfiguredOptimizerFactory with TrainingConfig's fields
        return BF16Optimizer(module, lr=run.lr, max_grad_norm=MAX_GRAD_NORM, total_steps=run.steps,
                             warmup_ratio=run.warmup_ratio, lr_scheduler="cosine")

    if cuda:
        init_one_rank_group(run_dir)
    backend = FSDPTrainingBackend(ParallelConfig.from_distributed(), optimizer_factory=optimizer)
    wrapped = backend.prepare_model(model, wrap=cuda, optimizer_target=model.draft_model)
    strategy = Eagle3TrainStrategy(wrapped, target_head=target_head, ploss_decay=STEP_WEIGHT)
    return TrainerCore(strategy, backend, accumulation_steps=1), draft_config, attention


def specforge_batch(batch, aux: torch.Tensor, final: torch.Tensor):
    """Our batch and target states as SpecForge's TrainBatch (target_repr hidden_state: its strategy re-runs the
    TargetHead over the final hidden state). Its offline normalizer clears each sample's last loss-mask entry."""
    from specforge.runtime.contracts import TrainBatch

    loss_mask = batch.loss_mask.long()
    last = batch.attention_mask.sum(1) - 1  # [B]: each row's last real token
    loss_mask[torch.arange(loss_mask.shape[0], device=loss_mask.device), last] = 0
    return TrainBatch(sample_ids=[str(i) for i in range(loss_mask.shape[0])], strategy="eagle3",
                      metadata={"target_repr": "hidden_state"},
                      tensors={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask.long(),
                               "loss_mask": loss_mask, "hidden_state": aux, "target": final})


def train_specforge(prep: dict, run: Run, run_dir: Path, device: torch.device) -> dict:
    """Train with SpecForge's TrainerCore on the same batches; save and export in its own format."""
    from specforge.export.to_sglang import export_to_sglang
    from specforge.training.controller import TrainerController

    from eagle_trainer.data import draft_ids_from_d2t
    from eagle_trainer.targets.frozen import FrozenTarget

    if run.seconds is not None:
        raise ValueError("--seconds runs ours for the time SpecForge took; SpecForge itself trains --steps")
    data = open_data(prep, device)
    aux_ids = tuple(data.spec.aux_layers(data.info.num_layers))
    target = FrozenTarget(data.model, data.spec, aux_ids, draft_ids_from_d2t(data.d2t), data.t2d)
    core, draft_config, attention = build_specforge(prep, run, data, run_dir, aux_ids, device)
    stream = (batch for epoch in itertools.count() for batch in epoch_batches(data, run.batch_size, run.seed, epoch))
    records, ends, probe = [], [], None
    sync(device)
    start = time.perf_counter()
    for step in range(1, run.steps + 1):
        batch = next(stream).to(device)
        states = target.capture(batch, argmax=False)  # the full-vocab logits are SpecForge's to form
        if probe is None:  # one sequence for check_export, copied once at the first step
            probe = (batch.input_ids[:1, :64].cpu(), states.aux_hidden[:1, :64].cpu())
        result = core.train_step(specforge_batch(batch, states.aux_hidden, states.final_hidden))
        ends.append(time.perf_counter())  # the step returned host floats read after its update was queued
        if step % run.log_every == 0 or step == run.steps:
            m = result.metrics
            records.append({"step": step, "t": ends[-1] - start, "loss": m["loss"],
                            "step_loss": [m[f"ploss_{k}"] for k in range(TTT_STEPS)],
                            "acc": [m[f"acc_{k}"] for k in range(TTT_STEPS)],
                            "lr": core.backend.optimizer.get_learning_rate()})
        if step % 100 == 0:  # the rate so far, in the log even if the command is cut short
            print(f"train {run.name}: step {step}, {ends[-1] - start:.1f} s", flush=True)
    sync(device)
    ends[-1] = time.perf_counter()
    # its own save (TrainerController.save_checkpoint: training_state.pt with the draft's weights, no embedding)
    # and its own SGLang export (LlamaForCausalLMEagle3: config.json + model.safetensors)
    controller = TrainerController(core, run_id=run.name, output_dir=str(run_dir / "specforge"))
    checkpoint = controller.save_checkpoint(run.steps)
    config_path = run_dir / "draft_config.json"
    draft_config.to_json_file(str(config_path))
    export = run_dir / "export"
    shutil.rmtree(export, ignore_errors=True)
    export_to_sglang(checkpoint.checkpoint_uri, str(config_path), str(export))
    check = check_export(prep, export, checkpoint.checkpoint_uri, config_path, *probe)
    print(f"train {run.name}: SpecForge's export read by eagle_trainer: step-0 logits within "
          f"{check['max_abs_diff']:.2e} of SpecForge's own rebuild (|logit| up to {check['max_abs_logit']:.1f})")
    if not check["max_abs_diff"] <= 1e-3 * max(1.0, check["max_abs_logit"]):
        raise AssertionError(f"eagle_trainer reads SpecForge's draft differently from SpecForge: {check}")
    return {"steps": run.steps, **step_times(start, ends, run.untimed), "out_of_time": False, "records": records,
            "export": str(export), "attention": attention, "export_check": check,
            "loss_note": "its ploss per TTT step (soft CE summed over valid positions / all B*T positions), "
                         "weighted 0.8**k"}


@torch.no_grad()
def check_export(prep: dict, export: Path, checkpoint_uri: str, config_path: Path, ids: torch.Tensor,
                 aux: torch.Tensor) -> dict:
    """The draft eagle-eval reads from SpecForge's export against SpecForge's own rebuild of its checkpoint
    (materialize_draft + load_embedding), both in fp32 on the CPU with the same embedding: TTT step 0's logits at
    every position of one training sequence, SpecForge's through the pieces OnlineEagle3Model.forward runs (its input
    ids shifted by one as TargetHead.preprocess shifts them), ours through drafts.unroll.
    -> {"max_abs_diff", "max_abs_logit"}."""
    from specforge.export.checkpoint_io import materialize_draft, resolve_training_state
    from specforge.utils import padding

    from eagle_trainer.drafts.unroll import unroll
    from eagle_trainer.export import read_draft

    peer = materialize_draft(resolve_training_state(checkpoint_uri), str(config_path)).float().eval()
    peer.load_embedding(prep["target"])
    ids, aux = ids.cpu(), aux.cpu().float()
    b, t = ids.shape
    hidden = peer.project_hidden_states(aux)
    mask = peer.prepare_decoder_attention_mask(attention_mask=torch.ones_like(ids), hidden_states=hidden,
                                               batch_size=b, seq_length=t, past_key_values_length=0)
    out = peer.backbone(input_embeds=peer.embed_input_ids(padding(ids, left=False)), hidden_states=hidden,
                        cache_hidden=[[], []], attention_mask=mask, position_ids=torch.arange(t)[None],
                        past_key_values=None, use_cache=True)
    theirs = peer.compute_logits(out)
    ours = read_draft(export).float().eval()
    ours.set_target_weights(peer.embed_tokens.weight.detach().clone())
    mine = ours.logits(unroll(ours, ids, aux, 1)[0])
    return {"max_abs_diff": (mine - theirs)[:, :-1].abs().max().item(), "max_abs_logit": theirs.abs().max().item()}


def train(prep: dict, run: Run, work: Path) -> dict:
    """Train `run` unless a finished run with the same settings is in <work>/train/<name>; -> its log."""
    run_dir = work / "train" / run.name
    log_path = run_dir / "train.json"
    settings = run.settings(prep)
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        if log.get("settings") == settings:
            print(f"train {run.name}: done before ({log['steps']} steps, {log['wall_s']:.1f} s); skipped")
            return log
        print(f"train {run.name}: settings changed since the last run; training again")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    device = pick_device(prep["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if run.shared_gpu and run.seconds is not None:
        raise ValueError("--shared-gpu is for runs compared at equal steps: a run trained for a time needs the GPU "
                         "to itself")
    print(f"train {run.name}: {run.side}, seed {run.seed}, {run.steps} steps"
          + (f" or until {run.seconds:.1f} s after step {run.untimed} ({run.matched or 'given'})" if run.seconds
             else "") + f", lr {run.lr}, "
          f"batch {run.batch_size}, on {device}", flush=True)
    trained = (train_specforge if run.side == "specforge" else train_ours)(prep, run, run_dir, device)
    timed = trained["step_s"][trained["untimed_steps"]:]
    log = {"name": run.name, "settings": settings, **trained,
           "median_step_s": statistics.median(timed), "mean_step_s": statistics.fmean(timed),
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "shared_gpu": run.shared_gpu}
    log_path.write_text(json.dumps(log) + "\n")
    last = log["records"][-1]
    print(f"train {run.name}: {log['steps']} steps, the last {log['steps'] - log['untimed_steps']} in "
          f"{log['timed_s']:.1f} s (median step {1e3 * log['median_step_s']:.1f} ms), all in {log['wall_s']:.1f} s; "
          f"last logged loss {last['loss']:.3f}, accuracy {last['acc'][0]:.3f} "
          f"(TTT step 0); draft {log['export']}", flush=True)
    if device.type == "cuda" and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return log

"""One EAGLE-3 draft training step (forward, backward, AdamW) at Qwen3-30B-A3B draft shapes: ours vs SpecForge 0.2.0.

Draft: one Llama decoder layer, H 2048, 32 heads, 4 KV heads, D 128, MLP 6144, draft vocab Vd 32000, target vocab
V 151936 (tests/fixtures/qwen3_30b_a3b_config.json), K = 7 TTT steps, B = 1, T = --seqs. Both sides run in this
process on the same inputs, one after the other (the other side freed), each built as its own trainer builds it.

Inputs (shared, generated once per T): input_ids [1, T]; aux hidden states [1, T, 3H] and the target's final
(normed) hidden state [1, T, H] in bf16, N(0, 1); the target lm_head [V, H] bf16, N(0, 0.02) with the rows of the
draft ids at twice that, so the full-vocab argmax falls in the draft vocab at almost every position (a
frequency-built vocab map covers most tokens); a vocab map of Vd random target ids (ascending) as d2t / t2d; loss
and attention masks all ones. Each side copies the target's input embedding [V, H] (N(0, 0.02), one seed) into
its own frozen embedding.

The teacher, the same on both sides: both steps start from the final hidden state and the lm_head and form
softmax over the draft-vocab columns of the bf16 logits, in fp32, masked where the full-vocab argmax is outside
the draft vocab. SpecForge does it inside its step (TargetHead -> [1, T, V] logits -> _compute_target_p), so ours
does too, as our online trainer does per batch: chunked_argmax over the full lm_head (FrozenTarget.capture) and
teacher_outputs over the lm_head rows of the draft ids (TargetOutputs.teacher_logits [1, T, Vd], teacher_valid).

Ours (eagle_trainer/train.py + trainer.py): registry.resolve(arch, "eagle3"); build_draft from the target's
TargetInfo and DraftConfig(draft_vocab_size, ttt_steps=7, attention=--attention); fp32 master weights, the
embedding copied in (fp32, frozen), the vocab map set; the loss `eagle3_loss` under bf16 autocast; torch AdamW
(OptimConfig: lr 1e-4, betas 0.9/0.95, fused), grad clip 0.5, the cosine schedule; the loss read each step (its host
copy queued before backward, read after), the update skipped on the device where the gradient norm is not finite
(trainer.guarded_step), that norm read one step later; draft.recompute on (--no-recompute: off).

Peer (SpecForge 0.2.0, its own code, read from the wheel):
- draft config: specforge/training/model_loading.py `_generate_draft_config` from the target config.json (the
  target fields, architectures [LlamaForCausalLMEagle3], model_type llama, 1 layer, draft_vocab_size 32000 from
  specforge/algorithms/eagle3/providers.py; target_hidden_size unset = H);
- draft: as specforge/algorithms/model_providers.py `build_eagle3_draft`: AutoDraftModel.from_config(config,
  attention_backend, torch_dtype=bf16) (specforge/modeling/auto.py -> modeling/draft/llama3_eagle.py
  LlamaForCausalLMEagle3: embed_tokens [V, H], fc [3H -> H], midlayer, norm, lm_head [H -> Vd], buffers t2d bool
  [V] (ones) and d2t int64 [Vd] (zeros)), `load_vocab_mapping` (torch.load of {"t2d", "d2t"}), the embedding
  copied in with load_embedding's copy_ (it reads model.embed_tokens.weight from the target checkpoint),
  freeze_embedding, .to(device, bf16);
- training model: `build_eagle3_model`: OnlineEagle3Model(draft, length=7, attention_backend) in bf16
  (specforge/algorithms/eagle3/model.py). forward(input_ids, attention_mask, target, loss_mask, hidden_states)
  with target = full-vocab logits [B, T, V] returns per-step lists (plosses, acceptance_rates, acces, corrects,
  denoms, metric losses, loss denoms); ploss_k = masked soft cross-entropy averaged over all B*T positions
  (core/loss.py LogSoftmaxLoss, a Triton kernel);
- step: specforge/training/strategies/base.py Eagle3TrainStrategy(target_head=TargetHead, ploss_decay 0.8,
  compact_teacher off, the defaults). Online training in 0.2.0 is disaggregated: the trainer receives the aux
  hidden states and the target's last hidden state (target_repr "hidden_state", algorithms/eagle3/providers.py)
  and re-runs the frozen bf16 TargetHead (modeling/target/target_head.py: shifts target and input_ids left by
  one, logits = fc(hidden)); loss = sum_k 0.8**k ploss_k. TrainerCore.train_step (training/controller.py) runs
  it, backward through FSDPTrainingBackend, and BF16Optimizer.step (specforge/optimizer.py: grad-norm clip 0.5,
  torch AdamW lr 1e-4 over fp32 master copies of the bf16 params, cosine warm-up schedule, copy back).
  SpecForge wraps the model in FSDP1 (SHARD_GRAD_OP, bf16 mixed precision; FSDP runs a 1-rank group as NO_SHARD);
  --peer-fsdp (default on the GPU) does the same over a 1-rank process group. The TargetHead holds the shared
  lm_head tensor (not a second copy), as ours reads it: each side holds one lm_head.

SpecForge imports with torch, transformers (with its huggingface_hub, safetensors) and triton alone; flash_attn is
optional (a warning) and yunchang only for USP. On the device it is installed from .whl/ with
`pip install --no-deps --target`. tokens/s = B*T / median step time (after warm-up, steps run back to back
as in a training loop, CUDA events recorded between them: `time_steps`).
Peak memory: torch.cuda.max_memory_allocated over one step after warm-up, less what was allocated before that side
was built, plus the shared inputs: shared inputs + the side's frozen embedding, params, grads, AdamW state
(SpecForge: + fp32 masters) + activations and temporaries. (Counted from the build on: SpecForge's side leaves
memory allocated after it is freed, about 4 GiB after the first T and 1.7 GiB more per T on an H100, which a raw
peak would charge to every later measurement of both sides.) The first update's losses of both sides are printed
(different inits; SpecForge averages over all T positions, ours over the valid ones, so its per-step losses are also
shown x T / valid).

    python benchmarks/draft_step.py [--seqs 2048 4096 8192 16384] [--attention fused|flex|naive] [--no-recompute]
                                    [--results PATH] [--profile]
    python benchmarks/draft_step.py --device cpu --tiny     # dry run: tiny widths, fp32, torch.compile off
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, add_run_args, append_rows, row

FIXTURE = Path(__file__).parents[1] / "tests/fixtures/qwen3_30b_a3b_config.json"
# widths for a CPU dry run (draft vocab TINY_VD)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 1024, "bos_token_id": None, "eos_token_id": None}
TINY_VD = 256
VD = 32000
TTT_STEPS = 7
MAX_STEPS = 1000  # LR schedule length on both sides (only the schedule's shape depends on it)
# SpecForge's TrainingConfig defaults (specforge/config/schema.py): what BF16Optimizer is built with
PEER_OPTIM = {"lr": 1e-4, "max_grad_norm": 0.5, "warmup_ratio": 0.015, "lr_scheduler": "cosine"}


def write_target_config(directory: Path, tiny: bool):
    """The target's config.json (both sides read it) -> the HF config."""
    from transformers import AutoConfig
    fields = json.loads(FIXTURE.read_text())
    if tiny:
        fields.update(TINY)
    (directory / "config.json").write_text(json.dumps(fields))
    return AutoConfig.from_pretrained(str(directory))


def make_inputs(hf_config, vd: int, seq: int, device: torch.device, dtype: torch.dtype) -> SimpleNamespace:
    """What the frozen target hands the draft for one sequence, and the vocab map."""
    v, h = hf_config.vocab_size, hf_config.hidden_size
    g = torch.Generator(device).manual_seed(seq)
    draft_ids = torch.randperm(v, generator=g, device=device)[:vd].sort().values  # [Vd] target ids, ascending
    t2d = torch.zeros(v, dtype=torch.bool, device=device)
    t2d[draft_ids] = True
    lm_head = torch.randn(v, h, generator=g, device=device) * 0.02
    lm_head[draft_ids] *= 2  # the full-vocab argmax lands in the draft vocab almost everywhere
    return SimpleNamespace(
        input_ids=torch.randint(0, v, (1, seq), generator=g, device=device),
        aux=torch.randn(1, seq, 3 * h, generator=g, device=device).to(dtype),  # [1, T, 3H]
        final=torch.randn(1, seq, h, generator=g, device=device).to(dtype),  # [1, T, H] after the final norm
        lm_head=lm_head.to(dtype),  # [V, H]
        draft_ids=draft_ids, t2d=t2d, d2t=draft_ids - torch.arange(vd, device=device))


def target_embedding(hf_config, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The target's input embedding [V, H], the same on both sides."""
    g = torch.Generator(device).manual_seed(1)
    return (torch.randn(hf_config.vocab_size, hf_config.hidden_size, generator=g, device=device) * 0.02).to(dtype)


def build_ours(hf_config, inputs: SimpleNamespace, vd: int, attention: str, device: torch.device,
               recompute: bool = True):
    """Our draft, optimizer and step as train.py / Trainer build and run them; step() runs one update and returns
    its losses."""
    from eagle_trainer import registry
    from eagle_trainer.config import DraftConfig, OptimConfig
    from eagle_trainer.drafts import frozen_weights_to
    from eagle_trainer.drafts.policy import apply_compile, apply_recompute
    from eagle_trainer.targets.frozen import chunked_argmax, teacher_outputs
    from eagle_trainer.trainer import cosine_schedule, guarded_step
    from eagle_trainer.types import Batch, CapturedStates, HostCopy

    arch = hf_config.architectures[0]
    spec = registry.resolve(arch, "eagle3")
    info = spec.target.read_info(arch, hf_config)
    cfg = DraftConfig(draft_vocab_size=vd, ttt_steps=TTT_STEPS, attention=attention, recompute=recompute)
    optim = OptimConfig()
    torch.manual_seed(0)
    draft = spec.algorithm.build_draft(info, cfg, spec.target.aux_layers(info.num_layers)).to(device)
    draft.set_target_weights(target_embedding(hf_config, device, inputs.lm_head.dtype))  # copy_ casts to fp32
    draft.set_vocab_map(inputs.d2t, inputs.t2d)
    if recompute:  # the Trainer's policy, applied from outside the draft
        apply_recompute(draft)
    if device.type == "cuda":
        apply_compile(draft)
        frozen_weights_to(draft, torch.bfloat16)  # as the Trainer does
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                  fused=True)  # as the Trainer's, on the GPU and the CPU
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(optim, MAX_STEPS))
    ones = torch.ones_like(inputs.input_ids, dtype=torch.bool)
    batch = Batch(inputs.input_ids, ones, ones)
    final = inputs.final
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def forward():  # Trainer._loss: the teacher is dropped when it returns, before backward
        # the teacher, as FrozenTarget.capture + teacher_outputs form it after the target's backbone
        argmax_valid = inputs.t2d[chunked_argmax(final.reshape(-1, final.shape[-1]), inputs.lm_head)]
        states = CapturedStates(aux_hidden=inputs.aux, final_hidden=final,
                                argmax_valid=argmax_valid.view(final.shape[:2]))
        # FrozenTarget.draft_head: the lm_head rows of the draft ids [Vd, H], gathered per batch and freed here
        outputs = teacher_outputs(states, inputs.lm_head[inputs.draft_ids], cfg.mask_teacher_argmax)
        with autocast:
            return spec.algorithm.loss(draft, batch, outputs, cfg, attention)

    last_norm = []  # the previous update's gradient norm (device), read one step later as Trainer.fit reads it

    def step() -> SimpleNamespace:
        optimizer.zero_grad(set_to_none=True)
        out = forward()
        out.start_host_copy()
        out.loss.backward()
        loss = out.host_loss  # after backward is queued: waits for the forward pass, as Trainer.fit reads it
        if last_norm:
            float(last_norm.pop().tolist())
        norm = torch.nn.utils.clip_grad_norm_(draft.parameters(), optim.max_grad_norm)
        guarded_step(optimizer, norm)  # skipped on the device where the norm is not finite, as Trainer.fit steps
        last_norm.append(HostCopy(norm))
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return SimpleNamespace(loss=loss, step_loss=out.step_loss, step_count=out.step_count)

    step.forward = forward  # benchmarks/profile_draft.py splits the step's memory into forward and backward
    return step


def build_peer(config_dir: Path, hf_config, inputs: SimpleNamespace, vd: int, attention: str, fsdp: bool,
               device: torch.device):
    """SpecForge's draft, training model, strategy, backend and optimizer as its trainer assembles them for the
    EAGLE-3 consumer of online (disaggregated) training; step() runs one update and returns its losses."""
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.algorithms.eagle3.providers import algorithm_providers
    from specforge.modeling.auto import AutoDraftModel
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.runtime.contracts import TrainBatch
    from specforge.training.backend import FSDPTrainingBackend, ParallelConfig
    from specforge.training.controller import TrainerCore
    from specforge.training.model_loading import _generate_draft_config
    from specforge.training.strategies.base import Eagle3TrainStrategy
    from torch import nn

    dtype = inputs.lm_head.dtype  # SpecForge's model.torch_dtype: bfloat16 (fp32 in the CPU dry run)
    run = SimpleNamespace(model=SimpleNamespace(target_model_path=str(config_dir), cache_dir=None,
                                                trust_remote_code=False),
                          training=SimpleNamespace(strategy="eagle3"))
    draft_config = _generate_draft_config(run, algorithm_providers().model.draft_config)
    draft_config.draft_vocab_size = vd  # 32000 already at full size; the tiny dry run shrinks it
    torch.manual_seed(0)
    draft = AutoDraftModel.from_config(draft_config, attention_backend=attention, torch_dtype=dtype)
    vocab_path = config_dir / "vocab_mapping.pt"
    torch.save({"t2d": inputs.t2d.cpu(), "d2t": inputs.d2t.cpu()}, vocab_path)
    draft.load_vocab_mapping(str(vocab_path))
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target_embedding(hf_config, device, dtype))  # load_embedding's copy_
    draft.freeze_embedding()
    draft = draft.to(device=device, dtype=dtype)
    model = OnlineEagle3Model(draft_model=draft, length=TTT_STEPS, attention_backend=attention).to(device, dtype)

    with torch.device("meta"):  # TargetHead.from_pretrained without a checkpoint: the shared lm_head is its weight
        target_head = TargetHead(str(config_dir))
    target_head.fc.weight = nn.Parameter(inputs.lm_head, requires_grad=False)
    target_head.freeze_weights()
    target_head.eval()

    def optimizer(module):  # assembly.py's _ConfiguredOptimizerFactory
        return BF16Optimizer(module, total_steps=MAX_STEPS, **PEER_OPTIM)

    backend = FSDPTrainingBackend(ParallelConfig.from_distributed(), optimizer_factory=optimizer)
    wrapped = backend.prepare_model(model, wrap=fsdp, optimizer_target=model.draft_model)
    core = TrainerCore(Eagle3TrainStrategy(wrapped, target_head=target_head), backend, accumulation_steps=1)
    ones = torch.ones_like(inputs.input_ids)
    batch = TrainBatch(sample_ids=["0"], strategy="eagle3", metadata={"target_repr": "hidden_state"},
                       tensors={"input_ids": inputs.input_ids, "attention_mask": ones, "loss_mask": ones,
                                "hidden_state": inputs.aux, "target": inputs.final})

    def step() -> SimpleNamespace:
        result = core.train_step(batch)
        return SimpleNamespace(loss=result.loss, step_loss=[result.metrics[f"ploss_{k}"] for k in range(TTT_STEPS)])

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: torch.device, iters: int) -> list[float]:
    """Milliseconds of each of `iters` steps run back to back, as a training loop runs them: on the GPU, CUDA events
    recorded between the steps and read after the last, so a step whose host work runs ahead of the GPU (ours reads
    only the forward pass's loss in a step) is not made to wait at its end."""
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    sync(device)
    events[0].record()
    for i in range(iters):
        step()
        events[i + 1].record()
    events[-1].synchronize()
    return [a.elapsed_time(b) for a, b in itertools.pairwise(events)]


def step_memory(step, device: torch.device) -> tuple[int, int]:
    """(bytes allocated before one step, peak bytes allocated during it); zeros off the GPU."""
    if device.type != "cuda":
        step()
        return 0, 0
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    step()
    sync(device)
    return held, torch.cuda.max_memory_allocated()


def profile_table(step, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        sync(device)
    return prof.key_averages().table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=20,
                                     max_name_column_width=70)


def run_side(label: str, build, args, device: torch.device) -> SimpleNamespace:
    """Build one side, take the first update (its losses), warm up, measure memory and time, then free it."""
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    step = build()
    first = step()
    for _ in range(args.warmup - 1):
        step()
    held, peak = step_memory(step, device)
    held, peak = held - before, peak - before  # this side's own allocations (the caller adds the shared inputs)
    times = time_steps(step, device, args.iters)
    if args.profile:
        print(f"--- {label}\n{profile_table(step, device)}", flush=True)
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return SimpleNamespace(ms=statistics.median(times), held=held, peak=peak, first=first, before=before)


def init_one_rank_group(directory: Path) -> None:
    """A 1-rank process group for SpecForge's FSDP wrap (its trainer runs under torchrun)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{directory}/pg", rank=0, world_size=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="T values (default 2048 4096 8192 16384; "
                        "--tiny: 48 80)")
    parser.add_argument("--attention", choices=("fused", "flex", "naive"), default=None,
                        help="our TTT attention (default fused on the GPU, as draft.attention=auto; naive on the CPU)")
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                        help="our draft.recompute (default on, as eagle-train on a GPU): backward forms the "
                        "elementwise work again")
    parser.add_argument("--peer-attention", choices=("flex_attention", "sdpa"), default=None,
                        help="SpecForge's attention_backend (default flex_attention, its default; sdpa on the CPU)")
    parser.add_argument("--peer-fsdp", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap SpecForge's model in FSDP1 over a 1-rank group as its trainer does "
                        "(default: on the GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 3; --tiny: 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 10; --tiny: 2)")
    add_run_args(parser, "cpu: fp32, torch.compile off, Triton interpreted (a dry run; use with --tiny)",
                 "print a profiler table of one step of each side")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible; run on a GPU or use --device cpu --tiny")
    if args.peer_fsdp and not cuda:
        raise ValueError("--peer-fsdp needs a GPU (FSDP refuses CPU modules); leave it off with --device cpu")
    seqs = args.seqs or ([48, 80] if args.tiny else [2048, 4096, 8192, 16384])
    args.attention = args.attention or ("fused" if cuda else "naive")
    args.peer_attention = args.peer_attention or ("flex_attention" if cuda else "sdpa")
    args.peer_fsdp = cuda if args.peer_fsdp is None else args.peer_fsdp
    args.warmup = max(1, args.warmup or (1 if args.tiny else 3))
    args.iters = args.iters or (2 if args.tiny else 10)
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # SpecForge's loss is a Triton kernel, decorated at its import
        torch._dynamo.config.disable = True  # torch.compile'd functions run eagerly (SpecForge's norms, masks)
    dtype = torch.bfloat16 if cuda else torch.float32
    vd = TINY_VD if args.tiny else VD
    import transformers
    try:
        peer_version = version("specforge")
    except PackageNotFoundError:
        raise ValueError("SpecForge is not importable: pip install --no-deps --target /tmp/site "
                         ".whl/specforge-0.2.0-py3-none-any.whl and put /tmp/site on PYTHONPATH") from None
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, specforge {peer_version}")
    peer_name = (f"SpecForge {peer_version} (OnlineEagle3Model + Eagle3TrainStrategy + BF16Optimizer, "
                 f"{args.peer_attention}{', FSDP1 1 rank' if args.peer_fsdp else ''})")

    work = Path(tempfile.mkdtemp(prefix="draft_step_"))
    hf_config = write_target_config(work, args.tiny)
    if args.peer_fsdp:
        init_one_rank_group(work)
    h, v = hf_config.hidden_size, hf_config.vocab_size
    shape = (f"{'tiny' if args.tiny else 'Qwen3-30B-A3B'} draft (H {h}, {hf_config.num_attention_heads}/"
             f"{hf_config.num_key_value_heads} heads, D {hf_config.head_dim}, MLP {hf_config.intermediate_size}, "
             f"Vd {vd}, V {v}), K={TTT_STEPS}")
    gib = 2**30
    rows, table = [], []
    for seq in seqs:
        inputs = make_inputs(hf_config, vd, seq, device, dtype)
        shared = sum(t.numel() * t.element_size() for t in vars(inputs).values())
        build = partial(build_ours, hf_config, inputs, vd, args.attention, device, args.recompute)
        ours = run_side(f"ours T={seq}", build, args, device)
        build = partial(build_peer, work, hf_config, inputs, vd, args.peer_attention, args.peer_fsdp, device)
        peer = run_side(f"specforge T={seq}", build, args, device)
        for side in (ours, peer):  # each side's own allocations + the shared inputs it reads
            side.held, side.peak = side.held + shared, side.peak + shared
        del inputs, build
        counts = ours.first.step_count
        rescaled = [p * seq / max(c, 1) for p, c in zip(peer.first.step_loss, counts, strict=True)]
        print(f"T={seq}: first update, loss ours {ours.first.loss:.4f}, specforge {peer.first.loss:.4f}; "
              f"valid tokens at step 0: {counts[0]}/{seq}\n"
              f"  per step, ours (mean over valid tokens): {' '.join(f'{x:.3f}' for x in ours.first.step_loss)}\n"
              f"  per step, specforge x T/valid:           {' '.join(f'{x:.3f}' for x in rescaled)}")
        tok_ours, tok_peer = seq / ours.ms * 1e3, seq / peer.ms * 1e3
        if cuda:
            print(f"  memory before build: ours {ours.before / gib:.2f} GiB, specforge {peer.before / gib:.2f} GiB "
                  f"(shared inputs {shared / gib:.2f} GiB); held before a step: ours {ours.held / gib:.2f}, "
                  f"specforge {peer.held / gib:.2f} GiB")
        print(f"  ours {ours.ms:9.2f} ms {tok_ours:10,.0f} tok/s   specforge {peer.ms:9.2f} ms {tok_peer:10,.0f} tok/s",
              flush=True)
        case = f"{shape}, B=1 T={seq}, one step (fwd + bwd + AdamW, teacher from final hidden + lm_head in the step)"
        ours_cfg = (f"ours attention {args.attention}, recompute {'on' if args.recompute else 'off'}; steps timed back "
                    "to back")
        rows.append(row(f"{case}; tokens/s; {ours_cfg}",
                        f"{tok_ours:,.0f} tok/s ({ours.ms:.1f} ms)", f"{tok_peer:,.0f} tok/s ({peer.ms:.1f} ms)",
                        peer_name, peer.ms / ours.ms))
        if cuda:
            rows.append(row(f"{case}; {ours_cfg}; peak memory of one step (memory: ratio > 1 = we use less); counts "
                            f"shared inputs "
                            f"{shared / gib:.2f} GiB + each side's frozen embedding, params, grads, AdamW state "
                            "(SpecForge: + fp32 masters) + activations",
                            f"{ours.peak / gib:.2f} GiB", f"{peer.peak / gib:.2f} GiB", peer_name,
                            peer.peak / ours.peak))
        table.append((seq, tok_ours, tok_peer, ours.peak, peer.peak, ours.first.loss, peer.first.loss))

    if args.peer_fsdp:
        torch.distributed.destroy_process_group()
    shutil.rmtree(work, ignore_errors=True)
    results_path = args.results if args.tiny else (args.results or RESULTS)
    if results_path is not None:
        append_rows("draft_step", rows, "EAGLE-3 draft training step, `benchmarks/draft_step.py`: ours (eagle3_loss, "
                    "fp32 masters under bf16 autocast, fused AdamW) vs SpecForge's OnlineEagle3Model driven by its "
                    "TrainerCore (bf16 draft, BF16Optimizer), same inputs; tokens/s = B*T / median step time "
                    "(CUDA events); ratio = peer time / our time, for memory rows peer bytes / our bytes.",
                    results_path)
    print(f"\n{shape}; ours attention {args.attention}, recompute {'on' if args.recompute else 'off'}; "
          f"peer = {peer_name}")
    print("| T | ours tok/s | peer tok/s | x peer | ours peak GiB | peer peak GiB | mem x (>1: less) | "
          "first loss ours | first loss peer |\n|---|---|---|---|---|---|---|---|---|")
    for seq, to, tp, mo, mp, lo, lp in table:
        mem = f"{mo / gib:.2f} | {mp / gib:.2f} | {mp / mo:.2f}" if cuda else "n/a | n/a | n/a"
        print(f"| {seq} | {to:,.0f} | {tp:,.0f} | {to / tp:.2f} | {mem} | {lo:.3f} | {lp:.3f} |")


if __name__ == "__main__":
    main()

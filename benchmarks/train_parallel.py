"""Online EAGLE-3 training of a Qwen3-30B-A3B-shaped target over several GPUs: weak scaling, memory, loading.

Target: Qwen3MoeForCausalLM with tests/fixtures/qwen3_30b_a3b_config.json's shapes (48 layers, H 2048, 128 experts
of width 768, top-8, V 151936; 30.5B parameters), random bf16 weights N(0, 0.02) (norms 1), written as an HF
checkpoint in the per-expert layout (`mlp.experts.<e>.{gate,up,down}_proj.weight`), one safetensors file per layer.
Draft: the EAGLE-3 draft train.py builds (one layer, Vd 32000, K 7), aux layers 1, 23, 44. Data: synthetic
sequences of T random ids, the second half trained, B=1 per GPU (weak scaling: the global batch grows with the
GPUs). Our kernels throughout (MoE core, fused RMSNorm, fused TTT attention).

Each configuration runs under torchrun as its own job (`--worker`), through the code train.py runs:
    1 GPU          load_target (from_pretrained onto the GPU), no sharding
    N GPUs, EP=N   load_sharded_target: FSDP2 per block over N, experts split over N (all-to-all)
    N GPUs, EP=1   load_sharded_target: FSDP2 per block over N, experts gathered with their block
Recorded per job: tokens/s per GPU (median of the per-step windows after WARMUP_STEPS; every rank's step holds T
tokens), peak GPU memory (max over ranks, target weights included), load time and peak host RSS (max over ranks),
the weights one rank holds. The peer of each multi-GPU row is the 1-GPU run: ratio = per-GPU tokens/s over the
1-GPU tokens/s (weak-scaling efficiency; goal >= 0.85 at 4 GPUs).

    python benchmarks/train_parallel.py [--runs 1:1 2:2 2:1] [--layers 48] [--seq 4096] [--steps 60]
    python benchmarks/train_parallel.py --runs 1:1 4:4 4:4:2 4:1 4:1:1:2
        # GPUS:EP[:CHUNKS[:PREFETCH]]: parallel.ep_chunks, parallel.prefetch_blocks (default 1 each)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, append_rows, row

FIXTURE = Path(__file__).parents[1] / "tests/fixtures/qwen3_30b_a3b_config.json"
VD = 32000
WARMUP_STEPS = 5


def build_checkpoint(path: Path, layers: int) -> None:
    """The random-weight checkpoint, written layer by layer from the GPU (no whole model anywhere)."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from eagle_trainer.targets.tiny_tokenizer import save_tiny_tokenizer
    fields = json.loads(FIXTURE.read_text())
    fields.update(num_hidden_layers=layers, max_window_layers=layers, max_position_embeddings=65536)
    config = Qwen3MoeConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    config.architectures = ["Qwen3MoeForCausalLM"]
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator("cuda").manual_seed(0)
    h, heads, kv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    inter, experts, vocab = config.moe_intermediate_size, config.num_experts, config.vocab_size

    def rand(*shape):
        return (torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map = {}

    def write(name: str, tensors: dict) -> None:
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    write("embed.safetensors", {"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
                                "model.norm.weight": ones(h)})
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors = {f"{p}.input_layernorm.weight": ones(h), f"{p}.post_attention_layernorm.weight": ones(h),
                   f"{p}.self_attn.q_proj.weight": rand(heads * d, h), f"{p}.self_attn.k_proj.weight": rand(kv * d, h),
                   f"{p}.self_attn.v_proj.weight": rand(kv * d, h), f"{p}.self_attn.o_proj.weight": rand(h, heads * d),
                   f"{p}.self_attn.q_norm.weight": ones(d), f"{p}.self_attn.k_norm.weight": ones(d),
                   f"{p}.mlp.gate.weight": rand(experts, h)}
        for e in range(experts):
            tensors |= {f"{p}.mlp.experts.{e}.gate_proj.weight": rand(inter, h),
                        f"{p}.mlp.experts.{e}.up_proj.weight": rand(inter, h),
                        f"{p}.mlp.experts.{e}.down_proj.weight": rand(h, inter)}
        write(f"layer_{i:03d}.safetensors", tensors)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(str(path))
    save_tiny_tokenizer(path, vocab_size=1024)


def worker(args) -> None:
    """One torchrun job: load, train `steps` steps, write rank 0's numbers to --out."""
    from offline import synthetic_dataset

    from eagle_trainer import registry
    from eagle_trainer.config import DraftConfig, OptimConfig, ParallelConfig, TargetConfig, TrainConfig
    from eagle_trainer.data.dataset import batches
    from eagle_trainer.data.vocab import build_vocab_map, draft_ids_from_d2t
    from eagle_trainer.flops import TargetFlops, peak_tflops, step_flops
    from eagle_trainer.parallel import init_parallel, whole
    from eagle_trainer.targets.frozen import FrozenTarget
    from eagle_trainer.targets.loading import load_target
    from eagle_trainer.app.runtime import pick_device
    from eagle_trainer.targets.sharded import load_sharded_target, peak_rss_gib
    from eagle_trainer.trainer import Trainer

    device = pick_device("cuda")  # this rank's GPU, made current
    world = int(os.environ.get("WORLD_SIZE", 1))
    dims = init_parallel(ParallelConfig(target="fsdp" if world > 1 else "replicate", ep=args.ep,
                                        ep_chunks=args.ep_chunks, prefetch_blocks=args.prefetch_blocks), device)
    target_cfg = TargetConfig(path=str(args.ckpt), moe_impl="triton", norm_impl="triton")
    start = time.perf_counter()
    if dims.distributed:
        model, _, spec, info, report = load_sharded_target(target_cfg, device, dims)
    else:
        model, _, spec, info = load_target(target_cfg, device)
        torch.cuda.synchronize()
        held = sum(p.nbytes for p in model.parameters()) / 2**30
        report = {"load_s": time.perf_counter() - start, "held_gib": held, "peak_rss_gib": peak_rss_gib()}
    dataset = synthetic_dataset(args.steps * world, args.seq, info.vocab_size)
    d2t, t2d = build_vocab_map(dataset, info.vocab_size, VD)
    aux = spec.aux_layers(info.num_layers)  # [1, 23, 44] at 48 layers
    target = FrozenTarget(model, spec, aux, draft_ids_from_d2t(d2t), t2d)
    draft_spec = registry.resolve(info.architecture, "eagle3")
    torch.manual_seed(1)
    draft_cfg = DraftConfig(draft_vocab_size=VD)
    draft = draft_spec.algorithm.build_draft(info, draft_cfg, aux).to(device)
    draft.set_target_weights(whole(target.input_embedding()), share=True)
    draft.set_vocab_map(d2t, t2d)
    run_dir = args.out.parent / f"run_{args.out.stem}"
    train_cfg = TrainConfig(run_dir=str(run_dir), max_steps=args.steps, save_every=0, log_every=1, eval_batches=0,
                            progress=False)
    target_flops = TargetFlops.from_target(info, model.config)

    def train_batches(epoch, begin):
        return batches(dataset, 1, seed=0, epoch=epoch, shuffle=True, start=begin, rank=dims.rank, world_size=world)

    trainer = Trainer(draft_spec, target, draft, draft_cfg, OptimConfig(warmup_steps=2), train_cfg, train_batches, [],
                      device, parallel=dims,
                      flops=lambda lengths: step_flops(target_flops, draft.config, lengths, draft_cfg.ttt_steps,
                                                       draft_cfg.mask_teacher_argmax),
                      peak_tflops=peak_tflops(torch.cuda.get_device_name(device)))
    if args.profile:  # the whole run under the profiler: where the GPU time of a step goes, rank 0
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            trainer.fit()
        if dims.rank == 0:
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
            args.out.with_suffix(".profile.txt").write_text(table)
    else:
        trainer.fit()
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30, report["load_s"], report["peak_rss_gib"],
                         report["held_gib"]], device=device)
    if dims.distributed:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    if dims.rank == 0:
        records = [r for r in trainer.metrics.records if r.get("split") == "train"]
        per_step = sorted(records[WARMUP_STEPS:], key=lambda r: r["tokens_per_s"])
        mid = per_step[len(per_step) // 2]
        out = {"gpus": world, "ep": dims.ep, "tokens_per_s_per_gpu": mid["tokens_per_s"], "mfu": mid.get("mfu"),
               "peak_gib": peak[0].item(), "load_s": peak[1].item(), "peak_rss_gib": peak[2].item(),
               "held_gib": peak[3].item(), "losses": [r["loss"] for r in records]}
        args.out.write_text(json.dumps(out))
    if dims.distributed:
        torch.distributed.destroy_process_group()


def launch(gpus: int, ep: int, chunks: int, prefetch: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", __file__, "--worker",
           f"--ep={ep}", f"--ep-chunks={chunks}", f"--prefetch-blocks={prefetch}", f"--ckpt={args.ckpt}",
           f"--seq={args.seq}", f"--steps={args.steps}", f"--out={out}",
           *(["--profile"] if args.profile else [])]
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    print(f"{gpus} GPU(s), ep={ep}, ep_chunks={chunks}, prefetch_blocks={prefetch}: exit {done.returncode} after "
          f"{time.perf_counter() - t0:.0f} s; log {log}", flush=True)
    if done.returncode != 0:
        print(log.read_text()[-4000:], flush=True)
        return {}
    return json.loads(out.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["1:1", "2:2", "2:1"],
                        help="GPUS:EP[:CHUNKS[:PREFETCH]] per job (parallel.ep_chunks, parallel.prefetch_blocks; "
                        "default 1 each)")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_train_parallel"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--ep-chunks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prefetch-blocks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="each job under torch.profiler: "
                        "<work>/gpusN_epE.profile.txt (the timings are then not a result)")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.steps <= WARMUP_STEPS + 1:
        raise ValueError(f"--steps {args.steps} leaves too few timed steps after {WARMUP_STEPS} warm-up steps")
    args.ckpt = args.work / f"target_{args.layers}L"
    if not (args.ckpt / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        build_checkpoint(args.ckpt, args.layers)
        print(f"checkpoint: {args.layers} layers written in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {}
    for spec in args.runs:
        gpus, ep, chunks, prefetch = (list(map(int, spec.split(":"))) + [1, 1])[:4]
        results[(gpus, ep, chunks, prefetch)] = launch(gpus, ep, chunks, prefetch, args,
                                                       args.work / f"gpus{gpus}_ep{ep}_c{chunks}_p{prefetch}.json")
    base = results.get((1, 1, 1, 1))
    case = f"online EAGLE-3, Qwen3-30B-A3B-shaped target {args.layers}L, B=1 T={args.seq} per GPU"
    lines, rows = [], []
    for (gpus, ep, chunks, prefetch), res in results.items():
        if not res:
            lines.append(f"| {gpus} | {ep} | {chunks} | {prefetch} | failed |")
            continue
        eff = res["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else None
        lines.append(f"| {gpus} | {ep} | {chunks} | {prefetch} | {res['tokens_per_s_per_gpu']:,.0f} | "
                     f"{eff if eff else float('nan'):.3f} | {res['peak_gib']:.1f} | {res['held_gib']:.1f} | "
                     f"{res['load_s']:.0f} | {res['peak_rss_gib']:.1f} |")
        if gpus == 1 or base is None:
            continue
        mode = (f"FSDP2 + EP={ep}" + (f", {chunks} chunks a layer" if chunks > 1 else "")) if ep > 1 else \
            "FSDP2 only (EP=1)"
        mode += f", prefetch {prefetch} blocks ahead" if prefetch > 1 else ""
        rows.append(row(
            f"{case}, {gpus} GPUs {mode}: tokens/s per GPU (peak GPU mem {res['peak_gib']:.1f} GiB, weights held "
            f"{res['held_gib']:.1f} GiB/rank, load {res['load_s']:.0f} s, peak host RSS {res['peak_rss_gib']:.1f} "
            f"GiB/rank; ratio = weak-scaling efficiency)",
            f"{res['tokens_per_s_per_gpu']:,.0f} tok/s/GPU", f"{base['tokens_per_s_per_gpu']:,.0f} tok/s "
            f"(peak {base['peak_gib']:.1f} GiB, load {base['load_s']:.0f} s)", "eagle_trainer on 1 GPU, unsharded",
            eff))
    print("\n| GPUs | EP | chunks | prefetch | tok/s/GPU | vs 1 GPU | peak GPU GiB | weights GiB/rank | load s | "
          "peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    note = ("`python benchmarks/train_parallel.py`: the whole training step (sharded target forward, teacher, draft "
            "forward/backward under DDP, AdamW), each configuration a torchrun job; peer = the same job on 1 GPU.")
    if rows and not args.profile:
        append_rows("train_parallel", rows, note, args.results)
        print("".join(rows))


if __name__ == "__main__":
    main()

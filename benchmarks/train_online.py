"""End-to-end online EAGLE-3 training on one GPU: tokens/s, MFU and peak memory, ours vs the configuration a user
of an HF-based trainer gets, in the same trainer, on the same data, in the same process.

Targets (`--arch`), random bf16 weights N(0, 0.02), saved as an HF checkpoint and loaded back with `load_target`
(sdpa attention):
- qwen3_30b_a3b: Qwen3MoeForCausalLM of tests/fixtures/qwen3_30b_a3b_config.json (H 2048, 32 heads, 4 KV heads, 128
  experts of width 768, top-8, V 151936) cut to `--layers` layers;
- qwen3_next: Qwen3NextForCausalLM of tests/fixtures/qwen3_next_80b_a3b_config.json (48 layers: 3 gated delta net to
  1 gated full attention, top-10 of 512 experts of width 512 plus the gated shared expert, V 151936) at `--layers`
  and `--experts` routed experts a layer (the full 512 x 48 do not fit one GPU: 160 GB of experts in bf16); HF's own
  init is kept for the GDN's A_log and dt_bias and the (zero-centred, gated) RMSNorm weights, so decays and norm
  scales are realistic.
Aux layers: 0,1,2 of a 4-layer target, else the registry's default ([1, L/2-1, L-4]). Draft: the EAGLE-3 draft
train.py builds for it (one layer, H 2048, Vd 32000, K 7). Data: sequences of T random target ids, the second half
of each trained; `--pack N` packs N of them into one row of N*T tokens a step (data.pack: position_ids and the GDN
state restart per sequence), else B=1. The vocab map is built from them (train.py's way).

Sides (the loaded model is rebound between them with the target entry's bind function, as load_target does):
- ours: `target.moe_impl=triton` (our batch-invariant MoE core), `norm_impl=triton` (fused RMSNorm), Qwen3-Next:
  `gdn_impl=triton` (our GDN core) and `attn_layer_impl=triton` (q/k norm + RoPE and the output gate fused);
  `draft.attention=fused` (FlashAttention-2 step-0 block + the Triton merge);
- peer: `target.moe_impl=grouped_mm` (HF transformers' own grouped_mm experts), `norm_impl=hf`, Qwen3-Next:
  `gdn_impl=hf` (HF's linear attention, which calls flash-linear-attention's kernels when fla is importable: carry it)
  and `attn_layer_impl=hf`,
  `draft.attention=naive` (the [T, T] score matrices of every TTT step, as HF-attention-based TTT does). HF's GDN
  cannot reset its state at packed document starts, so with --pack the peer runs B=1 rows of N*T tokens of one
  document each instead (the same tokens a step; said in the row);
- hf_target: the peer's target kernels with our fused TTT attention (the naive one's [T, T] scores do not fit a
  16k-token row beside a full-depth target): the target's share of the difference alone.
Everything else (fused lm_head + soft CE, AdamW, the loop with its per-step loss read and logging) is shared.

Tokens/s: the median of the per-step windows after --warmup steps (default 5; each window spans data, the target's
forward, the draft's forward and backward, clipping and AdamW). MFU: the trainer's own FLOP counter
(eagle_trainer/flops.py: target forward with teacher, 3 x the draft's unroll) over the same windows, against the bf16
dense peak. Peak memory: torch.cuda.max_memory_allocated over each side's run, target weights included. Both sides
start from one draft init and one batch order: without --pack their step losses must agree to bf16 precision
(checked).
SDPA's backends are eagle-train's (app/runtime.py `sdpa_without_cudnn`: cuDNN out of torch's order). As in
eagle-train, the draft's step 0 runs on cuDNN once its layout came 32 times (kernels/utils.RepeatedShapes; head dims
up to 128, and 256 on Hopper) unless EAGLE_CUDNN_SDPA=0 is set; EAGLE_CUDNN_SDPA=repeated also moves the target's
unpacked attention layers (Qwen3-Next, bound) so, and =1 also keeps torch's order (cuDNN first on Hopper). With the
target's switch on, its forward is run 33 times before it is timed alone; the draft's step 0 switches at step 33:
`--steps 48 --warmup 36` times the steady state of a run whose rows have one length.

    python benchmarks/train_online.py [--seqs 4096] [--steps 20] [--sides ours,peer] [--layers 4]
    python benchmarks/train_online.py --arch qwen3_next --layers 48 --experts 128 --seqs 4096 [--pack 1 4] \
        [--steps 48 --warmup 36]
With --profile, ours' target forward + teacher is also profiled (kernel families, kernel table, device time by
launch site, idle stretches, the lines that make the host wait for the GPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from profile_draft import idle_gaps, kernel_families, kernel_sites, trace_steps  # noqa: E402
from offline import WARMUP_STEPS, save_random_checkpoint, synthetic_dataset, train  # noqa: E402
from results import RESULTS, append_rows, row  # noqa: E402

from eagle_trainer.app.runtime import sdpa_without_cudnn  # noqa: E402
from eagle_trainer.config import DraftConfig, TargetConfig  # noqa: E402
from eagle_trainer.data.dataset import batches  # noqa: E402
from eagle_trainer.data.vocab import build_vocab_map, draft_ids_from_d2t  # noqa: E402
from eagle_trainer.flops import TargetFlops  # noqa: E402
from eagle_trainer.kernels.utils import RepeatedShapes, cudnn_sdpa_on  # noqa: E402
from eagle_trainer.targets.frozen import FrozenTarget  # noqa: E402
from eagle_trainer.targets.loading import load_target  # noqa: E402
from eagle_trainer.targets.packed_attention import bind_packed_attention  # noqa: E402

FIXTURES = Path(__file__).parents[1] / "tests/fixtures"
ARCHS = {  # --arch -> (fixture config, HF config class, architecture, name in the rows)
    "qwen3_30b_a3b": ("qwen3_30b_a3b_config.json", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3-30B-A3B"),
    "qwen3_next": ("qwen3_next_80b_a3b_config.json", "Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3-Next-80B-A3B"),
}
VD = 32000
HF_TARGET = {"moe_impl": "grouped_mm", "norm_impl": "hf", "gdn_impl": "hf", "attn_layer_impl": "hf",
             "packed_attention": "hf"}
SIDES = {  # side -> (target config fields, draft attention)
    "ours": ({"moe_impl": "triton", "norm_impl": "triton", "gdn_impl": "triton", "attn_layer_impl": "triton",
              "packed_attention": "flex"}, "fused"),
    "peer": (HF_TARGET, "naive"),
    "hf_target": (HF_TARGET, "fused"),
}
PEER_NAMES = {  # side -> (name on a Qwen3-MoE target, name on a Qwen3-Next one)
    "peer": ("same trainer, HF grouped_mm experts + HF RMSNorm + naive TTT attention",
             "same trainer, HF grouped_mm experts + HF RMSNorm + HF GDN (fla kernels) + naive TTT attention"),
    "hf_target": ("same trainer, HF grouped_mm experts + HF RMSNorm, our fused TTT attention",
                  "same trainer, HF grouped_mm experts + HF RMSNorm + HF GDN (fla kernels), our fused TTT attention"),
}
TARGET_FAMILIES = (  # --profile: the target forward's kernels by family (ours named for their Triton kernels)
    ("MoE experts (ours)", ("moe_gate_up", "moe_down", "moe_sum", "moe_shared")),
    ("MoE routing (ours)", ("moe_route", "moe_count", "moe_align")),
    ("GDN core (ours)", ("chunk_prepare", "chunk_recurrent", "causal_conv1d", "gdn_gating", "gated_rms_norm")),
    ("RMSNorm (ours)", ("rms_norm_fwd",)),
    ("attention glue (ours)", ("qk_norm_rope", "sigmoid_gate")),
    ("attention (flex/cuDNN/flash)", ("flex", "triton_tem", "sdpa", "flash", "fmha", "cudnn")),
    ("GEMM (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma")),
    ("argmax, reductions", ("argmax", "reduce_kernel")),
    ("elementwise (torch)", ("elementwise", "vectorized")),
    ("copy/memset", ("Memcpy", "Memset", "copy_kernel", "CatArray")),
)


def host_syncs(forward) -> str:
    """The places in one forward that make the host wait for the GPU (torch's sync debug mode), each as its three
    innermost frames of ours or of transformers: after each, the GPU idles until the host launches work again."""
    sites: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if any(c in f.filename for c in ("eagle_trainer", "transformers", "benchmarks"))]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        sites[where or f"{filename}:{lineno}"] += 1
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = [f"host syncs in one forward: {sum(sites.values())}"]
    lines += [f"  {n:4d} x  {site}" for site, n in sites.most_common()]
    return "\n".join(lines)


def profile_target(forward, rows: int = 25) -> str:
    """One target forward (with the teacher) under the profiler: device time by kernel family, the kernel table,
    device time by launch site, where the GPU waits on the host, and which lines make the host wait."""
    forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)
    trace = trace_steps(forward)  # one trace for both tables
    return "\n".join([kernel_families(prof, TARGET_FAMILIES), table, kernel_sites(trace, rows + 15),
                      idle_gaps(trace, rows // 2), host_syncs(forward)])


def build_checkpoint(path: Path, arch: str, layers: int, experts: int | None) -> None:
    import transformers
    fixture, config_class, architecture, _ = ARCHS[arch]
    fields = json.loads((FIXTURES / fixture).read_text())
    fields.update(num_hidden_layers=layers, max_position_embeddings=65536)
    if arch == "qwen3_30b_a3b":
        fields["max_window_layers"] = layers
    if experts is not None:
        fields["num_experts"] = experts
    config = getattr(transformers, config_class)(**{k: v for k, v in fields.items()
                                                   if k not in ("architectures", "model_type")})
    config.architectures = [architecture]
    keep = ("A_log", "dt_bias", "norm.weight", "layernorm.weight") if arch == "qwen3_next" else ()
    save_random_checkpoint(config, path, keep=keep)


def aux_layers(target_spec, layers: int) -> tuple[int, ...]:
    return (0, 1, 2) if layers == 4 else tuple(target_spec.aux_layers(layers))


def run_side(side: str, model, target_spec, info, dataset, d2t, t2d, steps: int, run_dir: Path,
             pack: int = 1, profile_forward: bool = False, warmup: int = WARMUP_STEPS) -> dict:
    fields, attention = SIDES[side]
    cfg = TargetConfig(path="", **fields)
    bind_packed_attention(model, cfg)
    target_spec.bind_kernels(model, cfg)
    aux = aux_layers(target_spec, info.num_layers)
    target = FrozenTarget(model, target_spec, aux, draft_ids_from_d2t(d2t), t2d)
    first = next(batches(dataset, pack, seed=0, epoch=0, shuffle=False, pack=pack > 1)).to("cuda")
    shapes = RepeatedShapes(part="target")
    for _ in range(shapes.after + 1 if shapes.enabled else 0):  # past the cuDNN switch (do_bench's warm-up is
        target.forward(first)                                    # 25 ms: one call at full depth)
    target_ms = do_bench(lambda: target.forward(first), warmup=25, rep=200, return_mode="median")
    if profile_forward:
        print(f"=== {side}: the target forward + teacher of one step\n{profile_target(lambda: target.forward(first))}",
              flush=True)
    first = None  # freed before the run, so its peak is the trainer's
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        tps, losses, records = train(target, dataset, steps, run_dir, info, d2t, t2d, offline=False,
                                     draft_cfg=DraftConfig(draft_vocab_size=VD, attention=attention), aux=aux,
                                     target_flops=TargetFlops.from_target(info, model.config), batch_size=pack,
                                     pack=pack > 1, warmup=warmup)
    except torch.OutOfMemoryError as e:
        message = str(e).splitlines()[0]
        print(f"{side}: out of memory: {message}", flush=True)
        return {"oom": message, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    finally:
        target.close()
    mfu = sorted(r["mfu"] for r in records[warmup:])
    result = {"tokens_per_s": tps, "mfu": mfu[len(mfu) // 2], "losses": losses,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    step_ms = pack * len(dataset[0]["input_ids"]) / tps * 1e3
    print(f"{side}: {tps:,.0f} tokens/s ({step_ms:.1f} ms a step, of which the target forward + teacher "
          f"{target_ms:.1f} ms), MFU {result['mfu']:.1%}, peak {result['peak_gib']:.2f} GiB, "
          f"losses {[round(x, 3) for x in losses[:4]]}", flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen3_30b_a3b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=None, help="routed experts a layer (default: the model's)")
    parser.add_argument("--pack", type=int, nargs="+", default=[1], help="sequences packed into one row a step "
                        "(ours; the peer gets one document of the same length on a Qwen3-Next target); several: each "
                        "in turn on the one loaded target")
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="steps left out of the median (past 32 "
                        "at one length the draft's step 0 runs on cuDNN: the steady state of a run whose rows have "
                        "that length)")
    parser.add_argument("--sides", default="ours,peer", help="comma-separated: ours first, then peers "
                        f"({', '.join(s for s in SIDES if s != 'ours')})")
    parser.add_argument("--profile", action="store_true", help="also profile ours' target forward + teacher")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_train_online"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sides = args.sides.split(",")
    if unknown := set(sides) - set(SIDES):
        raise ValueError(f"--sides has {sorted(unknown)}; known: {sorted(SIDES)}")
    if sides[0] != "ours":
        raise ValueError(f"--sides {args.sides}: 'ours' comes first (every other side is compared with it)")
    if args.steps <= args.warmup:
        raise ValueError(f"--steps {args.steps} leaves no timed step after the {args.warmup} warm-up steps")
    sdpa_without_cudnn()  # as eagle-train on a GPU
    print(f"SDPA: cuDNN {'on' if torch.backends.cuda.cudnn_sdp_enabled() else 'off'}", flush=True)
    ckpt = args.work / "target"
    t0 = time.perf_counter()
    built = ckpt / "config.json"
    shape = {"architectures": [ARCHS[args.arch][2]], "num_hidden_layers": args.layers}
    if args.experts is not None:
        shape["num_experts"] = args.experts
    if not (built.is_file() and json.loads(built.read_text()).items() >= shape.items()):
        shutil.rmtree(args.work, ignore_errors=True)
        build_checkpoint(ckpt, args.arch, args.layers, args.experts)  # else: an earlier run's checkpoint is reused
    model, _, target_spec, info = load_target(TargetConfig(path=str(ckpt)), torch.device("cuda"))
    print(f"target: {args.layers} layers, built and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    name = ARCHS[args.arch][3]
    for pack, seq in itertools.product(args.pack, args.seqs):
        dataset = synthetic_dataset(args.steps * pack, seq, info.vocab_size)
        d2t, t2d = build_vocab_map(dataset, info.vocab_size, VD)
        # HF's GDN cannot restart its state inside a row: its sides read one document of the packed row's length
        peer_whole = pack > 1 and args.arch == "qwen3_next"
        data = {side: (synthetic_dataset(args.steps, seq * pack, info.vocab_size), 1)
                if side != "ours" and peer_whole else (dataset, pack) for side in sides}
        for side in sides:
            shutil.rmtree(args.work / f"run_{side}_{pack}x{seq}", ignore_errors=True)
        res = {side: run_side(side, model, target_spec, info, data[side][0], d2t, t2d, args.steps,
                              args.work / f"run_{side}_{pack}x{seq}", pack=data[side][1],
                              profile_forward=args.profile and side == "ours", warmup=args.warmup) for side in sides}
        ours = res.get("ours")
        if ours is None or "oom" in ours:
            continue
        shape = (f"{pack} x T={seq} packed in one row" if pack > 1 else f"B=1 T={seq}")
        cudnn = ("SDPA with cuDNN" if torch.backends.cuda.cudnn_sdp_enabled() else
                 "cuDNN attention for layouts seen 32 times" if cudnn_sdpa_on("target") else
                 "cuDNN for the draft's step 0 once its layout came 32 times" if cudnn_sdpa_on("draft") else
                 "no cuDNN attention")
        experts = f", {args.experts} experts a layer" if args.experts else ""
        ours_cell = f"{ours['tokens_per_s']:,.0f} tok/s, MFU {ours['mfu']:.1%}"
        for side in sides[1:]:
            peer, peer_name = res[side], PEER_NAMES[side][args.arch == "qwen3_next"]
            case = (f"online EAGLE-3 training, {name}-shaped target {args.layers}L{experts} + draft, {shape}"
                    f"{f' ({side}: one document of that length)' if peer_whole else ''}, median step of "
                    f"{args.steps - args.warmup} after {args.warmup}, {cudnn}")
            if "oom" in peer:  # the peer cannot run this length on this GPU at all
                rows.append(row(f"{case}: tokens/s; peak GPU memory {ours['peak_gib']:.2f} GiB", ours_cell,
                                f"out of memory ({peer['oom'][:80]})", peer_name, None))
                continue
            agree = ""
            if not peer_whole:  # the same batches: the losses must agree
                n = min(len(ours["losses"]), len(peer["losses"]))
                diff = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"][:n], peer["losses"][:n]))
                print(f"T={seq}: max relative loss difference ({side}) {diff:.2g}", flush=True)
                if not diff < 2e-2:
                    raise AssertionError(f"T={seq}: ours and {side} losses differ by {diff:.3g} relative")
                agree = f" (losses agree within {diff:.1g})"
            print(f"T={seq}: ours / {side} {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x tokens/s", flush=True)
            rows += [
                row(f"{case}{agree}: tokens/s", ours_cell,
                    f"{peer['tokens_per_s']:,.0f} tok/s, MFU {peer['mfu']:.1%}", peer_name,
                    ours["tokens_per_s"] / peer["tokens_per_s"]),
                row(f"{case}: peak GPU memory, target weights included (ratio: peer / ours, > 1 = ours smaller)",
                    f"{ours['peak_gib']:.2f} GiB", f"{peer['peak_gib']:.2f} GiB", peer_name,
                    peer["peak_gib"] / ours["peak_gib"]),
            ]
    note = ("`python benchmarks/train_online.py`: the whole training step of `Trainer.fit` (target forward, teacher, "
            "draft forward/backward, AdamW), ours vs the same trainer with HF's grouped_mm experts, HF RMSNorm and "
            "the naive TTT attention. MFU by eagle_trainer/flops.py against the bf16 dense peak (H100: 989 TFLOP/s).")
    if rows:
        append_rows("train_online", rows, note, args.results)
        print("".join(rows))


if __name__ == "__main__":
    main()

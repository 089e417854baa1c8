"""Offline hidden states: dump time, bytes per token and read speed, ours vs SpecForge's offline format; then
training from the dump vs online training, in the same trainer, same data, same steps.

Target: a Qwen3-8B-shaped Qwen3ForCausalLM (H 4096, 32 heads, 8 KV heads, MLP 12288, V 151936) cut to
`--layers` layers (aux layers 1,2,3), random bf16 weights, saved as an HF checkpoint and loaded back with
`load_target`. Data: `--examples` sequences of `--seq` random ids, the second half of each trained.

Peers:
- storage and reading: SpecForge's offline format (its scripts/prepare_hidden_states.py): one `torch.save`
  file per example holding input_ids and loss_mask (int64 [T]), hidden_state [1, T, H] and aux_hidden_state
  [1, T, 3H] in the target dtype, read back with one `torch.load` per example as its OfflineEagle3Dataset does.
  Written here from the same captured tensors, so both sides pay the same target forward.
- training: this trainer online (the target runs every step) on the same examples.
Files are read right after being written (page cache warm for both formats).

    python benchmarks/offline.py [--layers 6] [--examples 32] [--seq 2048] [--steps 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, append_rows, row  # noqa: E402

from eagle_trainer import registry  # noqa: E402
from eagle_trainer.config import DraftConfig, OptimConfig, TargetConfig, TrainConfig  # noqa: E402
from eagle_trainer.data.dataset import FEATURES, batches  # noqa: E402
from eagle_trainer.data.dump import dump_hidden_states  # noqa: E402
from eagle_trainer.data.offline import OfflineStore, dump_manifest  # noqa: E402
from eagle_trainer.targets.tiny_tokenizer import save_tiny_tokenizer  # noqa: E402
from eagle_trainer.data.vocab import build_vocab_map, draft_ids_from_d2t  # noqa: E402
from eagle_trainer.flops import TargetFlops, peak_tflops, step_flops  # noqa: E402
from eagle_trainer.targets.frozen import FrozenTarget  # noqa: E402
from eagle_trainer.targets.loading import load_target  # noqa: E402
from eagle_trainer.targets.offline import OfflineTarget  # noqa: E402
from eagle_trainer.trainer import Trainer  # noqa: E402

AUX = (1, 2, 3)
WARMUP_STEPS = 5  # training steps left out of the median (flex attention compiles in the first)
VD = 32000


def build_checkpoint(path: Path, layers: int) -> None:
    from transformers import Qwen3Config
    config = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    config.architectures = ["Qwen3ForCausalLM"]
    save_random_checkpoint(config, path)


def save_random_checkpoint(config, path: Path, keep: tuple[str, ...] = ()) -> None:
    """An HF checkpoint of `config` with random bf16 weights N(0, 0.02) (parameters whose names end with one of `keep`
    keep HF's own init) and the tiny tokenizer, built on the GPU."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if not (keep and name.endswith(keep)):
            p.data.normal_(0, 0.02)
    model.save_pretrained(str(path))
    save_tiny_tokenizer(path, vocab_size=1024)
    del model
    torch.cuda.empty_cache()


def synthetic_dataset(examples: int, seq: int, vocab: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (examples, seq), generator=g)
    mask = torch.zeros(examples, seq, dtype=torch.bool)
    mask[:, seq // 2:] = True
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "loss_mask": mask.tolist()}, features=FEATURES)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@torch.no_grad()
def dump_specforge_format(target: FrozenTarget, dataset, out: Path) -> float:
    """SpecForge's layout, from our capture: seconds for capture + torch.save of every example."""
    out.mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(len(dataset)):
        batch = next(batches(dataset.select([i]), 1, seed=0, epoch=0, shuffle=False)).to("cuda")
        states = target.capture(batch, argmax=True)
        torch.save({"input_ids": batch.input_ids[0].cpu(), "loss_mask": batch.loss_mask[0].long().cpu(),
                    "hidden_state": states.final_hidden.cpu(), "aux_hidden_state": states.aux_hidden.cpu()},
                   out / f"data_{i}.ckpt")
    return time.perf_counter() - start


def read_ours(store: OfflineStore) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in store.batches(1, seed=0, epoch=0, shuffle=True, pin_memory=True):
        batch.to("cuda")
    torch.cuda.synchronize()
    return time.perf_counter() - start


def read_specforge_format(out: Path, n: int) -> float:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in order:
        data = torch.load(out / f"data_{i}.ckpt", weights_only=True)
        for t in data.values():
            t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def train(target, source, steps: int, run_dir: Path, info, d2t, t2d, offline: bool, draft_cfg: DraftConfig | None = None,
          aux: tuple[int, ...] = AUX, target_flops: TargetFlops | None = None, batch_size: int = 1, pack: bool = False,
          warmup: int = WARMUP_STEPS):
    """`steps` optimizer steps of the EAGLE-3 draft (`batch_size` sequences a step, packed into one row with `pack`),
    from a fixed init; -> (tokens/s: the median step after the first `warmup`, losses, train records). With
    `target_flops` (None: offline, no target forward) the records carry TFLOP/s and MFU as train.py logs them."""
    spec = registry.resolve(info.architecture, "eagle3")
    torch.manual_seed(1)
    draft_cfg = draft_cfg or DraftConfig(draft_vocab_size=VD)
    draft = spec.algorithm.build_draft(info, draft_cfg, aux).cuda()
    draft.set_target_weights(target.input_embedding(), share=True)  # as train.py
    draft.set_vocab_map(d2t, t2d)
    train_cfg = TrainConfig(run_dir=str(run_dir), max_steps=steps, save_every=0, log_every=1, eval_batches=0,
                            progress=False)

    def train_batches(epoch, start):
        if offline:
            return source.batches(batch_size, seed=0, epoch=epoch, shuffle=True, start=start, pin_memory=True,
                                  pack=pack)
        return batches(source, batch_size, seed=0, epoch=epoch, shuffle=True, start=start, pack=pack)

    def flops(lengths):
        return step_flops(target_flops, draft.config, lengths, draft_cfg.ttt_steps, draft_cfg.mask_teacher_argmax)

    trainer = Trainer(spec, target, draft, draft_cfg, OptimConfig(warmup_steps=2), train_cfg, train_batches, [],
                      torch.device("cuda"), flops=flops, peak_tflops=peak_tflops(torch.cuda.get_device_name()))
    trainer.fit()
    records = [r for r in trainer.metrics.records if r.get("split") == "train"]
    per_step = sorted(r["tokens_per_s"] for r in records[warmup:])  # each record is one step's window
    return per_step[len(per_step) // 2], [r["loss"] for r in records], records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_offline"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    ckpt = args.work / "target"
    t0 = time.perf_counter()
    build_checkpoint(ckpt, args.layers)
    model, _, target_spec, info = load_target(TargetConfig(path=str(ckpt)), torch.device("cuda"))
    print(f"target: {args.layers} layers, built and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    dataset = synthetic_dataset(args.examples, args.seq, 1024)
    tokens = args.examples * args.seq
    d2t, t2d = build_vocab_map(dataset, info.vocab_size, VD)
    target = FrozenTarget(model, target_spec, AUX, draft_ids_from_d2t(d2t), t2d)
    manifest = dump_manifest(ckpt, info.architecture, d2t, t2d, "synthetic")

    # warm-up: the first capture pays for cuBLAS/kernel selection; neither side's timing should
    dump_hidden_states(target, dataset.select(range(2)), args.work / "warmup", manifest=manifest, batch_size=1,
                       progress=False)
    results, rows = {}, []
    for compression in ("none", "fp8"):
        out = args.work / f"dump_{compression}"
        res = dump_hidden_states(target, dataset, out, manifest=manifest, batch_size=1, compression=compression,
                                 progress=False)
        results[compression] = res | {"read_s": read_ours(OfflineStore(out)), "dir_bytes": dir_bytes(out)}
        print(f"ours {compression}: dump {res['seconds']:.2f} s, {res['bytes_per_token']:.0f} B/token, "
              f"error {res['compression_error']}, read {results[compression]['read_s']:.2f} s", flush=True)
    sf_dir = args.work / "specforge_format"
    sf_dump = dump_specforge_format(target, dataset, sf_dir)
    sf_read = read_specforge_format(sf_dir, args.examples)
    sf_bytes = dir_bytes(sf_dir) / tokens
    print(f"specforge format: dump {sf_dump:.2f} s, {sf_bytes:.0f} B/token, read {sf_read:.2f} s", flush=True)

    online_tps, online_losses, _ = train(target, dataset, args.steps, args.work / "run_online", info, d2t, t2d, False)
    target.close()
    offline_target = OfflineTarget.from_checkpoint(ckpt, draft_ids_from_d2t(d2t), True, torch.device("cuda"),
                                                   torch.bfloat16)
    del model, target
    torch.cuda.empty_cache()
    offline = {}
    for compression in ("none", "fp8"):
        store = OfflineStore(args.work / f"dump_{compression}")
        offline[compression] = train(offline_target, store, args.steps, args.work / f"run_{compression}", info,
                                     d2t, t2d, True)[:2]
    diff = max(abs(a - b) for a, b in zip(online_losses, offline["none"][1]))
    diff8 = max(abs(a - b) / abs(a) for a, b in zip(online_losses, offline["fp8"][1]))
    print(f"train tokens/s: online {online_tps:.0f}, offline {offline['none'][0]:.0f}, offline fp8 "
          f"{offline['fp8'][0]:.0f}; max |loss diff| online vs offline {diff:.3g}, fp8 relative {diff8:.3g}")

    shape = f"Qwen3-8B-shaped {args.layers}L, {args.examples}x{args.seq} tok"
    sf_name = "SpecForge offline format (torch.save per example)"
    for compression in ("none", "fp8"):
        r = results[compression]
        label = "bf16" if compression == "none" else "fp8 aux + bf16 final"
        err = f", aux error {r['compression_error']['aux_hidden']:.4f}" if r["compression_error"] else ""
        rows += [
            row(f"dump {label}, {shape}: bytes/token on disk (lower is better{err})",
                f"{r['dir_bytes'] / tokens:.0f} B", f"{sf_bytes:.0f} B", sf_name, sf_bytes / (r["dir_bytes"] / tokens)),
            row(f"dump {label}, {shape}: capture + write, tokens/s", f"{tokens / r['seconds']:.0f}",
                f"{tokens / sf_dump:.0f}", sf_name, sf_dump / r["seconds"]),
            row(f"read {label} to GPU, shuffled, B=1, {shape}: tokens/s", f"{tokens / r['read_s']:.0f}",
                f"{tokens / sf_read:.0f}", sf_name + ", torch.load", sf_read / r["read_s"]),
        ]
    for compression, label, agree in (("none", "bf16", f"losses = online's, max diff {diff:.2g}"),
                                      ("fp8", "fp8 aux", f"losses within {diff8:.1g} relative of online's")):
        tps = offline[compression][0]
        rows.append(row(f"EAGLE-3 training from the {label} dump, B=1 T={args.seq}, median step of "
                        f"{args.steps - WARMUP_STEPS} ({agree}): tokens/s",
                        f"{tps:.0f}", f"{online_tps:.0f}", "same trainer online (target forward each step)",
                        tps / online_tps))
    note = ("`python benchmarks/offline.py`: ours = `eagle-data dump` format (sharded safetensors, mmap, prefetch "
            "thread). Ratio = peer time / our time (bytes: peer bytes / ours). The 6-layer target keeps the "
            "target forward small; with all of a real target's layers online training pays far more per step.")
    append_rows("offline", rows, note, args.results)
    print("".join(rows))


if __name__ == "__main__":
    main()

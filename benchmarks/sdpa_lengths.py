"""Attention at a new length every call: torch's SDPA with cuDNN out of its backends (what every eagle_trainer
command sets on a GPU, app/runtime.py `sdpa_without_cudnn`) vs torch's own order (cuDNN first on Hopper).

cuDNN attention builds an execution graph on the host for each new problem shape before its kernel runs; training
batches of their own length and speculative-decoding rounds against a growing KV cache make a new shape at nearly
every call. Model: the SmolLM2-135M-Instruct shape (the quality benchmark's target: Llama, 30 layers, H 576, 9/3
heads of 64), random weights, bf16, HF's sdpa attention. Each side runs in a process of its own (cuDNN's graph cache
lives in the process), on the same inputs:

    training stream   target forwards (no grad), B=1, --lengths distinct lengths in 64..1024 in a seeded order:
                      each one new to the process; then the same lengths again (shapes seen before)
    verification      prefill 200 ids, then --rounds forwards of 6 ids against the growing KV cache (a chain round
                      of eagle-eval: every KV length new)
    TTT step 0        the EAGLE-3 draft's step-0 attention as one training unroll calls it (7 forwards, then 7
                      backwards, 9/3 heads of 64) at --lengths other new lengths: ours kernels/ttt_attention's
                      step-0 kernel (Causal: FlashAttention-2; with EAGLE_CUDNN_SDPA=repeated cuDNN for a
                      shape that came in 32 earlier unrolls), the peer cuDNN's fused attention at every length
                      (CudnnCausal)

Times: wall time per call, the GPU synchronised after each (host work included: that is the point), mean over the
calls; tokens/s over the whole stream. Agreement: the last call's logits of both sides (bf16: ~1e-2).

    python benchmarks/sdpa_lengths.py [--lengths 48] [--rounds 64]
    python benchmarks/sdpa_lengths.py --device cpu --tiny      # dry run of the script (no cuDNN on the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, append_rows, row  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
               tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
            tie_word_embeddings=True)
PREFILL, ROUND = 200, 6
SIDES = {"ours": "cuDNN out of SDPA's backends (app/runtime.py sdpa_without_cudnn)",
         "peer": "torch's SDPA backend order (cuDNN first on sm90)"}


def step0_unroll(step0, q, k, v, dout, steps: int = 7):
    """What one EAGLE-3 training unroll asks of its step-0 attention at one length: `steps` forwards, then as many
    backwards (each handed its forward's out and lse) -> the last (out, dq)."""
    scale = q.shape[-1] ** -0.5
    saved = [step0.forward(q, k, v, scale) for _ in range(steps)]
    if dout.stride() != saved[0][0].stride():  # the libraries read dout in out's layout (as attention.py hands it)
        dout = torch.empty_like(saved[0][0]).copy_(dout)
    grads = [step0.backward(dout, q, k, v, out, lse, rest, scale) for out, lse, rest in saved]
    return saved[-1][0], grads[-1][0]


def timed(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def worker(args) -> None:
    """One side, in this process: the streams' per-call times to args.out (json), the last logits beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import DynamicCache

    from eagle_trainer.app.runtime import sdpa_without_cudnn
    from eagle_trainer.data.regenerate import cache_argument
    from eagle_trainer.kernels.ttt_attention import step0_kernel
    from eagle_trainer.kernels.ttt_attention.step0 import CudnnCausal

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.worker == "ours":
        sdpa_without_cudnn()
    config = LlamaConfig(**(TINY if args.tiny else SMOLLM2))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype).eval()
    rng = random.Random(0)
    lengths = rng.sample(range(64, 1025), args.lengths)
    ids = torch.randint(0, config.vocab_size, (1, 1024 + PREFILL + ROUND * args.rounds), generator=torch.Generator()
                        .manual_seed(1)).to(device)
    for t in (32, 48):  # warm-up: kernels loaded, allocator primed (lengths outside the stream)
        model(input_ids=ids[:, :t])
    first = [timed(device, lambda t=t: model(input_ids=ids[:, :t])) for t in lengths]
    again = [timed(device, lambda t=t: model(input_ids=ids[:, :t])) for t in lengths]
    cache = DynamicCache(config=config)
    kv = {cache_argument(model): cache}  # transformers 5.17 past_key_values, later `cache`
    model(input_ids=ids[:, :PREFILL], use_cache=True, **kv)
    rounds, out = [], None
    for r in range(args.rounds):
        chunk = ids[:, PREFILL + r * ROUND:PREFILL + (r + 1) * ROUND]

        def step(chunk=chunk):
            nonlocal out
            out = model(input_ids=chunk, use_cache=True, **kv).logits
        rounds.append(timed(device, step))
    torch.save(out.float().cpu(), args.out + ".logits")
    # on the CPU both sides run aten's CPU flash attention (a dry run of the stream)
    # ours: a step-0 kernel per unroll, as the trainer builds it (Causal: FlashAttention-2 at a length new to the
    # process, which every length here is); the peer: cuDNN's attention at every length
    peer = args.worker == "peer" and device.type == "cuda"
    step0_lengths = rng.sample(sorted(set(range(64, 1025)) - set(lengths)), args.lengths)  # new to cuDNN too
    unrolls, last = [], None
    for t in [48] + step0_lengths:  # the first a warm-up
        gen = torch.Generator(device).manual_seed(t)
        q, dout = (torch.randn(1, t, 9, 64, device=device, dtype=dtype, generator=gen).transpose(1, 2)
                   for _ in range(2))  # [B, nh, T, D] strided as the draft makes them
        k, v = (torch.randn(1, t, 3, 64, device=device, dtype=dtype, generator=gen).transpose(1, 2)
                for _ in range(2))

        def unroll(q=q, k=k, v=v, dout=dout):
            nonlocal last
            last = step0_unroll(CudnnCausal() if peer else step0_kernel(device), q, k, v, dout)
        unrolls.append(timed(device, unroll))
    torch.save([x.float().cpu() for x in last], args.out + ".step0")
    Path(args.out).write_text(json.dumps({"first": first, "again": again, "rounds": rounds, "lengths": lengths,
                                          "step0": unrolls[1:], "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled()}))


def run_side(side: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, f"{side}.json")
    cmd = [sys.executable, __file__, "--worker", side, "--out", out, "--device", args.device,
           "--lengths", str(args.lengths), "--rounds", str(args.rounds)] + (["--tiny"] if args.tiny else [])
    subprocess.run(cmd, check=True)
    result = json.loads(Path(out).read_text())
    result["logits"] = torch.load(out + ".logits")
    result["step0_last"] = torch.load(out + ".step0")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a dry run of the script)")
    parser.add_argument("--lengths", type=int, default=48, help="distinct training lengths in 64..1024")
    parser.add_argument("--rounds", type=int, default=64, help="verification rounds of 6 ids")
    parser.add_argument("--results", type=Path, default=None, help=f"RESULTS.md to append to (default {RESULTS.name})")
    parser.add_argument("--worker", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        ours, peer = run_side("ours", args, tmp), run_side("peer", args, tmp)
    assert not ours["cudnn_sdp"], "our side kept cuDNN in SDPA's backends"
    diff = (ours["logits"] - peer["logits"]).abs().max().item()
    scale = peer["logits"].abs().max().item()
    assert diff <= 2e-2 * max(scale, 1.0), f"the sides disagree: max |diff| {diff:.3g} (max |logit| {scale:.3g})"
    mean = lambda xs: 1e3 * sum(xs) / len(xs)  # noqa: E731
    tokens = sum(ours["lengths"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    shape = "tiny Llama (dry run)" if args.tiny else "SmolLM2-135M shape (30 layers, H 576, 9/3 heads), bf16"
    peer_name = "torch SDPA default order" + ("" if args.tiny else f" (torch {torch.__version__}, cuDNN first on sm90)")
    rows = []
    for name, key, what in (
            (f"target forward, B=1, {args.lengths} distinct lengths 64..1024 each new to the process ({tokens} "
             "tokens): ms per forward, mean (tokens/s in the cells)", "first", tokens),
            (f"target forward, B=1, the same {args.lengths} lengths again (shapes seen before): ms per forward, mean "
             "(tokens/s)", "again", tokens),
            (f"verification: {args.rounds} rounds of {ROUND} ids against a KV cache growing from {PREFILL}: ms per "
             "round, mean (tokens/s)", "rounds", ROUND * args.rounds)):
        o, p = mean(ours[key]), mean(peer[key])
        cell = lambda ms, xs: f"{ms:.2f} ms ({what / sum(xs):,.0f} tok/s)"  # noqa: E731
        rows.append(row(f"{shape}; {name}; last logits agree to {diff:.2g}", cell(o, ours[key]), cell(p, peer[key]),
                        peer_name, p / o))
    step0_diff = max((a - b).abs().max().item() / max(b.abs().max().item(), 1.0)
                     for a, b in zip(ours["step0_last"], peer["step0_last"]))
    assert step0_diff <= 2e-2, f"the step-0 attentions disagree: out/dq max |diff| {step0_diff:.3g} (relative)"
    o, p = mean(ours["step0"]), mean(peer["step0"])
    cudnn = "cuDNN fused attention (the torch op, as step0.py called it before)"
    rows.append(row(f"{shape}; the EAGLE-3 draft's TTT step-0 attention, one training unroll at a length (7 forwards, "
                    f"then 7 backwards; 9/3 heads of 64) at {args.lengths} other new lengths 64..1024: ms per unroll, "
                    "mean; ours kernels/ttt_attention step0_kernel (FlashCausal, FlashAttention-2, on a GPU); last out "
                    f"and dq agree to {step0_diff:.2g} (relative)", f"{o:.2f} ms", f"{p:.2f} ms",
                    cudnn if args.device == "cuda" else "aten CPU flash attention (dry run)", p / o))
    for line in rows:
        print(line.rstrip())
    if device != "cpu" or args.results:
        note = ("SDPA at a new shape every call, `benchmarks/sdpa_lengths.py`: ours = torch SDPA with cuDNN out of "
                "its backends (every eagle_trainer command on a GPU, app/runtime.py), peer = torch's own order "
                "(cuDNN first on Hopper, which builds an execution graph per new shape on the host); each side in a "
                "process of its own, same inputs, the GPU synchronised after each call (host work counted). Ratio "
                "= peer time / ours (> 1: ours faster).")
        append_rows("sdpa_lengths", rows, note, args.results or RESULTS)


if __name__ == "__main__":
    main()

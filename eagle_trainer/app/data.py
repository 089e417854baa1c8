"""The `eagle-data` console script: build a vocab map, synthesize prompts, regenerate data, or dump target states.

    eagle-data vocab --tokenizer PATH --data FILE --draft-vocab-size N --out FILE
                     [--max-length N --thinking keep|strip --on-error raise|skip --cache-dir DIR
                      --target-vocab-size V --chat-template PATH --chat-template-kwargs JSON
                      --empty-think auto|mask|train]
    eagle-data regenerate --target PATH --data IN --out OUT [--batch-size --max-new-tokens --temperature
                          --top-p --seed --thinking --on-error --chat-template-kwargs JSON --chat-template PATH
                          --resume | --overwrite
                          --dtype --moe-impl --decode auto|eager|static|graph --trust-remote-code --device
                          --no-progress]
    torchrun --nproc-per-node N -m eagle_trainer.app.data regenerate ... parallel=fsdp_ep   # the target sharded
    eagle-data synthesize --target PATH --out OUT --num-prompts N [--max-attempts N --batch-size
                          --max-new-tokens --temperature --top-p --seed --min-chars N --dedup-jaccard T|off
                          --prefix TEXT --stop-token TOKEN --chat-template-kwargs JSON --chat-template PATH
                          --resume | --overwrite
                          --dtype --moe-impl --decode --trust-remote-code --device --no-progress]   # then regenerate
    eagle-data dump --target PATH --data FILE --vocab FILE --out DIR [--aux-layers 1,17,32 --max-length N
                    --thinking --on-error --chat-template PATH --chat-template-kwargs JSON --empty-think MODE
                    --cache-dir DIR --batch-size N --compress none|fp8
                    --dtype --moe-impl --device --trust-remote-code --no-progress --shard-size-mb N]
    torchrun --nproc-per-node N -m eagle_trainer.app.data dump ... parallel=fsdp_ep   # the target sharded; the
                                                                      # files are those one process writes

--target, --tokenizer and --data also take a Hugging Face Hub id (`Qwen/Qwen3-8B`, `org/chats@v2/train.jsonl`),
resolved into the Hugging Face cache first (app/hub.py; HF_HUB_OFFLINE=1: from the cache alone).
Every subcommand takes --plugin MODULE_OR_FILE (repeatable): user code that registers a target architecture, a
draft algorithm or an export format, loaded before the registry is used (app/plugins.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eagle_trainer.app import hub, plugins, runtime
from eagle_trainer.config import DataConfig


def _add_vocab_parser(sub) -> None:
    p = sub.add_parser("vocab", help="count loss tokens and write the draft vocab map (d2t, t2d)")
    p.add_argument("--tokenizer", required=True, help="target checkpoint or tokenizer directory, or its Hub id")
    p.add_argument("--data", required=True, help="chat JSONL, or a Hub data set id")
    p.add_argument("--draft-vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output .safetensors with tensors d2t and t2d")
    p.add_argument("--max-length", type=int, default=DataConfig.max_length)
    p.add_argument("--thinking", choices=["keep", "strip"], default=DataConfig.thinking)
    p.add_argument("--on-error", choices=["raise", "skip"], default=DataConfig.on_error)
    p.add_argument("--cache-dir", default=None, help="tokenisation cache (default: <dir of --out>/cache)")
    add_template_arguments(p)
    p.add_argument(
        "--target-vocab-size", type=int, default=None,
        help="V (default: vocab_size in the config.json beside the tokenizer, else the tokenizer's length)",
    )


def _add_regenerate_parser(sub) -> None:
    p = sub.add_parser("regenerate", help="replace assistant turns with the target's own generations")
    p.add_argument("--target", required=True,
                   help="HF checkpoint directory (config.json, weights, tokenizer) or Hub id (org/name[@revision])")
    p.add_argument("--data", required=True, help="input chat JSONL (user-only prompts allowed), or a Hub data set id")
    p.add_argument("--out", required=True, help="output chat JSONL (messages form)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thinking", choices=["keep", "strip"], default="keep", help="applied when reading the input")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help='keyword arguments of the chat template, e.g. \'{"enable_thinking": false}\' for Qwen3')
    p.add_argument("--chat-template", default=None, metavar="PATH",
                   help="a jinja chat template file to render the prompts with instead of the tokenizer's")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run after the last complete conversation of --out (same target, "
                        "data and settings, checked against <out>.regen.json)")
    p.add_argument("--overwrite", action="store_true", help="start an existing --out over")
    add_decoding_arguments(p)


def _add_dump_parser(sub) -> None:
    p = sub.add_parser("dump", help="run the target once over a data set and store its hidden states for "
                                    "offline training (data.offline_path)")
    p.add_argument("--target", required=True,
                   help="HF checkpoint directory (config.json, weights, tokenizer) or Hub id (org/name[@revision])")
    p.add_argument("--data", required=True, help="chat JSONL, or a Hub data set id")
    p.add_argument("--vocab", required=True, help="draft vocab map (d2t, t2d .safetensors) from `eagle-data vocab`")
    p.add_argument("--out", required=True, help="output directory of the dump")
    p.add_argument("--aux-layers", default=None,
                   help="comma list of 0-based decoder-layer outputs (default: the target's [1, L//2-1, L-4])")
    p.add_argument("--max-length", type=int, default=DataConfig.max_length)
    p.add_argument("--thinking", choices=["keep", "strip"], default=DataConfig.thinking)
    p.add_argument("--on-error", choices=["raise", "skip"], default=DataConfig.on_error)
    p.add_argument("--cache-dir", default=None, help="tokenisation cache (default: <parent of --out>/cache)")
    add_template_arguments(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compress", choices=["none", "fp8"], default="none",
                   help="fp8: float8_e4m3fn with a per-token scale (about half the bytes of bf16)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--moe-impl", choices=["auto", "triton", "hf", "grouped_mm"], default="auto",
                   help="MoE targets: auto (triton on GPU, hf on CPU) | triton | hf | grouped_mm")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--shard-size-mb", type=float, default=1024, help="shard files roll over at about this size")
    runtime.add_parallel_argument(p)


def _jaccard(text: str) -> float | None:
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a similarity in (0, 1] nor off")
    return value


def _add_synthesize_parser(sub) -> None:
    p = sub.add_parser("synthesize", help="write user prompts with the target itself (Magpie): it continues the "
                                          "user-turn prefix of its chat template; answer them with regenerate")
    p.add_argument("--target", required=True, help="HF checkpoint directory or Hub id of an instruct (chat) model")
    p.add_argument("--out", required=True, help="output chat JSONL, one user turn per line: --data of regenerate")
    p.add_argument("--num-prompts", type=int, required=True, help="unique prompts wanted")
    p.add_argument("--max-attempts", type=int, default=None,
                   help="samples drawn at most (default 4 x --num-prompts); reached first, the job warns with counts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="a prompt's length cap; one that reaches it unfinished is dropped, so keep it above most")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="1: the target's own distribution of user turns, whose variety is the point (> 0)")
    p.add_argument("--top-p", type=float, default=0.99,
                   help="0.99 cuts only the far tail of unlikely ids, where garbled text comes from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-chars", type=int, default=16, help="drop prompts shorter than this, whitespace stripped")
    p.add_argument("--dedup-jaccard", type=_jaccard, default=0.8, metavar="T|off",
                   help="drop a prompt whose word 3-gram set has Jaccard similarity >= T with a kept one's; off: "
                        "only exact duplicates (case and whitespace folded) are dropped")
    p.add_argument("--prefix", default=None,
                   help="the text the target continues (default: what its chat template renders before a user's "
                        "message, with the default system turn if it adds one); a newline in bash: $'...\\n'")
    p.add_argument("--stop-token", action="append", default=None, dest="stop_tokens", metavar="TOKEN",
                   help="a token that ends a prompt (repeatable; default: the template's end-of-turn token, e.g. "
                        "<|im_end|>); the tokenizer's eos always does")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of the chat template when the prefix is taken from it")
    p.add_argument("--chat-template", default=None, metavar="PATH",
                   help="a jinja chat template file to take the prefix from instead of the tokenizer's")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run after the last prompt of --out (same target and settings, "
                        "checked against <out>.synth.json); a larger --num-prompts extends it")
    p.add_argument("--overwrite", action="store_true", help="start an existing --out over")
    add_decoding_arguments(p)


def add_template_arguments(p: argparse.ArgumentParser) -> None:
    """How the commands that tokenise chat data (vocab, dump, eagle-eval) render it: data.chat_template,
    chat_template_kwargs and empty_think, which must be training's for the same loss tokens (and prompts)."""
    p.add_argument("--chat-template", default=None, metavar="PATH",
                   help="a jinja chat template file to render with instead of the tokenizer's (data.chat_template)")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help='keyword arguments of the chat template, e.g. \'{"enable_thinking": false}\' for Qwen3 '
                        "(data.chat_template_kwargs)")
    p.add_argument("--empty-think", choices=["auto", "mask", "train"], default=DataConfig.empty_think,
                   help="an empty think block before a reply: auto masks it when the generation prompt holds it "
                        "(data.empty_think)")


def template_options(args: argparse.Namespace) -> dict:
    """The DataConfig keys add_template_arguments sets."""
    return {"chat_template": args.chat_template, "empty_think": args.empty_think,
            "chat_template_kwargs": _chat_template_kwargs(args.chat_template_kwargs)}


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a command that decodes with the target (regenerate, synthesize): its dtype, kernels, decode
    loop, device, progress bar and parallel options."""
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--moe-impl", choices=["auto", "triton", "hf", "grouped_mm"], default="auto",
                   help="MoE targets: auto (triton on GPU, hf on CPU) | triton | hf | grouped_mm")
    p.add_argument("--decode", choices=["auto", "eager", "static", "graph"], default="auto",
                   help="auto: graph for a whole full-attention target on a GPU (3.3-3.7x HF generate measured on "
                        "H100/H200), else eager; eager: HF DynamicCache (any target, sharded too); static: a static KV "
                        "cache (full-attention targets); graph: static, the decode step replayed as a CUDA graph (a "
                        "whole target on a GPU)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")
    runtime.add_parallel_argument(p)


def _target_vocab_size(tokenizer_path: str, tokenizer) -> int:
    config_path = Path(tokenizer_path) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        vocab_size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
        if vocab_size is not None:
            return int(vocab_size)
    return len(tokenizer)


def run_vocab(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from eagle_trainer.data.dataset import build_dataset
    from eagle_trainer.data.vocab import count_loss_tokens, save_vocab_map, vocab_coverage, vocab_map_from_counts

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
    vocab_size = args.target_vocab_size or _target_vocab_size(args.tokenizer, tokenizer)
    cfg = DataConfig(
        path=args.data, max_length=args.max_length, thinking=args.thinking, on_error=args.on_error, shuffle=False,
        **template_options(args),
    )
    cache_dir = args.cache_dir or str(Path(args.out).resolve().parent / "cache")
    dataset, stats = build_dataset(cfg, tokenizer, cache_dir)
    counts = count_loss_tokens(dataset, vocab_size)
    d2t, t2d = vocab_map_from_counts(counts, args.draft_vocab_size)
    save_vocab_map(args.out, d2t, t2d)
    summary = {
        "distinct_loss_ids": int((counts > 0).sum()),
        "coverage": vocab_coverage(counts, t2d),
        "target_vocab_size": vocab_size,
        "draft_vocab_size": args.draft_vocab_size,
        "num_examples": stats["num_examples"],
        "num_loss_tokens": stats["num_loss_tokens"],
        "skipped": stats["skipped"],
        "dropped": stats["dropped"],
        "truncated": stats["truncated"],
    }
    print(
        f"{summary['distinct_loss_ids']} distinct loss-token ids; the draft vocab of {args.draft_vocab_size} "
        f"covers {summary['coverage']:.4f} of {stats['num_loss_tokens']} loss tokens; wrote {args.out}"
    )
    print(json.dumps(summary))
    return summary


def run_regenerate(args: argparse.Namespace) -> dict:
    """The regeneration job of app/regenerate.py: sharded over the ranks under torchrun with parallel=fsdp or
    fsdp_ep, else the whole target on each rank; resumable (--resume)."""
    from eagle_trainer.app.regenerate import RegenerateJob, regenerate_file
    from eagle_trainer.config import TargetConfig
    from eagle_trainer.data.sampling import Sampling

    pcfg = runtime.parallel_options(args.parallel)
    device = runtime.pick_device(args.device, "--device")
    job = RegenerateJob(
        # the same loader as training: safetensors only, trust_remote_code off unless asked for
        target=TargetConfig(path=args.target, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                            moe_impl=args.moe_impl),
        data=args.data, out=args.out, batch_size=args.batch_size,
        sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed),
        thinking=args.thinking, on_error=args.on_error,
        chat_template_kwargs=_chat_template_kwargs(args.chat_template_kwargs), chat_template=args.chat_template,
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, decode=args.decode,
    )
    return regenerate_file(job, pcfg, device)


def run_synthesize(args: argparse.Namespace) -> dict:
    """The synthesis job of app/synthesize.py: sharded over the ranks under torchrun with parallel=fsdp or fsdp_ep,
    else the whole target on each rank; resumable (--resume)."""
    from eagle_trainer.app.synthesize import SynthesizeJob, synthesize_file
    from eagle_trainer.config import TargetConfig
    from eagle_trainer.data.sampling import Sampling
    from eagle_trainer.data.synthesize import Synthesis

    pcfg = runtime.parallel_options(args.parallel)
    device = runtime.pick_device(args.device, "--device")
    job = SynthesizeJob(
        target=TargetConfig(path=args.target, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                            moe_impl=args.moe_impl),
        out=args.out,
        synthesis=Synthesis(
            num_prompts=args.num_prompts, max_attempts=args.max_attempts, min_chars=args.min_chars,
            dedup_jaccard=args.dedup_jaccard,
            sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)),
        prefix=args.prefix, stop_tokens=tuple(args.stop_tokens or ()),
        chat_template_kwargs=_chat_template_kwargs(args.chat_template_kwargs), chat_template=args.chat_template,
        batch_size=args.batch_size,
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, decode=args.decode,
    )
    return synthesize_file(job, pcfg, device)


def _chat_template_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--chat-template-kwargs={text!r} is not a JSON object; pass e.g. "
                         '\'{"enable_thinking": false}\'')
    return kwargs


def _parse_aux_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--aux-layers={text!r} is not a comma list of layer ids, e.g. 1,17,32") from None


DATA_STAT_KEYS = ("data_path", "num_conversations", "num_loss_tokens", "skipped", "truncated", "dropped")


def run_dump(args: argparse.Namespace) -> dict:
    """Tokenise the data, open the target as training does (sharded over the ranks under torchrun with
    parallel=fsdp or fsdp_ep, else whole) and dump every example; rank 0 alone writes, the files one process would
    (data/dump.py)."""
    from eagle_trainer.config import TargetConfig
    from eagle_trainer.data.dataset import build_dataset
    from eagle_trainer.data.dump import dump_hidden_states
    from eagle_trainer.data.offline import dump_manifest
    from eagle_trainer.data.vocab import draft_ids_from_d2t, load_vocab_map
    from eagle_trainer.parallel import check_experts, init_parallel
    from eagle_trainer.targets.frozen import FrozenTarget
    from eagle_trainer.targets.loading import load_tokenizer, target_fingerprint, target_info
    from eagle_trainer.targets.sharded import open_target, target_lock_step

    pcfg = runtime.parallel_options(args.parallel)
    device = runtime.pick_device(args.device, "--device")
    d2t, t2d = load_vocab_map(args.vocab)
    target_cfg = TargetConfig(path=args.target, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                              moe_impl=args.moe_impl)
    spec, info = target_info(target_cfg)  # config.json only: what is checked here is checked before any weight
    if t2d.numel() != info.vocab_size:
        raise ValueError(f"vocab map {args.vocab} is for a target vocab of {t2d.numel()} ids but {args.target} has "
                         f"vocab_size {info.vocab_size}; build the map for this target with `eagle-data vocab "
                         f"--tokenizer {args.target} ...`")
    aux_ids = _parse_aux_layers(args.aux_layers) if args.aux_layers else spec.aux_layers(info.num_layers)
    with runtime.process_group(device, pcfg.backend):
        dims = init_parallel(pcfg, device)  # parallel.ep against the world size
        check_experts(dims.ep, info.num_experts)
        data_cfg = DataConfig(path=args.data, max_length=args.max_length, thinking=args.thinking,
                              on_error=args.on_error, shuffle=False, **template_options(args))
        cache_dir = args.cache_dir or str(Path(args.out).resolve().parent / "cache")
        tokenizer = load_tokenizer(target_cfg, info)
        # one process tokenises into the cache; the others read it back
        dataset, stats = runtime.rank_zero_first(lambda: build_dataset(data_cfg, tokenizer, cache_dir), dims.rank,
                                                 dims.world_size)
        opened = open_target(target_cfg, device, dims, progress=not args.no_progress and dims.rank == 0)
        target = FrozenTarget(opened.model, opened.spec, aux_ids, draft_ids_from_d2t(d2t), t2d)
        manifest = dump_manifest(args.target, target_fingerprint(args.target), info.architecture, d2t, t2d,
                                 stats["fingerprint"])
        result = dump_hidden_states(
            target, dataset, args.out, manifest={**manifest, "data_stats": {k: stats[k] for k in DATA_STAT_KEYS}},
            batch_size=args.batch_size, compression=args.compress, rank=dims.rank, world_size=dims.world_size,
            lock_step=lambda: target_lock_step(opened.model, opened.spec),
            vocab_file=args.vocab,  # offline training reads the map from the dump unless data.vocab_path names one
            how_it_ran=opened.how_it_ran(), progress=not args.no_progress,
            shard_bytes=int(args.shard_size_mb * (1 << 20)), pad_id=runtime.pad_id(tokenizer),
        )
        target.close()
    if dims.rank == 0:
        error = ", ".join(f"{k} {v:.4f}" for k, v in result["compression_error"].items()) or "none (lossless)"
        print(f"dumped {result['num_examples']} examples, {result['num_tokens']} tokens, "
              f"{result['bytes_per_token']:.0f} bytes/token, compression error {error}; "
              f"{result['tokens_per_s']:.0f} tokens/s on {dims.world_size} rank(s), ep {dims.ep}, target "
              f"{'sharded' if opened.sharded else 'whole'}; wrote {args.out}")
    return result


@runtime.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eagle-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_vocab_parser(sub)
    _add_regenerate_parser(sub)
    _add_synthesize_parser(sub)
    _add_dump_parser(sub)
    for command_parser in sub.choices.values():  # after the subcommand, as its other options: `vocab --plugin X`
        plugins.add_plugin_argument(command_parser)
    args = parser.parse_args(argv)
    plugins.load_plugins(args.plugin)  # before anything looks up the registry (every rank under torchrun)
    # Hub ids to local paths, on every rank (from the shared cache), before anything is read
    hub.resolve_options(args, {"target": "target", "tokenizer": "tokenizer", "data": "data"})
    if args.command == "vocab":
        run_vocab(args)
    elif args.command == "regenerate":
        run_regenerate(args)
    elif args.command == "synthesize":
        run_synthesize(args)
    else:
        run_dump(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

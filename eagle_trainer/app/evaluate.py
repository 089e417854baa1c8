"""The `eagle-eval` console script: real acceptance length of a draft with its target, beside the simulated one.

    eagle-eval --target /models/Qwen3-8B --draft DIR --data chat.jsonl --out eval.json \
        [--mode chain tree] [--steps 5] [--topk 8 --depth 5 --total-tokens 31] [--num-prompts 32] [--max-new-tokens 128]
    torchrun --nproc-per-node 8 -m eagle_trainer.app.evaluate --target ... --draft ... --data ... --out ... \
        parallel=fsdp_ep        # the target sharded over 8 GPUs (FSDP2, experts split 8 ways), as training takes it

--draft is a trainer checkpoint (draft_config.json), a run directory (its newest checkpoint), or an export
directory in any engine format (`eagle-export --format sglang|vllm|eagle1-sglang|eagle1-vllm`). The draft takes
the target's embedding (and, for EAGLE-1/2, its lm_head). Prompts are the data's conversations up to their last
assistant turn, tokenised the way training tokenises them (give --chat-template, --chat-template-kwargs and
--empty-think as training's data.* keys were). eval.json holds, per decoding mode, the acceptance length overall and per prompt and the
histogram of tokens committed per target forward; beside it the simulated acceptance length from the
draft's per-step TTT accuracy on the same conversations. A PNG histogram is written next to eval.json.
--target, --draft and --data also take a Hugging Face Hub id (org/name[@revision], a data set's org/name/file.jsonl),
resolved into the Hugging Face cache first (app/hub.py); eval.json then names the local snapshots.
A target or draft kind registered by user code needs that code loaded: --plugin MODULE_OR_FILE (repeatable;
app/plugins.py), as for the run that trained the draft; a checkpoint or export never imports code itself.
Under torchrun the ranks share the prompts (evaluate/acceptance.py); eval.json's `run` records the world size, ep and
whether the target was sharded, and its numbers are those one process gives on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from eagle_trainer.app import hub, plugins, runtime
from eagle_trainer.app.data import add_template_arguments, template_options
from eagle_trainer.config import DataConfig, TargetConfig
from eagle_trainer.data import build_dataset
from eagle_trainer.data.regenerate import stop_token_ids
from eagle_trainer.evaluate.acceptance import measure_acceptance, plot_histogram, prompts_from_dataset
from eagle_trainer.evaluate.simulated import simulated_on
from eagle_trainer.evaluate.speculative import DecodeConfig
from eagle_trainer.export import read_draft, target_fingerprint_of
from eagle_trainer.parallel import init_parallel, whole
from eagle_trainer.targets.loading import target_fingerprint
from eagle_trainer.targets.sharded import open_target


@runtime.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eagle-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HF checkpoint directory or Hub id of the target")
    parser.add_argument("--draft", required=True, help="checkpoint, run or export directory or Hub id of the draft")
    parser.add_argument("--data", required=True, help="chat JSONL whose conversations give the prompts, or a Hub id")
    parser.add_argument("--out", required=True, help="eval.json to write (a .png histogram goes beside it)")
    parser.add_argument("--mode", nargs="+", choices=["chain", "tree"], default=["chain", "tree"])
    parser.add_argument("--steps", type=int, default=5, help="chain: draft tokens per round")
    parser.add_argument("--topk", type=int, default=8, help="tree: children per node, nodes expanded per depth")
    parser.add_argument("--depth", type=int, default=5, help="tree: draft depth")
    parser.add_argument("--total-tokens", type=int, default=31, help="tree: draft tokens verified per round")
    parser.add_argument("--verify", choices=["tree", "walk"], default="tree",
                        help="tree: one target forward checks every draft token; walk: one forward per accepted "
                             "token with the target's own cache (the reference: the same tokens, more forwards)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--any-target", action="store_true",
                        help="measure even if --target is not the target the draft records (a warning, not an error)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=4096, help="tokenised conversation length cap")
    add_template_arguments(parser)  # the prompts rendered as training rendered the data
    parser.add_argument("--ttt-steps", type=int, default=7, help="steps of the simulated acceptance (TTT accuracy)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="auto", help="target dtype: auto (bf16 on GPU) | float32 | bfloat16")
    parser.add_argument("--moe-impl", default="auto", help="MoE targets: auto | triton | hf | grouped_mm")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    plugins.add_plugin_argument(parser)
    runtime.add_parallel_argument(parser)
    args = parser.parse_args(argv)
    check_options(args)
    plugins.load_plugins(args.plugin)  # the target's and the draft's registry entries may come from one
    hub.resolve_options(args, {"target": "target", "draft": "draft", "data": "data"})  # every rank, Hub ids to paths

    pcfg = runtime.parallel_options(args.parallel)
    device = runtime.pick_device(args.device, "--device")
    draft = read_draft(args.draft)
    check_target(args.draft, args.target, any_target=args.any_target)
    with runtime.process_group(device, pcfg.backend):
        dims = init_parallel(pcfg, device)
        result, reports = evaluate(args, draft, dims, device)
    if dims.rank != 0:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot = plot_histogram(list(reports.values()), out.with_suffix(".png"))
    for mode, rep in reports.items():
        print(f"{mode:5s} acceptance length {rep['accept_len']:.3f} over {rep['num_rounds']} rounds "
              f"({rep['num_prompts']} prompts, {rep['new_tokens']} tokens)")
    print(f"simulated acceptance length ({args.ttt_steps} TTT steps): {result['simulated']['sim_accept_len']:.3f}")
    run = result["run"]
    print(f"measured on {run['world_size']} rank(s), ep {run['ep']}, target {'sharded' if run['sharded'] else 'whole'}"
          f"; wrote {out} and {plot}")
    return 0


def evaluate(args: argparse.Namespace, draft, dims, device) -> tuple[dict, dict]:
    """Every rank: the target (sharded over the ranks, or whole), the draft beside it, the simulated and the real
    acceptance; -> (eval.json's contents, the reports per mode)."""
    opened = open_target(TargetConfig(path=args.target, dtype=args.dtype, moe_impl=args.moe_impl), device, dims,
                         progress=args.progress and dims.rank == 0)
    model, tokenizer, spec, info = opened.model, opened.tokenizer, opened.spec, opened.info
    draft.to(device)
    hidden = getattr(draft.config, "target_hidden_size", draft.config.hidden_size)
    if draft.config.vocab_size != info.vocab_size or hidden != info.hidden_size:
        raise ValueError(f"draft {args.draft} was trained for vocab {draft.config.vocab_size} / hidden "
                         f"{hidden}, but target {args.target} has {info.vocab_size} / "
                         f"{info.hidden_size}: pass the target the draft was trained on")
    draft.set_target_weights(whole(model.get_input_embeddings().weight), whole(model.get_output_embeddings().weight))
    with tempfile.TemporaryDirectory() as cache:
        dataset, _ = build_dataset(DataConfig(path=args.data, max_length=args.max_length, **template_options(args)),
                                   tokenizer, Path(cache))
        dataset = dataset.select(range(min(args.num_prompts, len(dataset))))
        prompts = prompts_from_dataset(dataset, args.num_prompts)
        # every rank runs the same batches (the same collective forwards of a sharded target) and gets the same result
        simulated = simulated_on(model, info.architecture, draft, dataset, args.ttt_steps, 4,
                                 runtime.pad_id(tokenizer), device)
    stop_ids = tuple(stop_token_ids(tokenizer))
    reports = {}
    for mode in args.mode:
        cfg = DecodeConfig(mode=mode, steps=args.steps, topk=args.topk, depth=args.depth,
                           total_tokens=args.total_tokens, max_new_tokens=args.max_new_tokens, verify=args.verify)
        reports[mode] = measure_acceptance(model, spec, draft, prompts, cfg, stop_ids,
                                           progress=args.progress and dims.rank == 0)
    result = {"target": args.target, "draft": args.draft, "data": args.data, "modes": reports,
              "simulated": simulated, "run": opened.how_it_ran()}
    return result, reports


# the least value of each count option (--max-length: a prompt token and a trained one)
LEAST = {"num_prompts": 1, "max_new_tokens": 1, "ttt_steps": 1, "max_length": 2, "steps": 1, "topk": 1, "depth": 1,
         "total_tokens": 1}


def check_options(args: argparse.Namespace) -> None:
    for name, least in LEAST.items():
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range; it must be at "
                             f"least {least}")


def check_target(draft_path: str, target_path: str, any_target: bool = False) -> None:
    """Refuse a target other than the one the draft records it was trained on (warn with `any_target`, e.g. for the
    same model re-saved in another dtype); warn where it records none."""
    recorded, given = target_fingerprint_of(draft_path), target_fingerprint(target_path)
    if recorded is None:
        print(f"warning: draft {draft_path} records no target fingerprint, so --target {target_path} cannot be "
              "checked against the target it was trained on", file=sys.stderr)
    elif recorded != given:
        message = (f"draft {draft_path} was trained on a target with fingerprint {recorded[:12]}, but --target "
                   f"{target_path} has {given[:12]} (its config.json or weight files differ)")
        if not any_target:
            raise ValueError(f"{message}; pass the target the draft was trained on, or --any-target to measure it "
                             "anyway (e.g. the same model saved in another dtype)")
        print(f"warning: {message}; measuring anyway (--any-target)", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())

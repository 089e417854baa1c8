"""The `eagle-export` console script: write a trained draft in a serving engine's format.

    eagle-export --checkpoint DIR --format {sglang,vllm,eagle1-sglang,eagle1-vllm} --out DIR
                 [--dtype bfloat16|float32] [--overwrite] [--verifier TARGET]

EAGLE-3 drafts: --format sglang writes the plain LlamaForCausalLMEagle3 draft (SGLang; vLLM loads it too), vllm
the speculators format (vLLM's native Eagle3Speculator); export/sglang.py and export/vllm.py say what each holds.
EAGLE-1/2 drafts: --format eagle1-sglang writes SGLang's LlamaForCausalLMEagle, eagle1-vllm vLLM's
EagleLlamaForCausalLM (a draft trained with draft.fc_bias=true is refused: vLLM's fc has no bias); export/eagle1.py
says what each holds. A checkpoint of the other draft kind is refused, naming its formats.

--checkpoint is either
  - a trainer checkpoint directory: it holds draft_config.json and draft.safetensors (drafts/io.py), or
  - a run directory: its checkpoints/ subdirectory holds step_<N> checkpoint directories, and the one with
    the highest N is exported (checkpoint.resolve_checkpoint), or
  - the Hugging Face Hub id of either (org/name[@revision][/folder]), fetched into the Hugging Face cache (app/hub.py).
--out must not exist (unless --overwrite); it appears only once fully written.
--plugin MODULE_OR_FILE (repeatable) loads user code that registers a draft algorithm or an export format
(app/plugins.py); a checkpoint never imports code itself.
--verifier (vllm only) is the target model's path or hub id, written as the verifier so that `vllm serve OUT`
finds the target; the checkpoint holds the target's architecture but not its path.
"""

from __future__ import annotations

import argparse

import torch

from eagle_trainer import registry
from eagle_trainer.app import hub, plugins, runtime
from eagle_trainer.checkpoint import resolve_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@runtime.command
def main(argv: list[str] | None = None) -> int:
    # the plugins first: one may register a draft algorithm or an export format, which --format's choices list
    early = argparse.ArgumentParser(add_help=False)
    plugins.add_plugin_argument(early)
    plugins.load_plugins(early.parse_known_args(argv)[0].plugin)
    formats = registry.export_formats()
    parser = argparse.ArgumentParser(prog="eagle-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory, or run directory (newest step), or the Hub id of either")
    parser.add_argument("--format", required=True, choices=sorted(formats))
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--verifier", help="vllm only: the target's path or hub id (default: null in the config)")
    plugins.add_plugin_argument(parser)
    args = parser.parse_args(argv)
    fmt, options = formats[args.format], {}
    if args.verifier is not None:
        if "verifier" not in fmt.options:
            takers = " or ".join(f"--format {name}" for name, f in formats.items() if "verifier" in f.options)
            raise ValueError(f"--verifier is written only by {takers} (the speculators format), not "
                             f"--format {args.format}; drop it, or export with {takers}")
        options["verifier"] = args.verifier
    hub.resolve_options(args, {"checkpoint": "draft"})
    checkpoint = resolve_checkpoint(args.checkpoint)
    out = fmt.write(checkpoint, args.out, dtype=DTYPES[args.dtype], overwrite=args.overwrite, **options)
    print(f"exported {checkpoint} as {args.format} ({args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

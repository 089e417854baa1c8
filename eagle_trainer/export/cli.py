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
    the highest N is exported.
--out must not exist (unless --overwrite); it appears only once fully written.
--verifier (vllm only) is the target model's path or hub id, written as the verifier so that `vllm serve OUT`
finds the target; the checkpoint holds the target's architecture but not its path.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from eagle_trainer.drafts.io import CONFIG_FILE
from eagle_trainer.export import WRITERS

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
STEP_DIR = re.compile(r"step_(\d+)")


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: itself, or the newest checkpoints/step_<N> of a run dir."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--checkpoint {str(path)!r} does not exist or is not a directory; pass a checkpoint "
                         "directory (with draft_config.json) or a run directory (with checkpoints/step_<N>)")
    if (path / CONFIG_FILE).is_file():
        return path
    steps = [(int(m.group(1)), p) for p in (path / "checkpoints").glob("step_*")
             if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
    if not steps:
        raise ValueError(f"--checkpoint {str(path)!r} has neither {CONFIG_FILE} nor checkpoints/step_<N> "
                         "directories; pass a trainer checkpoint directory or a run directory")
    step, newest = max(steps)
    if not (newest / CONFIG_FILE).is_file():
        raise ValueError(f"newest checkpoint {str(newest)!r} (step {step}) has no {CONFIG_FILE}; it is incomplete "
                         "or not a draft checkpoint: pass an earlier step directory as --checkpoint")
    return newest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eagle-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, or run directory (newest step)")
    parser.add_argument("--format", required=True, choices=sorted(WRITERS))
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--verifier", help="vllm only: the target's path or hub id (default: null in the config)")
    args = parser.parse_args(argv)
    options = {}
    if args.verifier is not None:
        if args.format != "vllm":
            raise ValueError(f"--verifier is written only by --format vllm (the speculators format), not "
                             f"--format {args.format}; drop it, or export with --format vllm")
        options["verifier"] = args.verifier
    checkpoint = resolve_checkpoint(args.checkpoint)
    out = WRITERS[args.format](checkpoint, args.out, dtype=DTYPES[args.dtype], overwrite=args.overwrite, **options)
    print(f"exported {checkpoint} as {args.format} ({args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

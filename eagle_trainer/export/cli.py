"""The `eagle-export` console script: write a trained draft in a serving engine's format.

    eagle-export --checkpoint DIR --format sglang --out DIR [--dtype bfloat16|float32] [--overwrite]

--checkpoint is either
  - a trainer checkpoint directory: it holds draft_config.json and draft.safetensors (drafts/io.py), or
  - a run directory: its checkpoints/ subdirectory holds step_<N> checkpoint directories, and the one with
    the highest N is exported.
--out must not exist (unless --overwrite); it appears only once fully written.
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
    args = parser.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    out = WRITERS[args.format](checkpoint, args.out, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    print(f"exported {checkpoint} as {args.format} ({args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

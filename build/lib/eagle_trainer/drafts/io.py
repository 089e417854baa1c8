"""Draft weights on disk, in the trainer's own layout (checkpoints; export/ writes the engines' layouts).

    <dir>/draft_config.json   the draft config's fields; `algorithm` names its registry entry (absent: eagle3)
    <dir>/draft.safetensors   every draft tensor except the frozen target embedding (fp32), d2t and t2d included
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eagle_trainer import registry
from eagle_trainer.drafts.llama import Draft

CONFIG_FILE = "draft_config.json"
WEIGHTS_FILE = "draft.safetensors"


def save_draft(directory: str | Path, draft: Draft) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    draft.config.save(directory / CONFIG_FILE)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in draft.trainable_state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))


def load_config(path: str | Path):
    """The draft config a draft_config.json holds, as its algorithm's config class."""
    name = json.loads(Path(path).read_text()).get("algorithm", "eagle3")  # older EAGLE-3 checkpoints have no key
    return registry.algorithm_spec(name).config_class.load(path)


def build_from_config(path: str | Path) -> Draft:
    """An untrained draft of the kind and shape a draft_config.json describes."""
    cfg = load_config(path)
    return registry.algorithm_of(cfg).draft_class(cfg)


def load_draft(directory: str | Path, embedding: torch.Tensor | None = None,
               target_head: torch.Tensor | None = None) -> Draft:
    """Rebuild a draft from `save_draft` output. `embedding` [V, H]: the target's, else left random;
    `target_head` [V, H]: the target's lm_head, which an EAGLE-1/2 draft decodes with."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a draft checkpoint: no {CONFIG_FILE} in it")
    draft = build_from_config(directory / CONFIG_FILE)
    missing, unexpected = draft.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
    missing = [k for k in missing if not k.startswith("embed_tokens.")]
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE}: missing tensors {missing}, unexpected tensors {unexpected}")
    if embedding is not None:
        draft.set_target_weights(embedding, target_head)
    return draft

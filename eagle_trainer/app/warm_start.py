"""Warm start: a new run's draft begins from an existing one (`draft.init_from`): a trainer checkpoint, a run
directory (its newest checkpoint) or an export in any registered format (export.read_draft).

    read_warm_start(cfg, algorithm, info, aux_ids)   the draft read back, checked against the run before any
                                                     target weight is read
    warm_vocab_map(cfg, warm, d2t, t2d)              the vocab map the run trains with
    load_warm_weights(draft, warm)                   its weights into the run's new draft

The draft's own vocab map is kept by default (`draft.init_vocab=draft`): its lm_head rows were trained for those
ids. `draft.init_vocab=data` replaces it with the one the data builds (the lm_head rows then start from weights
trained for other ids). A kind, shape or aux-layer mismatch is refused naming both sides.
"""

from __future__ import annotations

import torch

from eagle_trainer import registry
from eagle_trainer.config import Config
from eagle_trainer.drafts.llama import Draft
from eagle_trainer.export import read_draft
from eagle_trainer.export.sglang import TARGET_FINGERPRINT
from eagle_trainer.targets.loading import target_fingerprint
from eagle_trainer.types import TargetInfo

VOCAB_MAP = ("d2t", "t2d")


def read_warm_start(cfg: Config, algorithm: registry.AlgorithmSpec, info: TargetInfo, aux_ids) -> Draft:
    where = f"draft.init_from={cfg.draft.init_from!r}"
    warm = read_draft(cfg.draft.init_from)
    kind = registry.algorithm_of(warm.config)
    if kind.draft_class is not algorithm.draft_class:
        raise ValueError(f"{where} is an {kind.kind} draft, but this run trains an {algorithm.kind} draft "
                         f"(draft.algorithm={cfg.draft.algorithm}); start from a draft of the same kind")
    if tuple(warm.aux_layer_ids) != tuple(aux_ids):
        raise ValueError(f"{where} reads the target's aux layers {list(warm.aux_layer_ids)}, this run "
                         f"{list(aux_ids)}; set target.aux_layer_ids={list(warm.aux_layer_ids)}")
    with torch.device("meta"):  # the run's draft shapes, without drawing random weights
        fresh = algorithm.build_draft(info, cfg.draft, aux_ids).trainable_state_dict()
    theirs = {k: v for k, v in warm.trainable_state_dict().items() if k not in VOCAB_MAP}
    ours = {k: v for k, v in fresh.items() if k not in VOCAB_MAP}
    wrong = sorted(set(ours) ^ set(theirs)) + [f"{k} {tuple(theirs[k].shape)} (this run {tuple(v.shape)})"
                                               for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{where} does not fit this run's draft for target {info.architecture} (hidden "
                         f"{info.hidden_size}, vocab {info.vocab_size}): {wrong}; start from a draft trained for this "
                         "target and these draft.* shapes")
    recorded, given = warm.config.extra.get(TARGET_FINGERPRINT), target_fingerprint(cfg.target.path)
    if recorded is not None and recorded != given:
        print(f"warning: {where} was trained on another target (fingerprint {recorded[:12]}, target.path "
              f"{cfg.target.path} has {given[:12]}); its shapes fit, so it is used")
    return warm


def warm_vocab_map(cfg: Config, warm: Draft, d2t: torch.Tensor, t2d: torch.Tensor):
    """(d2t, t2d) the run trains with: the warm-start draft's where it has one for this vocab size, unless the user
    asked for the data's (draft.init_vocab=data)."""
    if cfg.draft.init_vocab == "data" or warm.d2t.numel() != d2t.numel():  # EAGLE-1/2 exports: the full vocab
        return d2t, t2d
    same = torch.equal(warm.d2t.cpu(), d2t.cpu()) and torch.equal(warm.t2d.cpu(), t2d.cpu())
    if not same and cfg.data.vocab_path:
        raise ValueError(f"data.vocab_path={cfg.data.vocab_path!r} disagrees with the vocab map of "
                         f"draft.init_from={cfg.draft.init_from!r}; drop data.vocab_path to keep the draft's map, or "
                         "set draft.init_vocab=data to train with yours")
    if not same:
        print("warm start: training with the draft's own vocab map, not the one the data builds "
              "(draft.init_vocab=data to use the data's)")
    return warm.d2t.clone(), warm.t2d.clone()


def load_warm_weights(draft: Draft, warm: Draft) -> None:
    """Every trainable tensor of `warm` but its vocab map into `draft` (checked to fit by read_warm_start)."""
    with torch.no_grad():
        ours = draft.trainable_state_dict()
        for name, value in warm.trainable_state_dict().items():
            if name not in VOCAB_MAP:
                ours[name].copy_(value)

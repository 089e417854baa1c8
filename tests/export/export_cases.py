"""What the export tests share: a tiny draft with a random vocab map, logits read back, checkpoint edits, and the
aux-id lookups the engines do (sources in eagle_trainer/export/aux_layers.py)."""

import torch
from safetensors.torch import load_file, save_file

from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft
from eagle_trainer.drafts.io import WEIGHTS_FILE as CHECKPOINT_WEIGHTS
from eagle_trainer.drafts.unroll import unroll

V, VD, HT = 50, 20, 24


def tiny_draft(seed=0, **kw) -> Eagle3Draft:
    cfg = dict(hidden_size=32, target_hidden_size=HT, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
               vocab_size=V, draft_vocab_size=VD, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=256, aux_layer_ids=(1, 5, 9), target_architecture="Qwen3ForCausalLM")
    cfg.update(kw)
    torch.manual_seed(seed)
    draft = Eagle3Draft(Eagle3Config(**cfg))
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randperm(V)[:VD].sort().values  # target id of each draft id, ascending
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_map(ids - torch.arange(VD), t2d)
    return draft


def rebuilt_logits(original: Eagle3Draft, rebuilt: Eagle3Draft) -> tuple[list, list]:
    """TTT logits of the checkpoint draft and of the draft read back from an export, on the same inputs."""
    rebuilt.set_target_weights(original.embed_tokens.weight)  # the engine shares the target's embedding
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 9))
    aux = torch.randn(2, 9, 3 * HT)
    with torch.no_grad():
        return [[draft.logits(g) for g in unroll(draft, ids, aux, 3)] for draft in (original, rebuilt)]


def edit_checkpoint(ckpt, edit):
    tensors = load_file(str(ckpt / CHECKPOINT_WEIGHTS))
    edit(tensors)
    save_file(tensors, str(ckpt / CHECKPOINT_WEIGHTS))


def sglang_captures(config: dict) -> list[int]:
    """HF hidden_states indices SGLang's Qwen3/Llama target captures for a draft config: the nested key, + 1."""
    return [i + 1 for i in config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]


def vllm_captures(draft_hf_config: dict) -> list[int] | None:
    """HF hidden_states indices vLLM's target captures: the top-level key as-is; some builds then fall back to the
    nested key, also as-is; None means vLLM's default layers."""
    ids = draft_hf_config.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        ids = (draft_hf_config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return list(ids) if ids else None


def vllm_speculators_hf_config(config: dict) -> dict:
    """The draft HF config vLLM builds from a speculators config.json (configs/speculators/algos.py update_eagle3)."""
    hf = dict(config["transformer_layer_config"])
    hf["draft_vocab_size"] = config.get("draft_vocab_size")
    if config.get("target_hidden_size") is not None:
        hf["target_hidden_size"] = config["target_hidden_size"]
    hf["norm_before_residual"] = config.get("norm_before_residual", True)
    hf["norm_before_fc"] = config.get("norm_before_fc", False)
    if config.get("eagle_aux_hidden_state_layer_ids"):
        hf["eagle_aux_hidden_state_layer_ids"] = config["eagle_aux_hidden_state_layer_ids"]
    return hf

"""Write a trainer checkpoint as the plain EAGLE-3 draft that SGLang's `LlamaForCausalLMEagle3` serves.

    <out>/config.json         Llama keys of the draft, draft_vocab_size, target_hidden_size, eagle_config (aux ids
                              for SGLang), eagle_aux_hidden_state_layer_ids (the same layers, for vLLM)
    <out>/model.safetensors   fc.weight [H, 3Ht], midlayer.*, norm.weight [H], lm_head.weight [Vd, H] (bf16 by
                              default), d2t int64 [Vd], t2d bool [V]; no embedding (the engine shares the target's)

The checked writing (read_checkpoint, check_against, write_model, write_atomically) is shared with the other
formats (export/vllm.py, export/eagle1.py).

Verified against the engines' loader source:
- sglang python/sglang/srt/models/llama_eagle3.py: `LlamaModel` holds `fc` (in = 3 * target_hidden_size, else
  3 * hidden_size; bias only if config `bias`), `midlayer` (one decoder layer whose qkv reads 2H, plus
  `hidden_norm`; more layers only when num_hidden_layers > 1), `norm`, `embed_tokens`. `load_weights`: a name
  with `d2t` sets hot_token_id = d2t + arange(Vd); `t2d` is skipped; q/k/v and gate/up are stacked into qkv_proj
  and gate_up_proj; other names are tried as given, then with a `model.` prefix, and a name matching no
  parameter is dropped without a word (so a wrong name serves a random tensor, and a missing one too).
  `lm_head` is ParallelLMHead(draft_vocab_size, hidden_size) unless tie_word_embeddings (then it is the
  embedding); a null draft_vocab_size means the full vocab. Attention (sglang models/llama.py `LlamaAttention`
  / `LlamaDecoderLayer`) reads head_dim (default hidden/heads), rope_theta, rope_scaling,
  max_position_embeddings, attention_bias; `LlamaMLP` accepts only hidden_act "silu".
- The forward there is the draft of drafts/eagle3.py: residual = g, cat(input_layernorm(embed),
  hidden_norm(g)) -> attention -> fused add + post_attention_layernorm -> MLP -> norm(h + residual) for the
  logits, the pre-norm sum fed to the next step.
- Aux ids in SGLang: the target's ModelRunner (sglang python/sglang/srt/model_executor/model_runner.py) reads
  the DRAFT config's eagle_config["eagle_aux_hidden_state_layer_ids"] (absent: None, the target's default) and
  eagle_config.get("use_aux_hidden_state", True) (false: no capture at all), then calls the target's
  `set_eagle3_layers_to_capture(ids)`; in models/llama.py, qwen3.py and qwen3_moe.py that stores
  `[i + 1 for i in ids]` (default [2, L//2, L-3]), and the model's layer loop appends `hidden_states + residual`
  BEFORE layer j for each captured j, i.e. the input of layer i+1 = the output of decoder layer i. So SGLang ids
  are 0-based layer outputs, the convention of Eagle3Config.aux_layer_ids: they are written unchanged.
- vLLM also serves this format (vllm vllm/model_executor/models/llama_eagle3.py; vllm/transformers_utils/configs/
  eagle.py `EAGLEConfig` wraps the draft config and copies all its keys): it renames `midlayer.` to `layers.0.`,
  `d2t` to draft_id_to_target_id, skips `t2d`, prefixes every other non-lm_head name with `model.`, and an
  unknown name raises KeyError; embed_tokens may be absent. `norm_before_residual` is read with default false
  (written explicitly: false is this draft, residual = g before hidden_norm); SGLang has no such switch and
  always keeps residual = g. `eagle_config.use_aux_hidden_state` defaults to true in both; written explicitly.
- Aux ids (export/aux_layers.py has the table): SGLang reads only the nested eagle_config key, in our
  convention; vLLM reads the top-level `eagle_aux_hidden_state_layer_ids` first, as HF hidden_states indices.
  Both are written, each in its reader's convention (nested: i, top level: i + 1), so vLLM never falls back to
  the nested list (which some vLLM builds would read off by one) nor to its default layers.
- transformers 5 folds rope_theta/rope_scaling into rope_parameters on load; 4.x keeps them. The legacy keys
  are what both read, so those are written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from eagle_trainer import registry
from eagle_trainer.drafts.eagle3 import Eagle3Config, Eagle3Draft
from eagle_trainer.drafts.io import CONFIG_FILE as CHECKPOINT_CONFIG
from eagle_trainer.drafts.io import WEIGHTS_FILE as CHECKPOINT_WEIGHTS
from eagle_trainer.drafts.io import load_config
from eagle_trainer.drafts.llama import LlamaDraftConfig
from eagle_trainer.export.aux_layers import sglang_aux_ids, vllm_aux_ids

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_KEY = "eagle_trainer"  # fields SGLang ignores but the reader needs for an exact round trip
TARGET_FINGERPRINT = "target_fingerprint"  # key of a draft config's `extra`: targets.loading.target_fingerprint

# Every tensor SGLang's loader reads for a one-layer draft, under the name it reads it by.
SGLANG_TENSORS = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
)


def llama_keys(cfg: LlamaDraftConfig, dtype: torch.dtype) -> dict:
    """The HF LlamaConfig keys of the draft's decoder layer: exactly the draft `cfg`, nothing defaulted."""
    return {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.num_layers,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def sglang_config(cfg: Eagle3Config, dtype: torch.dtype) -> dict:
    """config.json for SGLang's LlamaForCausalLMEagle3 (vLLM loads it too), declaring exactly the draft `cfg`."""
    return {
        "architectures": [ARCHITECTURE],
        **llama_keys(cfg, dtype),
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "norm_before_residual": False,  # vLLM's switch; residual = g, as in SGLang
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": sglang_aux_ids(cfg.aux_layer_ids),  # SGLang: layer outputs
            "use_aux_hidden_state": True,
        },
        "eagle_aux_hidden_state_layer_ids": vllm_aux_ids(cfg.aux_layer_ids),  # vLLM: HF hidden_states indices
        PROVENANCE_KEY: provenance(cfg),
    }


def provenance(cfg: LlamaDraftConfig) -> dict:
    """The PROVENANCE_KEY entry of every format: the draft's target (architecture; fingerprint, null unless the
    checkpoint records one; vocab size; aux layers) and the config's `extra`, which the readers carry back."""
    target = {"fingerprint": cfg.extra.get(TARGET_FINGERPRINT), "vocab_size": cfg.vocab_size,
              "aux_layer_ids": list(getattr(cfg, "aux_layer_ids", ()))}  # EAGLE-1/2 read no aux layers
    return {"target_architecture": cfg.target_architecture, "target": target, "extra": cfg.extra}


def read_checkpoint(checkpoint_dir: str | Path, fmt: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Config and raw tensors of a trainer checkpoint (drafts/io.py layout) to be written as `fmt`, not yet checked.
    A checkpoint of a draft kind that `fmt` does not describe is refused, naming the kind's formats."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / CHECKPOINT_CONFIG).is_file() or not (checkpoint_dir / CHECKPOINT_WEIGHTS).is_file():
        raise ValueError(f"{str(checkpoint_dir)!r} is not a draft checkpoint: it needs {CHECKPOINT_CONFIG} and "
                         f"{CHECKPOINT_WEIGHTS} (written by drafts.io.save_draft); pass a checkpoint directory")
    cfg = load_config(checkpoint_dir / CHECKPOINT_CONFIG)
    spec = registry.algorithm_of(cfg)
    if fmt not in spec.exporters:
        raise ValueError(f"{str(checkpoint_dir)!r} holds an {spec.kind} draft (algorithm {spec.name!r}), which "
                         f"--format {fmt} does not describe; export it with --format {'|'.join(spec.exporters)}")
    return cfg, load_file(str(checkpoint_dir / CHECKPOINT_WEIGHTS))


def check_against(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Refuse `tensors` unless they have exactly the names and shapes of `expected` (a draft's state dict, on the
    meta device): floating where it is floating, and exactly its dtype elsewhere (d2t int64, t2d bool)."""
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ValueError(f"{where}: missing tensors {missing}, unknown tensors {unknown}; SGLang would serve random "
                         f"weights for a missing one and drop an unknown one silently (vLLM would fail to load). {fix}")
    wrong = [f"{k} {tuple(tensors[k].shape)} (config says {tuple(v.shape)})"
             for k, v in expected.items() if tensors[k].shape != v.shape]
    wrong += [f"{k} dtype {tensors[k].dtype} (needs {v.dtype})"
              for k, v in expected.items() if not v.is_floating_point() and tensors[k].dtype != v.dtype]
    wrong += [f"{k} dtype {tensors[k].dtype} (needs a floating dtype)"
              for k, v in expected.items() if v.is_floating_point() and not tensors[k].is_floating_point()]
    if wrong:
        raise ValueError(f"{where}: tensors disagree with its config: {wrong}; export the checkpoint together with "
                         "the draft_config.json it was trained with")


def check_tensors(cfg: Eagle3Config, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse tensors that are not exactly the draft `cfg`'s, by their checkpoint (and SGLang) names.

    Names, shapes, dtypes and the vocab map are checked; the vLLM writer renames only after this check.
    """
    with torch.device("meta"):
        expected = Eagle3Draft(cfg).trainable_state_dict()
    assert set(expected) == set(SGLANG_TENSORS), sorted(set(expected) ^ set(SGLANG_TENSORS))
    check_against(expected, tensors, where, "Re-save the checkpoint with drafts.io.save_draft from an Eagle3Draft, "
                  "or extend export/sglang.py and export/vllm.py for the new tensor")
    ids = tensors["d2t"] + torch.arange(cfg.draft_vocab_size)  # target id of each draft id
    in_range = bool(((ids >= 0) & (ids < cfg.vocab_size)).all())
    if not in_range or not bool((ids[1:] > ids[:-1]).all()) or not torch.equal(
            tensors["t2d"].nonzero().flatten(), ids):
        raise ValueError(f"{where}: d2t/t2d are not a vocab map (d2t[i] + i must be the ascending target ids "
                         f"< {cfg.vocab_size} that t2d marks); rebuild it with `eagle-data vocab` and retrain")


def check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"export dtype {dtype} is not a floating dtype; use torch.bfloat16 or torch.float32")


def write_atomically(out_dir: Path, write, overwrite: bool, checkpoint_dir: Path) -> None:
    """Run write(tmp_dir) in a sibling temp dir, then rename it to out_dir: never a half-written out_dir. An
    out_dir that is `checkpoint_dir` (the one being exported) or holds it is refused: replacing it deletes the run.
    Directories and files get the modes a plain mkdir / open would give (0o777 / 0o666 & ~umask), not mkdtemp's
    0700 or save_file's 0600, so that a server running as another user can read the export."""
    out, checkpoint = out_dir.resolve(), checkpoint_dir.resolve()
    if out == checkpoint or out in checkpoint.parents:
        raise ValueError(f"--out {out_dir} is the checkpoint {checkpoint_dir} being exported or a directory holding "
                         "it; writing there would delete the checkpoint: choose an --out outside it")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"export directory {str(out_dir)!r} already exists; remove it, choose another --out, "
                         "or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        umask = os.umask(0)  # the only way to read it is to set it; put straight back
        os.umask(umask)
        for p in (tmp, *tmp.rglob("*")):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "replaced")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_model(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                overwrite: bool, checkpoint_dir: str | Path) -> Path:
    """Write config.json (`config`) + model.safetensors (`tensors`, floating ones cast to `dtype`, the vocab map
    kept as it is) atomically to `out_dir`, never over `checkpoint_dir` (their source). The tensors are checked
    before this."""
    out_dir = Path(out_dir)
    exported = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}

    def write(directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(exported, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    write_atomically(out_dir, write, overwrite, Path(checkpoint_dir))
    return out_dir


def write_export(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype, overwrite: bool, fmt: str,
                 config: Callable[[Eagle3Config], dict], rename: Callable[[str], str] = lambda name: name) -> Path:
    """Check an EAGLE-3 trainer checkpoint, cast its weights to `dtype` (d2t stays int64, t2d bool), and write
    config.json (`config(cfg)`) + model.safetensors (names through `rename`) atomically to `out_dir`."""
    check_dtype(dtype)
    cfg, tensors = read_checkpoint(checkpoint_dir, fmt)
    check_tensors(cfg, tensors, str(Path(checkpoint_dir) / CHECKPOINT_WEIGHTS))
    return write_model(out_dir, config(cfg), {rename(k): v for k, v in tensors.items()}, dtype, overwrite,
                       checkpoint_dir)


def export_sglang(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                  overwrite: bool = False) -> Path:
    """Export the trainer checkpoint at `checkpoint_dir` to `out_dir` (config.json + model.safetensors).

    Weights are cast to `dtype` (d2t stays int64, t2d bool). Everything is checked before a file is written.
    Returns `out_dir`.
    """
    return write_export(checkpoint_dir, out_dir, dtype, overwrite, "sglang", lambda cfg: sglang_config(cfg, dtype))

"""Load a frozen target from a local HF checkpoint directory (config, safetensors, tokenizer).

Weights are read only from safetensors; `trust_remote_code` stays off unless the recipe turns it on.
The same code loads the tiny checkpoints the tests and demo build and a real Qwen3 / Qwen3-MoE checkpoint.
MoE experts may be stored fused (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) or per expert
(`mlp.experts.{e}.{gate,up,down}_proj.weight`); transformers' conversion mapping fuses the latter at load.
A checkpoint whose tensors do not all land on the model (missing, unexpected or mis-shaped keys) is refused:
a frozen target with randomly initialised weights would train a draft on noise without any other sign.

Offline training does not build the model: `read_target_tensors` reads single tensors (the embedding, the
lm_head) straight from the safetensors files, and `target_fingerprint` names a checkpoint without reading
its weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from eagle_trainer import registry
from eagle_trainer.config import TargetConfig
from eagle_trainer.targets.packed_attention import bind_packed_attention
from eagle_trainer.types import TargetInfo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"target.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_checkpoint_dir(path: str | Path) -> Path:
    """A directory with config.json and safetensors weights, else a ValueError that says what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"target.path={str(path)!r} does not exist or is not a directory; point it at a local HF checkpoint "
                         "(config.json, *.safetensors, tokenizer files)")
    if not (p / "config.json").is_file():
        raise ValueError(f"target.path={str(path)!r} has no config.json: not an HF checkpoint directory")
    if not any(p.glob("*.safetensors")):
        found = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth"))
        raise ValueError(f"target.path={str(path)!r} has no *.safetensors weights{f' (found {found})' if found else ''}; "
                         "weights are read only from safetensors: convert the checkpoint first")
    return p


def read_config(cfg: TargetConfig):
    path = check_checkpoint_dir(cfg.path)
    auto_map = json.loads((path / "config.json").read_text()).get("auto_map")
    if auto_map and not cfg.trust_remote_code:
        raise ValueError(f"{path / 'config.json'} asks for custom code ({sorted(auto_map.values())}); it is not run "
                         "unless you set target.trust_remote_code=true (or --trust-remote-code), which executes that "
                         "Python from the checkpoint directory: only for code you trust")
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError(f"{path / 'config.json'} names no `architectures`; cannot pick a target entry")
    return path, archs[0], hf_config


def target_info(cfg: TargetConfig) -> tuple[registry.TargetSpec, TargetInfo]:
    """Spec and shapes of the target without loading weights (recipes build drafts on the meta device)."""
    _, arch, hf_config = read_config(cfg)
    spec = registry.target_spec(arch)
    return spec, spec.read_info(arch, hf_config)


# Files of which a checkpoint's tokenizer needs at least one: without any, AutoTokenizer builds an empty one.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")


def load_tokenizer(cfg: TargetConfig, info: TargetInfo):
    """The checkpoint's tokenizer; refused when its files are missing, or when it has more ids than the target's
    vocab (another model's)."""
    path = check_checkpoint_dir(cfg.path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"target.path={str(path)!r} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is "
                         "there; copy tokenizer.json and tokenizer_config.json (and any vocab files) from the "
                         "model's original checkpoint into it")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    if len(tokenizer) > info.vocab_size:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} ids but the target's vocab_size is "
                         f"{info.vocab_size}: tokenizer and weights do not belong together")
    return tokenizer


def load_target(cfg: TargetConfig, device: torch.device):
    """-> (model in eval mode with no grads, tokenizer, spec, info)."""
    path, arch, hf_config = read_config(cfg)
    spec = registry.target_spec(arch)
    info = spec.read_info(arch, hf_config)
    tokenizer = load_tokenizer(cfg, info)
    for file in sorted(path.glob("*.safetensors")):
        with open_safetensors(file):  # reads the header: a damaged file is named here, not deep in transformers
            pass
    model, loading = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=resolve_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation, use_safetensors=True,
        device_map=str(device) if device.type == "cuda" else None, output_loading_info=True,
    )
    check_loading_info(path, loading)
    model.to(device).eval().requires_grad_(False)
    if device.type == "cpu":
        _own_storage(model)
    bind_packed_attention(model, cfg)
    if spec.bind_kernels is not None:
        spec.bind_kernels(model, cfg)
    return model, tokenizer, spec, info


@torch.no_grad()
def _own_storage(model: torch.nn.Module) -> None:
    """Give every parameter and buffer of a CPU model a fresh allocation of its own.

    from_pretrained leaves CPU weights pointing into the memory-mapped safetensors file, at the file's offsets;
    the sharded loader (targets/sharded.py) fills fresh, aligned allocations. On some CPUs (an AMD EPYC with
    torch's MKL) matmuls round differently for operands of another alignment, so equal weights placed apart
    give other bits: with its own copies a whole target computes what the same target sharded over ranks does,
    and a dump is the same for any world size (data/dump.py). Tied weights stay tied (one Parameter)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()


def check_loading_info(path: Path, loading: dict) -> None:
    """Refuse a load that left parameters at their random init or ignored tensors of the checkpoint."""
    keys = ("missing_keys", "unexpected_keys", "mismatched_keys")
    problems = {k: sorted(map(str, loading[k])) for k in keys if loading.get(k)}
    if problems:
        listed = "; ".join(f"{k} ({len(v)}): {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise ValueError(f"the weights in {path} do not match the model its config.json describes: {listed}. "
                         "Check that the safetensors files belong to this config (architecture, layer count, shapes)")


_INDEX_FILE = "model.safetensors.index.json"


def open_safetensors(file: Path):
    """safe_open(file) (a context manager), or a ValueError naming a file that is not whole safetensors."""
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{file} is corrupt or truncated ({e}); copy or download it again (compare its size and "
                         "checksum with the original's)") from None


def checkpoint_files(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a checkpoint directory, from its index or the files' headers."""
    if (path / _INDEX_FILE).is_file():
        return json.loads((path / _INDEX_FILE).read_text())["weight_map"]
    found = {}
    for f in sorted(path.glob("*.safetensors")):
        with open_safetensors(f) as handle:
            found.update({key: f.name for key in handle.keys()})
    return found


def target_fingerprint(path: str | Path) -> str:
    """sha256 over config.json, the sorted (name, size) of the *.safetensors files and the index json if any.

    The weights themselves are not read (a real target is up to ~160 GB); a copy of the checkpoint elsewhere
    has the same fingerprint, an edited config or a re-saved weight file of another size does not.
    """
    p = check_checkpoint_dir(path)
    h = hashlib.sha256((p / "config.json").read_bytes())
    files = sorted((f.name, f.stat().st_size) for f in p.glob("*.safetensors"))
    h.update(json.dumps(files).encode())
    if (p / _INDEX_FILE).is_file():
        h.update((p / _INDEX_FILE).read_bytes())
    return h.hexdigest()


def read_target_tensors(path: str | Path, names: list[str], trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint, read from its safetensors files without building the model.

    Sharded checkpoints are resolved through model.safetensors.index.json, others by the files' headers. A tied
    lm_head (config tie_word_embeddings, no lm_head tensor stored) is served by the embedding tensor. Tensors
    come back in their stored dtype on the CPU.
    """
    p, arch, hf_config = read_config(TargetConfig(path=str(path), trust_remote_code=trust_remote_code))
    weight_map = checkpoint_files(p)
    spec = registry.target_spec(arch)
    head, embed = spec.lm_head + ".weight", spec.embed + ".weight"
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    stored = {}  # requested name -> name in the files
    for name in names:
        key = embed if name == head and head not in weight_map and tied else name
        if key not in weight_map:
            tie_note = f" (config tie_word_embeddings={tied}, embedding {embed!r})" if name == head else ""
            raise ValueError(f"checkpoint {str(p)!r} has no tensor {name!r}{tie_note}; check the name against the "
                             "checkpoint's safetensors files / index")
        stored[name] = key
    out = {}
    for file in sorted({weight_map[k] for k in stored.values()}):
        with open_safetensors(p / file) as handle:
            for name, key in stored.items():
                if weight_map[key] == file:
                    out[name] = handle.get_tensor(key)
    return out

"""Loading a target too large for one rank: built on the meta device, sharded, then filled from safetensors.

No rank ever holds the whole model, on the GPU or in host memory: each parameter's local shard is read on its own
(a slice of rows through safetensors' memory map, or the few experts this rank keeps) and copied to the device.

    build_on_meta(hf_config, ...)    the HF model with its parameters on the meta device (buffers, e.g. RoPE
                                     frequencies, are real: they are not in the checkpoint)
    materialize(model, device)       empty local shards on the device, buffers kept
    fill_from_safetensors(model, p)  every parameter's local shard from the checkpoint files
    load_sharded_target(cfg, ...)    the four in order, with parallel.parallelize_target between build and fill:
                                     load_target for a target sharded over ranks
    open_target(cfg, device, dims)   what every job calls: sharded under torchrun (parallel.target=fsdp), else
                                     load_target
    target_lock_step(model, spec)    the ranks' collective forwards kept in step while each decodes its own work

Experts may be stored fused (`<experts>.gate_up_proj` [E, 2I, H], `<experts>.down_proj` [E, H, I]) or per expert
(`<experts>.<e>.{gate,up,down}_proj.weight`); both fill the fused parameters. A parameter the files do not hold,
a tensor of another shape, or a tensor nothing reads is refused, as load_target refuses them.
"""

from __future__ import annotations

import contextlib
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from tqdm.auto import tqdm

from eagle_trainer import registry
from eagle_trainer.config import TargetConfig
from eagle_trainer.parallel import ParallelDims, check_experts, parallelize_target
from eagle_trainer.parallel.lockstep import lock_step
from eagle_trainer.targets.loading import (checkpoint_files, load_target, load_tokenizer, open_safetensors,
                                          read_config, resolve_dtype)
from eagle_trainer.targets.packed_attention import bind_packed_attention


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device; buffers are made as usual."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_on_meta(hf_config, dtype: torch.dtype, attn_implementation: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    return model.eval().requires_grad_(False)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every (local shard of a) parameter on `device`, uninitialised; buffers keep their values."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor this rank holds, its first row in the whole parameter). FSDP2 shards dim 0 in torch.chunk's way:
    rank i of n holds rows [i * ceil(N / n), ...), the last ranks fewer (or none)."""
    if not isinstance(param, DTensor):
        return param, 0
    (placement,) = param.placements
    assert isinstance(placement, Shard) and placement.dim == 0, f"unexpected placement {param.placements}"
    mesh = param.device_mesh
    rows = -(-param.shape[0] // mesh.size())
    local = param.to_local()
    return local, mesh.get_local_rank() * rows


class CheckpointReader:
    """Row slices of a checkpoint's tensors, read through safetensors' memory map; remembers what was read."""

    def __init__(self, path: Path):
        self.path, self.files = path, checkpoint_files(path)
        self.used: set[str] = set()
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _handle(self, key: str):
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(open_safetensors(self.path / file))
        return self._handles[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        self.used.add(key)
        return self._handle(key).get_slice(key)[start:stop]

    def tensor(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self._handle(key).get_tensor(key)

    def __contains__(self, key: str) -> bool:
        return key in self.files


def _rows(reader: CheckpointReader, name: str, start: int, stop: int, full_shape) -> torch.Tensor:
    """Rows [start, stop) of parameter `name` (of `full_shape`); for fused experts ([E, ...]) from a fused or a
    per-expert checkpoint. KeyError when the checkpoint has neither."""
    if name in reader:
        return _checked_rows(reader, name, start, stop, full_shape)
    prefix, _, leaf = name.rpartition(".")
    parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.get(leaf)
    first = f"{prefix}.{start}.{parts[0]}.weight" if parts else None
    if parts is None or first not in reader:
        raise KeyError(name)
    experts = []
    for e in range(start, stop):
        experts.append(torch.cat([reader.tensor(f"{prefix}.{e}.{p}.weight") for p in parts], dim=0))
    out = torch.stack(experts) if experts else torch.empty((0, *full_shape[1:]))
    if tuple(out.shape[1:]) != tuple(full_shape[1:]):
        raise ValueError(f"per-expert tensors {prefix}.<e>.{'/'.join(parts)}.weight stack to "
                         f"{tuple(out.shape[1:])} per expert, but the model's {name} is {tuple(full_shape)}")
    return out


def _checked_rows(reader: CheckpointReader, key: str, start: int, stop: int, full_shape) -> torch.Tensor:
    stored = reader.shape(key)
    if stored != tuple(full_shape):
        raise ValueError(f"checkpoint tensor {key} is {stored} but the model its config.json describes has "
                         f"{tuple(full_shape)}; check that the safetensors files belong to this config")
    return reader.rows(key, start, stop)


def fill_from_safetensors(model: nn.Module, path: str | Path, progress: bool = False) -> None:
    """Copy each parameter's local shard from the checkpoint at `path` (see the module docstring)."""
    path = Path(path)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    expert_modules = {name: m for name, m in model.named_modules() if hasattr(m, "expert_range")}
    experts = {}  # module path -> expert count, of every expert parameter (its per-expert keys may be another rank's)
    missing = []
    with CheckpointReader(path) as reader:
        params = list(model.named_parameters())
        for name, param in tqdm(params, desc="load target shards", disable=not progress, leave=False):
            local, first = local_rows(param)
            owner = expert_modules.get(name.rpartition(".")[0])
            full_shape = tuple(param.shape)
            if owner is not None:  # an expert-parallel shard: this rank's experts start at expert_range[0] of all
                offset, _, total = owner.expert_range
                first, full_shape = first + offset, (total, *full_shape[1:])
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                experts[name.rpartition(".")[0]] = full_shape[0]
            try:
                rows = _rows(reader, name, first, first + local.shape[0], full_shape)
            except KeyError:
                missing.append(name)
                continue
            with torch.no_grad():
                local.copy_(rows)
    unread = sorted(k for k in reader.files if k not in reader.used and not any(p.search(k) for p in ignore))
    unread = [k for k in unread if not _other_ranks_expert(k, experts)]
    if missing or unread:
        raise ValueError(f"the weights in {path} do not match the model its config.json describes: missing "
                         f"({len(missing)}) {missing[:5]}; not used ({len(unread)}) {unread[:5]}. Check that the "
                         "safetensors files belong to this config (architecture, layer count, shapes)")


_EXPERT_KEY = re.compile(r"^(.*)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _other_ranks_expert(key: str, experts: dict[str, int]) -> bool:
    """A per-expert tensor of an expert parameter this rank holds part of: the rest is other ranks' to read."""
    match = _EXPERT_KEY.match(key)
    return match is not None and match.group(1) in experts and int(match.group(2)) < experts[match.group(1)]


def peak_rss_gib() -> float:
    """This process's peak resident host memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_sharded_target(cfg: TargetConfig, device: torch.device, dims: ParallelDims, progress: bool = False):
    """load_target for a target sharded over ranks: built on the meta device, sharded as `dims` says, then each
    rank's shards read from the safetensors files. -> (model, tokenizer, spec, info, report)."""
    start = time.perf_counter()
    path, arch, hf_config = read_config(cfg)
    spec = registry.target_spec(arch)
    info = spec.read_info(arch, hf_config)
    check_experts(dims.ep, info.num_experts)
    tokenizer = load_tokenizer(cfg, info)
    model = build_on_meta(hf_config, resolve_dtype(cfg.dtype, device), cfg.attn_implementation, cfg.trust_remote_code)
    parallelize_target(model, spec, dims)
    materialize(model, device)
    fill_from_safetensors(model, path, progress=progress)
    bind_packed_attention(model, cfg)
    if spec.bind_kernels is not None:
        spec.bind_kernels(model, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())
    report = {"load_s": time.perf_counter() - start, "held_gib": held / 2**30, "peak_rss_gib": peak_rss_gib()}
    print(f"target: rank {dims.rank} of {dims.world_size} holds {report['held_gib']:.2f} GiB of weights "
          f"(ep={dims.ep}); loaded in {report['load_s']:.1f} s, peak host RSS {report['peak_rss_gib']:.2f} GiB")
    return model, tokenizer, spec, info, report


def sharding_group(model: nn.Module):
    """The process group a target's forwards are collective over (its FSDP mesh), or None for a whole target."""
    for param in model.parameters():
        if isinstance(param, DTensor):
            return param.device_mesh.get_group()
    return None


def idle_forward(model: nn.Module, spec) -> Callable[[], None]:
    """One forward of the backbone on a single token and no cache: what a rank with no work left runs so that the
    ranks still decoding find it in their collectives (parallel.lock_step)."""
    backbone = model.get_submodule(spec.backbone)
    device = next(model.parameters()).device

    def run() -> None:
        backbone(input_ids=torch.zeros((1, 1), dtype=torch.int64, device=device), use_cache=False)
    return run


def target_lock_step(model: nn.Module, spec):
    """parallel.lock_step over the target's backbone: a rank may run any number of target forwards in the body
    (its own prompts), the others idle in step; nothing to do for a target that is not sharded."""
    return lock_step(model.get_submodule(spec.backbone), idle_forward(model, spec), sharding_group(model))


@dataclass
class OpenTarget:
    """A loaded target and how it is spread: `dims` the ranks, `sharded` whether each holds only its shard."""

    model: nn.Module
    tokenizer: object
    spec: object
    info: object
    dims: ParallelDims
    sharded: bool

    def how_it_ran(self) -> dict:
        return {"world_size": self.dims.world_size, "ep": self.dims.ep, "sharded": self.sharded}


def open_target(cfg: TargetConfig, device: torch.device, dims: ParallelDims, progress: bool = False) -> OpenTarget:
    """The one way every job gets its target: sharded over the ranks (FSDP2 + EP, load_sharded_target) when
    launched on several with parallel.target=fsdp; else whole on this rank (load_target)."""
    if dims.distributed and dims.target == "fsdp":
        model, tokenizer, spec, info, _ = load_sharded_target(cfg, device, dims, progress)
        return OpenTarget(model, tokenizer, spec, info, dims, True)
    model, tokenizer, spec, info = load_target(cfg, device)
    return OpenTarget(model, tokenizer, spec, info, dims, False)

"""Training checkpoints: what one holds, atomic saves, retention, and resume at any world size.

    <run_dir>/checkpoints/step_0000100/
        draft_config.json, draft.safetensors   the draft alone, fp32 (export/ and evaluate/ read these)
        state/                                 torch.distributed.checkpoint: draft + AdamW state, keyed by
                                               parameter name, so any world size can load it
        trainer_state.json                     step, data position, scheduler, skip counters, data fingerprint
        rng/rank_00000.json                    each rank's RNG states (python, numpy, torch CPU and CUDA)

A checkpoint is written into `step_N.tmp` and renamed to `step_N` once every file is in it: a directory
named `step_N` is always complete, and a crash during a save leaves the previous one untouched (the
stale `.tmp` is removed by the next save). Tensors go through safetensors and DCP; the rest is JSON.
DCP stores two things as pickles: its `.metadata` index, and the non-tensor optimizer values (lr, betas, ...)
in the data files. Resume reads the index with an unpickler that admits only DCP's metadata classes
(`_MetadataUnpickler`) and those values with torch.load(weights_only=True) (`_PlainValuesPlanner`): a pickle
planted in a checkpoint is refused, not run. A checkpoint that cannot be read names the previous complete one.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from eagle_trainer.drafts.io import CONFIG_FILE, save_draft

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# The frozen target embedding inside the draft is the target's: never saved, never restored.
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load that it assumes a single process; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent is to")
        yield


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states as JSON-able values."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *(v.item() if hasattr(v, "item") else v for v in np_state[2:])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device is not None and device.type == "cuda" and "cuda" in state:
        cuda = torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8)
        torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(path: str | Path, draft: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    trainer_state: dict, device: torch.device | None = None) -> Path:
    """Write a complete checkpoint at `path` (atomically). Collective: every rank calls it; rank 0 writes
    the draft files and renames, each rank writes its RNG file, DCP writes the shared state once."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    rank, world = _rank_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        save_draft(tmp, getattr(draft, "module", draft))
        state = {**trainer_state, "scheduler": scheduler.state_dict(), "world_size": world}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    _barrier()
    (tmp / "rng" / f"rank_{rank:05d}.json").write_text(json.dumps(rng_state(device)))
    model_sd, optim_sd = get_state_dict(draft, optimizer, options=_OPTIONS)
    with _single_process_quiet():
        dcp.save({"draft": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / STATE_DIR),
                 no_dist=not _distributed())
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    _barrier()
    return final


def load_checkpoint(path: str | Path, draft: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    device: torch.device | None = None) -> dict:
    """Restore draft, optimizer, scheduler and this rank's RNG from `path`; returns the trainer state.
    The world size may differ from the one that saved: draft and optimizer state are whole tensors by name;
    a rank with no RNG file of its own keeps its current (seeded) RNG."""
    path = check_checkpoint(path)
    trainer_state = _read_json(path, TRAINER_STATE)
    check_draft_config(path, getattr(draft, "module", draft))
    model_sd, optim_sd = get_state_dict(draft, optimizer, options=_OPTIONS)
    state = {"draft": model_sd, "optimizer": optim_sd}
    reader = _CheckedReader(path / STATE_DIR)
    try:
        reader.read_metadata()  # first outside DCP, whose own call wraps any error in a CheckpointException
        with _single_process_quiet():
            dcp.load(state, storage_reader=reader, planner=_PlainValuesPlanner(), no_dist=not _distributed())
    except (CheckpointException, pickle.UnpicklingError, OSError, EOFError, RuntimeError) as e:
        raise _load_error(path, e) from None
    # not strict: the frozen embedding is left out on purpose; every other key must match
    keys = set_state_dict(draft, optimizer, model_state_dict=state["draft"], optim_state_dict=state["optimizer"],
                          options=StateDictOptions(ignore_frozen_params=True, strict=False))
    frozen = {name for name, p in draft.named_parameters() if not p.requires_grad}
    missing = [k for k in keys.missing_keys if k.removeprefix("module.") not in frozen]
    if missing or keys.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit this draft: missing {missing}, unexpected "
                         f"{list(keys.unexpected_keys)}; resume with the draft config it was trained with")
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    rank, _ = _rank_world()
    rng_file = f"rng/rank_{rank:05d}.json"
    if (path / rng_file).is_file():
        set_rng_state(_read_json(path, rng_file), device)
    return trainer_state


def _read_json(path: Path, name: str) -> dict:
    try:
        return json.loads((path / name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _unreadable(path, f"{name}: {e}") from None


def _step(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def _unreadable(path: Path, reason: str) -> ValueError:
    """A checkpoint that cannot be read (truncated or missing files), naming the previous complete one to resume."""
    step = _step(path)
    earlier = [p for p in step_checkpoints(path.parent) if step is not None and _step(p) < step]
    instead = (f"resume from the previous complete one with train.resume={earlier[-1]}" if earlier
               else "no earlier complete checkpoint is there: start fresh with train.resume=none")
    return ValueError(f"checkpoint {path} cannot be read ({reason}); {instead}")


def _load_error(path: Path, error: BaseException) -> ValueError:
    """What resume says of a checkpoint DCP could not load: a refused pickle, or files it could not read."""
    if isinstance(error, CheckpointException) and error.failures:  # DCP's wrapper around each rank's error
        error = error.failures[min(error.failures)][0]
    if isinstance(error, RefusedPickle):
        return ValueError(f"checkpoint {path}: {error}; refused, as loading it could run code. Resume only from "
                          "checkpoints your own runs wrote, or start fresh with train.resume=none")
    lines = str(error).splitlines()
    return _unreadable(path, f"{type(error).__name__}: {lines[0] if lines else ''}")


class RefusedPickle(pickle.UnpicklingError):
    """A pickle in a checkpoint asks for a global that checkpoints never hold (a planted payload)."""


# What a DCP `.metadata` pickle holds (torch 2.11 to 2.14): the dataclasses and enums of
# torch.distributed.checkpoint.metadata, the file system reader's _StorageInfo, torch.Size, dtypes and layouts, and
# the checkpoint_id path; besides ints, floats, strings, lists, tuples and dicts, which pickle without a lookup.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                     ("builtins", "set"), ("builtins", "frozenset")}
_METADATA_IMPORTS = {module for module, _ in _METADATA_GLOBALS} | {_METADATA_MODULE, "pathlib", "pathlib._local"}


def _metadata_global(module: str, name: str, found) -> bool:
    return ((module, name) in _METADATA_GLOBALS
            or (module == _METADATA_MODULE and isinstance(found, type) and found.__module__ == module)
            or (module == "torch" and isinstance(found, torch.dtype))
            or (module.startswith("pathlib") and isinstance(found, type) and issubclass(found, pathlib.PurePath)))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` index; any other global (a function a planted pickle would call) is refused."""

    def find_class(self, module: str, name: str):
        found = getattr(importlib.import_module(module), name, None) if module in _METADATA_IMPORTS else None
        if not _metadata_global(module, name, found):
            raise RefusedPickle(f"{STATE_DIR}/.metadata asks for {module}.{name}, which a DCP index never holds")
        return found


class _CheckedReader(FileSystemReader):
    """DCP's file system reader with the `.metadata` index read by `_MetadataUnpickler` (DCP's own uses pickle)."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"  # DCP's file names (torch 2.11 to 2.14)
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _PlainValuesPlanner(DefaultLoadPlanner):
    """DCP's load planner, with the non-tensor values (the optimizer's lr, betas, ...) read by
    torch.load(weights_only=True): DCP's own planner unpickles them with weights_only=False."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, weights_only=True)  # tensors and plain Python values only
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise RefusedPickle(f"the {read_item.dest_index.fqn} value in {STATE_DIR}/ asks for "
                                f"{found.group(1) if found else 'a global'}, which optimizer values never hold") from None
        buffer = io.BytesIO()
        torch.save(plain, buffer)  # handed on as the bytes DCP expects, now of checked values only
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


def check_draft_config(path: Path, draft: torch.nn.Module) -> None:
    """The checkpoint's draft_config.json must describe this draft (else DCP fails deep inside on a shape)."""
    saved = _read_json(path, CONFIG_FILE)
    current = json.loads(json.dumps(asdict(draft.config)))
    # `extra` keys a checkpoint predates (e.g. the target fingerprint) are not a different draft
    current["extra"] = {k: v for k, v in current.get("extra", {}).items() if k in saved.get("extra", {})}
    differ = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)}
    if differ:
        listed = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"checkpoint {path} holds a different draft ({listed}); resume with the recipe it was "
                         "trained with, or start fresh with train.resume=none")


def check_checkpoint(path: str | Path) -> Path:
    """A complete training checkpoint directory, else a ValueError that says what it is not."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; use train.resume=latest, none, or an existing "
                         "<run_dir>/checkpoints/step_N directory")
    missing = [name for name in (TRAINER_STATE, CONFIG_FILE, STATE_DIR) if not (path / name).exists()]
    if missing:
        raise ValueError(f"{path} is not a complete training checkpoint (missing {missing}); an interrupted save "
                         "leaves step_N.tmp, never step_N: resume from an earlier step_N or train.resume=none")
    return path


def step_checkpoints(checkpoint_dir: str | Path, complete: bool = True) -> list[Path]:
    """step_N directories, oldest first: the complete ones (with trainer_state.json), or all of them."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if not complete or (p / TRAINER_STATE).is_file()]


def latest_checkpoint(checkpoint_dir: str | Path, complete: bool = True) -> Path | None:
    """The step_N directory with the highest N (among the complete ones unless complete=False), or None."""
    found = step_checkpoints(checkpoint_dir, complete)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The draft checkpoint that `path` names: itself (it holds draft_config.json), or the newest
    checkpoints/step_N of a run directory, which must hold the draft (else an earlier step is to be named)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--checkpoint {str(path)!r} does not exist or is not a directory; pass a checkpoint "
                         "directory (with draft_config.json) or a run directory (with checkpoints/step_<N>)")
    if (path / CONFIG_FILE).is_file():
        return path
    newest = latest_checkpoint(path / "checkpoints", complete=False)
    if newest is None:
        raise ValueError(f"--checkpoint {str(path)!r} has neither {CONFIG_FILE} nor checkpoints/step_<N> "
                         "directories; pass a trainer checkpoint directory or a run directory")
    if not (newest / CONFIG_FILE).is_file():
        step = int(_STEP_DIR.match(newest.name).group(1))
        raise ValueError(f"newest checkpoint {str(newest)!r} (step {step}) has no {CONFIG_FILE}; it is incomplete "
                         "or not a draft checkpoint: pass an earlier step directory as --checkpoint")
    return newest


def prune_checkpoints(checkpoint_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step_N checkpoints (0 keeps all) and stale .tmp directories.
    Named checkpoints such as checkpoints/best are left alone. Returns what was deleted."""
    root = Path(checkpoint_dir)
    stale = [p for p in root.glob("*.tmp") if p.is_dir()] if root.is_dir() else []
    old = step_checkpoints(root)[:-keep_last] if keep_last > 0 else []
    for p in stale + old:
        shutil.rmtree(p, ignore_errors=True)
    return stale + old

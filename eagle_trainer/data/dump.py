"""Writing an offline dump (data/offline.py describes its format and reads it back).

The dump is the same for any number of ranks. Its batches are consecutive examples, batch_size each, as one
process makes them; under torchrun batch k is captured by rank k % W (the target may be sharded over the ranks:
its forwards then run inside the target's lock step, idle ranks following the busy ones), and each round of W
batches is gathered to rank 0 (its host memory holds one round), which alone writes. Everything but run.json is
then byte for byte what one process writes, wherever the target gives the same bits sharded as whole (fp32 with
the Triton MoE core; HF's expert loop sums in another order). Rows of a batched capture differ from the same
example captured alone by float rounding (padding changes the matmul shapes); with batch_size=1 each example is
captured as online training with batch size 1 captures it.

Shapes: B batch, T tokens, Ht target hidden.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file
from tqdm import tqdm

from eagle_trainer.data.dataset import collate
from eagle_trainer.data.offline import (COMPRESSIONS, FORMAT_VERSION, HIDDEN_NAMES, INDEX_FILE, LOSSY_NAMES,
                                        MANIFEST_FILE, REQUIRED_FIELDS, RUN_FILE, VOCAB_FILE, dequantize_fp8,
                                        quantize_fp8)
from eagle_trainer.types import CapturedStates


def example_lengths(dataset: datasets.Dataset, batch_size: int = 4096) -> np.ndarray:
    """Token count of every row: int64 [N], read from the Arrow list offsets (no row is decoded)."""
    parts = [pc.list_value_length(t["input_ids"]).to_numpy()
             for t in dataset.with_format("arrow").iter(batch_size=batch_size)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _write_json(path: Path, obj) -> None:
    """Write then rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _is_dump_file(name: str) -> bool:
    """A file a dump writes, the vocab map aside (overwritten), or one of the older per-rank layout."""
    return (name in (MANIFEST_FILE, INDEX_FILE, RUN_FILE) or (name.startswith("shard-") and name.endswith(".safetensors"))
            or (name.startswith("index.r") and name.endswith(".json")))


def _clear_old_dump(out_dir: Path) -> None:
    """Remove what an earlier dump into out_dir left: the manifest first (the directory stops passing for
    complete), then its index, run record and shards."""
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for f in out_dir.iterdir():
        if _is_dump_file(f.name):
            f.unlink()


class _ShardWriter:
    """Collects examples' tensors and writes them as shard files of about `shard_bytes` each."""

    def __init__(self, out_dir: Path, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.size, self.num_files, self.bytes = 0, 0, 0

    @property
    def name(self) -> str:
        return f"shard-{self.num_files:05d}.safetensors"

    def add(self, i: int, tensors: dict[str, torch.Tensor]) -> str:
        """Store example i's tensors (whole, in one shard); returns the shard's file name."""
        size = sum(t.nbytes for t in tensors.values())
        if self.tensors and self.size + size > self.shard_bytes:
            self.flush()
        self.tensors.update({f"{i}.{name}": t for name, t in tensors.items()})
        self.size += size
        return self.name

    def flush(self) -> None:
        if not self.tensors:
            return
        path = self.out_dir / self.name
        save_file(self.tensors, str(path), metadata={"format": "pt"})
        self.bytes += path.stat().st_size
        self.num_files += 1
        self.tensors, self.size = {}, 0


@dataclass
class _CapturedBatch:
    """One batch as stored, on the CPU: what its capturing rank hands to rank 0."""

    examples: list[tuple[int, dict[str, torch.Tensor]]]  # (example id, its unpadded tensors) in order
    sq_error: dict[str, tuple[float, float]]  # lossy name -> (sum (x - dq)^2, sum x^2) over the batch's real tokens
    num_tokens: int

    # Pickled (the gather to rank 0) with the tensors as one safetensors blob: torch's own pickling of a float8
    # tensor does not load back. The layout keeps each example's tensors in their order.
    def __getstate__(self) -> dict:
        flat = {f"{i}.{name}": t for i, tensors in self.examples for name, t in tensors.items()}
        return {"blob": safetensors_save(flat), "layout": [(i, list(tensors)) for i, tensors in self.examples],
                "sq_error": self.sq_error, "num_tokens": self.num_tokens}

    def __setstate__(self, state: dict) -> None:
        flat = safetensors_load(state["blob"])
        self.examples = [(i, {name: flat[f"{i}.{name}"] for name in names}) for i, names in state["layout"]]
        self.sq_error, self.num_tokens = state["sq_error"], state["num_tokens"]


def _capture_batch(target, dataset: datasets.Dataset, ids: range, lengths: np.ndarray, compression: str,
                   pad_id: int) -> _CapturedBatch:
    """Capture the examples `ids` as one right-padded batch and cut each one's rows out of it."""
    device = target.target_head().device
    rows = dataset[list(ids)]
    batch = collate([{"input_ids": x, "loss_mask": m} for x, m in zip(rows["input_ids"], rows["loss_mask"])],
                    pad_id)  # [B, T]
    states = target.capture(batch.to(device), argmax=True)
    stored, sq_error = _encode(states, HIDDEN_NAMES, compression, batch.attention_mask.to(device))  # [B, T, ...]
    argmax_valid = states.argmax_valid.cpu()
    examples = []
    for row, i in enumerate(ids):
        n = int(lengths[i])
        tensors = {"input_ids": batch.input_ids[row, :n].to(torch.int32), "loss_mask": batch.loss_mask[row, :n],
                   "argmax_valid": argmax_valid[row, :n]}
        tensors.update({name: t[row, :n] for name, t in stored.items()})
        # clone: a row is a view of the batch; safetensors refuses tensors that share memory, and pickling a view
        # (the gather to rank 0) would send the whole batch
        examples.append((i, {k: v.clone() for k, v in tensors.items()}))
    return _CapturedBatch(examples, sq_error, int(batch.attention_mask.sum()))


def _gather(part: _CapturedBatch | None, rank: int, world_size: int, group) -> list[_CapturedBatch | None]:
    """Every rank's part of a round, on rank 0 in rank order (batch order); [] elsewhere."""
    if world_size == 1:
        return [part]
    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(part, parts, dst=0, group=group)
    return parts if rank == 0 else []


@torch.no_grad()
def dump_hidden_states(
    target,
    dataset: datasets.Dataset,
    out_dir: str | Path,
    *,
    manifest: dict,
    batch_size: int,
    compression: str = "none",
    rank: int = 0,
    world_size: int = 1,
    lock_step: Callable[[], ContextManager] = contextlib.nullcontext,
    vocab_file: str | Path | None = None,
    how_it_ran: dict | None = None,
    progress: bool = True,
    shard_bytes: int = 1 << 30,
    pad_id: int = 0,
) -> dict:
    """Capture every example of `dataset` with `target` (a FrozenTarget) and store them in `out_dir`.

    `manifest` holds the caller's fields (REQUIRED_FIELDS, see `dump_manifest`); the rest is added here. With
    world_size > 1 every rank calls this alike (torch.distributed initialised): batch k is captured by rank
    k % world_size inside `lock_step()` (targets.sharded.target_lock_step for a target sharded over the ranks, whose
    forwards are collective), and rank 0 gathers each round's batches and alone writes (module docstring).
    `vocab_file` is copied in as VOCAB_FILE; `how_it_ran` (e.g. world_size, ep, sharded) goes into RUN_FILE.
    Returns, on every rank, the dump's num_examples, num_tokens, bytes, bytes_per_token, compression_error
    ({name: relative Frobenius error}, empty for "none"), seconds and tokens_per_s.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r} is not one of {COMPRESSIONS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise ValueError(f"the dump manifest lacks {missing}; build it with data.offline.dump_manifest(...)")
    start_time = time.perf_counter()
    lengths = example_lengths(dataset)
    num_batches = -(-len(dataset) // batch_size)
    # the gather carries each batch's states as bytes: over gloo they stay in host memory, whatever the target's backend
    group = dist.new_group(backend="gloo") if world_size > 1 else None
    writer = _DumpWriter(Path(out_dir), lengths, compression, shard_bytes, progress) if rank == 0 else None
    for first in range(0, num_batches, world_size):  # a round: batch first + r on rank r
        k, mine = first + rank, None
        with lock_step():  # a rank without a batch (in the last round) idles through the others' forwards
            if k < num_batches:
                ids = range(k * batch_size, min((k + 1) * batch_size, len(dataset)))
                mine = _capture_batch(target, dataset, ids, lengths, compression, pad_id)
        for part in _gather(mine, rank, world_size, group):  # rank 0: the round's batches in order
            if part is not None:
                writer.add(part)
    result = None
    if rank == 0:
        head = target.target_head()
        result = writer.finish({
            **manifest, "format_version": FORMAT_VERSION, "aux_layer_ids": list(target.aux_layer_ids),
            "dtype": str(head.dtype).removeprefix("torch."), "hidden_size": int(head.shape[-1]),
            "batch_size": batch_size,
        }, vocab_file, how_it_ran or {}, start_time)
    if world_size > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0, group=group)
        dist.destroy_process_group(group)
        result = box[0]
    return result


class _DumpWriter:
    """Rank 0's side of a dump: the captured batches, in batch order, into shards; then index, run record, manifest."""

    def __init__(self, out_dir: Path, lengths: np.ndarray, compression: str, shard_bytes: int, progress: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        _clear_old_dump(out_dir)
        self.out_dir, self.lengths, self.compression = out_dir, lengths, compression
        self.shards = _ShardWriter(out_dir, shard_bytes)
        self.index: dict[str, dict] = {}
        # lossy name -> [sum (x - dq)^2, sum x^2], summed batch after batch: the same floats for any world size
        self.sq_error = {name: [0.0, 0.0] for name in LOSSY_NAMES} if compression == "fp8" else {}
        self.bar = tqdm(total=int(lengths.sum()), unit="tok", unit_scale=True, desc="dump", disable=not progress,
                        dynamic_ncols=True)

    def add(self, part: _CapturedBatch) -> None:
        for i, tensors in part.examples:
            self.index[str(i)] = {"file": self.shards.add(i, tensors), "tokens": int(self.lengths[i])}
        for name, (err, norm) in part.sq_error.items():
            self.sq_error[name][0] += err
            self.sq_error[name][1] += norm
        self.bar.update(part.num_tokens)

    def finish(self, manifest: dict, vocab_file: str | Path | None, how_it_ran: dict, start_time: float) -> dict:
        """The last shard, the index, the vocab map, the run record, then the manifest (last); -> the summary."""
        self.shards.flush()
        self.bar.close()
        num_examples, num_tokens, num_bytes = len(self.lengths), int(self.lengths.sum()), self.shards.bytes
        assert len(self.index) == num_examples, (len(self.index), num_examples)
        _write_json(self.out_dir / INDEX_FILE, {str(i): self.index[str(i)] for i in range(num_examples)})
        if vocab_file is not None:
            shutil.copyfile(vocab_file, self.out_dir / VOCAB_FILE)
        manifest = {
            **manifest, "contents": ["input_ids", "loss_mask", *HIDDEN_NAMES, "argmax_valid"],
            "compression": self.compression, "compressed": list(self.sq_error),
            "compression_error": {name: math.sqrt(err / norm) if norm > 0 else 0.0
                                  for name, (err, norm) in self.sq_error.items()},
            "num_examples": num_examples, "num_tokens": num_tokens, "bytes": num_bytes,
            "bytes_per_token": num_bytes / max(num_tokens, 1),
        }
        seconds = time.perf_counter() - start_time
        keys = ("num_examples", "num_tokens", "bytes", "bytes_per_token", "compression_error")
        result = {**{k: manifest[k] for k in keys}, "seconds": seconds, "tokens_per_s": num_tokens / max(seconds, 1e-9)}
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_json(self.out_dir / RUN_FILE, {**how_it_ran, "created": created, "seconds": seconds,
                                              "tokens_per_s": result["tokens_per_s"]})
        _write_json(self.out_dir / MANIFEST_FILE, manifest)
        return result


def _encode(states: CapturedStates, names, compression: str,
            attention_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
    """The hidden tensors as stored, on the CPU: as captured, or fp8 + scale; and for each lossy one its squared
    error and squared norm summed over the real tokens."""
    out, sq_error = {}, {}
    for name in names:
        x = getattr(states, name)  # [B, T, D]
        if compression == "none" or name not in LOSSY_NAMES:
            out[name] = x.cpu()
            continue
        q, scale = quantize_fp8(x)
        x = x.float()
        err = x - dequantize_fp8(q, scale, torch.float32)
        sq_error[name] = (_token_sum(err * err, attention_mask), _token_sum(x * x, attention_mask))
        out[name], out[name + ".scale"] = q.cpu(), scale.cpu()
    return out, sq_error


def _token_sum(x: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """The sum of x [B, T, D] over the real tokens, the same float however many threads reduce: each token's row
    in fp64 (one thread per row), the rows exactly (math.fsum)."""
    rows = x.sum(-1, dtype=torch.float64)[attention_mask]  # [real tokens]
    return math.fsum(rows.cpu().tolist())

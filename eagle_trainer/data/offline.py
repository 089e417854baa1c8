"""Offline mode: the frozen target's captured states, dumped once to disk and read back for training.

`dump_hidden_states` runs `FrozenTarget.capture` over a tokenised data set and stores, per example, what
training forms its TargetOutputs from; `OfflineStore` reads it back as OfflineBatches in the order of the
online `batches` (example i of a dump is row i of the data set it was made from), and
`targets.offline.OfflineTarget` forms the teacher through the same `teacher_outputs` as online training.

A dump directory (rank 0 writes all of it, in this order):

    shard-{k:05d}.safetensors   about shard_bytes each, examples in id order; for example i (unpadded, T = its length):
        {i}.input_ids     int32 [T]
        {i}.loss_mask     bool  [T]
        {i}.aux_hidden    [T, 3*Ht]  aux layer outputs, low/mid/high concatenated
        {i}.final_hidden  [T, Ht]    after the final norm: the teacher is rebuilt from it
        {i}.argmax_valid  bool  [T]  the full-vocab target argmax lies in the draft vocab
    index.json          example id -> {"file", "tokens"}
    vocab.safetensors   the draft vocab map (d2t, t2d) it was made with (`eagle-data dump` copies it)
    run.json            how it ran: world_size, ep, sharded, created, seconds, tokens_per_s
    manifest.json       written last: a directory without it is not a complete dump (crashed or running)
    The hidden tensors are in the target dtype. With compression "fp8" the draft's input aux_hidden
    is stored in float8_e4m3fn with a per-row (per-token) scale {i}.<name>.scale fp32 [T, 1] =
    absmax / 448 (dequantised = q * scale); final_hidden stays exact, because the teacher's softmax over a sharp
    target distribution magnifies its error (2.6% relative error in final_hidden moved the tiny test target's
    teacher by 0.07 in L1). The manifest lists the compressed tensors and their relative Frobenius error.
Dumps of the older per-rank layout (shard-r{rank:03d}-{k:05d}.safetensors, index.r{rank:03d}.json) read the same:
the reader takes file names from index.json.

Training with data.pack reads the same examples per batch and lays their tokens and states back to back
in one row (`collate_offline(..., pack=True)`), as the online packed batch holds them.

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
import copy
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file
from tqdm import tqdm

from eagle_trainer.data.dataset import batch_indices, collate
from eagle_trainer.types import CapturedStates, OfflineBatch

FORMAT_VERSION = 1
VOCAB_FILE = "vocab.safetensors"  # the draft vocab map the dump was made with (d2t, t2d), copied by the CLI
COMPRESSIONS = ("none", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# what a dump stores of CapturedStates (a stored tensor of another name, e.g. an older dump's last_hidden, is not read)
HIDDEN_NAMES = ("aux_hidden", "final_hidden")
LOSSY_NAMES = ("aux_hidden",)  # what compression="fp8" quantises; the teacher's input stays exact
REQUIRED_FIELDS = ("target", "vocab_map_sha256", "data_fingerprint")  # the caller's part of the manifest
RUN_FILE = "run.json"  # how the dump ran (ranks, ep, sharded, when, how fast): not part of its contents
_MANIFEST, _INDEX = "manifest.json", "index.json"
_DUMP_HINT = "make one with `eagle-data dump --target PATH --data FILE --vocab FILE --out DIR`"


def vocab_map_sha256(d2t: torch.Tensor, t2d: torch.Tensor) -> str:
    """A hash of the draft vocab map (d2t int64 [Vd], t2d bool [V]): a dump's teacher mask depends on it."""
    h = hashlib.sha256(f"{d2t.numel()},{t2d.numel()}".encode())
    h.update(d2t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    h.update(t2d.detach().to("cpu", torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()


def dump_manifest(target_path: str | Path, target_fingerprint: str, architecture: str, d2t: torch.Tensor,
                  t2d: torch.Tensor, data_fingerprint: str) -> dict:
    """The caller's part of a dump's manifest: which target (`targets.loading.target_fingerprint` of its
    checkpoint), vocab map and data set it was made from."""
    return {
        "target": {"architecture": architecture, "path": str(Path(target_path).resolve()),
                   "fingerprint": target_fingerprint},
        "vocab_map_sha256": vocab_map_sha256(d2t, t2d),
        "data_fingerprint": data_fingerprint,
    }


def expected_manifest(target_fingerprint: str, architecture: str, aux_layer_ids, d2t: torch.Tensor,
                      t2d: torch.Tensor) -> dict:
    """What a training run needs of a dump, for `OfflineStore.check` (`target_fingerprint`: see dump_manifest)."""
    return {
        "target.fingerprint": target_fingerprint,
        "target.architecture": architecture,
        "aux_layer_ids": list(aux_layer_ids),
        "vocab_map_sha256": vocab_map_sha256(d2t, t2d),
    }


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8: x [..., D] -> (q float8_e4m3fn [..., D], scale fp32 [..., 1]); an all-zero row gets scale 1."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


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
    return (name in (_MANIFEST, _INDEX, RUN_FILE) or (name.startswith("shard-") and name.endswith(".safetensors"))
            or (name.startswith("index.r") and name.endswith(".json")))


def _clear_old_dump(out_dir: Path) -> None:
    """Remove what an earlier dump into out_dir left: the manifest first (the directory stops passing for
    complete), then its index, run record and shards."""
    (out_dir / _MANIFEST).unlink(missing_ok=True)
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
        _write_json(self.out_dir / _INDEX, {str(i): self.index[str(i)] for i in range(num_examples)})
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
        _write_json(self.out_dir / _MANIFEST, manifest)
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


def collate_offline(examples: list[dict[str, torch.Tensor]], pad_id: int, pack: bool = False) -> OfflineBatch:
    """Stored examples into an OfflineBatch as `collate` lays out their tokens: right-padded [B, T, ...] with
    zero states (argmax_valid False) on padding, or with `pack` back to back in one row [1, N, ...]."""
    tokens = collate(examples, pad_id, pack)  # [B, T] or [1, N]
    num_rows, max_len = tokens.input_ids.shape

    def stack(name: str) -> torch.Tensor | None:
        if name not in examples[0]:
            return None
        if pack:
            return torch.cat([ex[name] for ex in examples])[None]  # [1, N, ...]
        first = examples[0][name]
        out = first.new_zeros((num_rows, max_len, *first.shape[1:]))  # [B, T, ...]
        for row, ex in enumerate(examples):
            out[row, :ex[name].shape[0]] = ex[name]
        return out

    states = CapturedStates(aux_hidden=stack("aux_hidden"), final_hidden=stack("final_hidden"),
                            argmax_valid=stack("argmax_valid"))
    scales = {name: stack(name + ".scale") for name in HIDDEN_NAMES if name + ".scale" in examples[0]}
    return OfflineBatch(tokens.input_ids, tokens.loss_mask, tokens.attention_mask, states, scales,
                        position_ids=tokens.position_ids, cu_seqlens=tokens.cu_seqlens)


class OfflineStore:
    """A complete dump directory, read back: `example(i)`, `check(expected)`, `batches(...)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / _MANIFEST).is_file():
            raise ValueError(f"{str(self.path)!r} is not a complete offline dump (no {_MANIFEST}: the dump crashed, "
                             f"is still running, or never ran); {_DUMP_HINT}")
        self.manifest = json.loads((self.path / _MANIFEST).read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"offline dump {str(self.path)!r} has format_version "
                             f"{self.manifest.get('format_version')}, this code reads {FORMAT_VERSION}; dump it again")
        index = json.loads((self.path / _INDEX).read_text())
        self._files = [index[str(i)]["file"] for i in range(self.manifest["num_examples"])]  # by example id
        self._tokens = [index[str(i)]["tokens"] for i in range(self.manifest["num_examples"])]
        self._ids = list(range(len(self._files)))  # position in this store -> example id (see `select`)
        self.dtype: torch.dtype = getattr(torch, self.manifest["dtype"])
        self.hidden_names = [n for n in HIDDEN_NAMES if n in self.manifest["contents"]]
        self._handles: dict[str, object] = {}  # file -> open safe_open handle (mmapped), kept for the store's life
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def lengths(self) -> list[int]:
        """Token count of each example, in this store's order."""
        return [self._tokens[i] for i in self._ids]

    def select(self, indices) -> "OfflineStore":
        """A view of some examples, as `datasets.Dataset.select`: its example j is this store's example
        indices[j] (e.g. a held-out tail: `store.select(range(n - k, n))`). Shares the open files."""
        view = copy.copy(self)
        view._ids = [self._ids[int(j)] for j in indices]
        return view

    def _handle(self, file: str):
        with self._lock:
            if file not in self._handles:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            return self._handles[file]

    def example(self, i: int, dequantize: bool = True) -> dict[str, torch.Tensor]:
        """Example i, unpadded: input_ids int64 [T], loss_mask and argmax_valid bool [T], and the hidden
        tensors ([T, 3*Ht] aux_hidden, [T, Ht] final_hidden) in the manifest dtype.
        `dequantize=False` leaves fp8 tensors as stored and adds their `<name>.scale` [T, 1]."""
        i = self._ids[i]
        f = self._handle(self._files[i])
        out = {"input_ids": f.get_tensor(f"{i}.input_ids").to(torch.int64), "loss_mask": f.get_tensor(f"{i}.loss_mask"),
               "argmax_valid": f.get_tensor(f"{i}.argmax_valid")}
        for name in self.hidden_names:
            t = f.get_tensor(f"{i}.{name}")
            if name in self.manifest["compressed"] and dequantize:
                t = dequantize_fp8(t, f.get_tensor(f"{i}.{name}.scale"), self.dtype)
            elif name in self.manifest["compressed"]:
                out[name + ".scale"] = f.get_tensor(f"{i}.{name}.scale")
            out[name] = t
        return out

    def _field(self, dotted: str):
        value = self.manifest
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def check(self, expected: dict) -> None:
        """Refuse a dump made for another run. `expected` maps manifest fields by dotted name ("target.fingerprint",
        "aux_layer_ids", "vocab_map_sha256", ...) to the run's values (see `expected_manifest`). Every mismatch is
        listed in one ValueError."""
        problems = []
        for key, want in expected.items():
            have = self._field(key)
            if have != json.loads(json.dumps(want)):  # tuples compare as the lists JSON stores
                problems.append(f"{key}: stored {have!r}, expected {want!r}")
        if problems:
            listed = "".join(f"\n  {p}" for p in problems)
            raise ValueError(f"offline dump {str(self.path)!r} does not match this run:{listed}\nRe-run `eagle-data "
                             "dump` for this target, aux layers and vocab map, or point data.offline_path at the "
                             "dump made for them")

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                pad_id: int = 0, start: int = 0, prefetch: int = 2, pin_memory: bool = False,
                pack: bool = False) -> Iterator[OfflineBatch]:
        """One epoch of this rank's OfflineBatches in `batch_indices` order (the online `batches` order), from
        batch `start` on; `pack` packs each batch into one row. A background thread reads `prefetch` batches ahead
        (0: read in the caller's thread)."""
        def read() -> Iterator[OfflineBatch]:
            for indices in batch_indices(len(self), batch_size, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank,
                                         world_size=world_size, start=start):
                # fp8 stays fp8 until the batch is on its device (OfflineBatch.to dequantises there)
                batch = collate_offline([self.example(int(i), dequantize=False) for i in indices], pad_id, pack)
                yield _pinned(batch) if pin_memory else batch

        return read() if prefetch < 1 else _prefetched(read(), prefetch)

    def close(self) -> None:
        with self._lock:
            self._handles.clear()


def _pinned(batch: OfflineBatch) -> OfflineBatch:
    pin = lambda x: None if x is None else x.pin_memory()
    s = batch.states
    return OfflineBatch(pin(batch.input_ids), pin(batch.loss_mask), pin(batch.attention_mask), CapturedStates(
        aux_hidden=pin(s.aux_hidden), final_hidden=pin(s.final_hidden), argmax_valid=pin(s.argmax_valid)), {name: pin(scale) for name, scale in batch.scales.items()},
        position_ids=pin(batch.position_ids), cu_seqlens=pin(batch.cu_seqlens))


_DONE = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Yield `items`, produced `depth` ahead by a background thread (a bounded queue). An exception in the
    thread is raised here; closing this generator (the consumer stopped early) ends the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # handed to the consumer
            put((None, e))

    thread = threading.Thread(target=work, name="offline-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()

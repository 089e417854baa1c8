"""Offline mode: the frozen target's captured states, dumped once to disk and read back for training.

`dump_hidden_states` runs `FrozenTarget.capture` over a tokenised data set and stores, per example, what
training forms its TargetOutputs from; `OfflineStore` reads it back as OfflineBatches in the order of the
online `batches` (example i of a dump is row i of the data set it was made from), and
`targets.offline.OfflineTarget` forms the teacher through the same `teacher_outputs` as online training.

A dump directory:

    manifest.json           written last: a directory without it is not a complete dump (crashed or running)
    vocab.safetensors       the draft vocab map (d2t, t2d) it was made with (`eagle-data dump` copies it)
    index.json              example id -> {"file", "tokens"} over all ranks (rank 0 merges the per-rank ones)
    index.r{rank:03d}.json  one rank's examples, bytes written and fp8 error sums
    shard-r{rank:03d}-{k:05d}.safetensors   about shard_bytes each; for example i (unpadded, T = its length):
        {i}.input_ids     int32 [T]
        {i}.loss_mask     bool  [T]
        {i}.aux_hidden    [T, 3*Ht]  aux layer outputs, low/mid/high concatenated
        {i}.final_hidden  [T, Ht]    after the final norm: the teacher is rebuilt from it
        {i}.argmax_valid  bool  [T]  the full-vocab target argmax lies in the draft vocab
    The hidden tensors are in the target dtype. With compression "fp8" the draft's input aux_hidden
    is stored in float8_e4m3fn with a per-row (per-token) scale {i}.<name>.scale fp32 [T, 1] =
    absmax / 448 (dequantised = q * scale); final_hidden stays exact, because the teacher's softmax over a sharp
    target distribution magnifies its error (2.6% relative error in final_hidden moved the tiny test target's
    teacher by 0.07 in L1). The manifest lists the compressed tensors and their relative Frobenius error.

Training with data.pack reads the same examples per batch and lays their tokens and states back to back
in one row (`collate_offline(..., pack=True)`), as the online packed batch holds them.

Rank r of W dumps the examples i with i % W == r. Rows of a batched capture differ from the same example
captured alone by float rounding (padding changes the matmul shapes); with batch_size=1 a dump is bit-exact
and the same for any world size.

Shapes: B batch, T tokens, Ht target hidden.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from safetensors import safe_open
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


def _file_rank(name: str) -> int | None:
    """The rank in `shard-r003-00001.safetensors` or `index.r003.json`, else None."""
    for prefix in ("shard-r", "index.r"):
        if name.startswith(prefix) and name[len(prefix):len(prefix) + 3].isdigit():
            return int(name[len(prefix):len(prefix) + 3])
    return None


def _clear_old_dump(out_dir: Path, rank: int, world_size: int) -> None:
    """Remove what an earlier dump into out_dir left: this rank's files; on rank 0 also the manifest (first, so
    the directory stops passing for complete), the merged index and the files of ranks beyond this world."""
    if rank == 0:
        for name in (_MANIFEST, _INDEX):
            (out_dir / name).unlink(missing_ok=True)
    for f in out_dir.iterdir():
        r = _file_rank(f.name)
        if r is not None and (r == rank or (rank == 0 and r >= world_size)):
            f.unlink()


class _ShardWriter:
    """Collects examples' tensors and writes them as shard files of about `shard_bytes` each."""

    def __init__(self, out_dir: Path, rank: int, shard_bytes: int):
        self.out_dir, self.rank, self.shard_bytes = out_dir, rank, shard_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.size, self.num_files, self.bytes = 0, 0, 0

    @property
    def name(self) -> str:
        return f"shard-r{self.rank:03d}-{self.num_files:05d}.safetensors"

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


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


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
    progress: bool = True,
    shard_bytes: int = 1 << 30,
    pad_id: int = 0,
) -> dict:
    """Capture this rank's examples of `dataset` with `target` (a FrozenTarget) and store them in `out_dir`.

    `manifest` holds the caller's fields (REQUIRED_FIELDS, see `dump_manifest`); the rest is added here. With
    world_size > 1 every rank calls this (torch.distributed initialised) and rank 0 writes the manifest after a
    barrier. Returns the whole dump's num_examples, num_tokens, bytes, bytes_per_token, compression_error
    ({name: relative Frobenius error}, empty for "none"), and this rank's seconds.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r} is not one of {COMPRESSIONS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise ValueError(f"the dump manifest lacks {missing}; build it with data.offline.dump_manifest(...)")
    start_time = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_old_dump(out_dir, rank, world_size)
    _barrier(world_size)  # no rank writes before rank 0 has removed an old manifest

    names = HIDDEN_NAMES
    device = target.target_head().device
    lengths = example_lengths(dataset)
    ids = range(rank, len(dataset), world_size)
    bar = tqdm(total=int(lengths[rank::world_size].sum()), unit="tok", unit_scale=True, desc="dump",
               disable=not progress or rank != 0, dynamic_ncols=True)
    writer = _ShardWriter(out_dir, rank, shard_bytes)
    index, sq_error = {}, {name: [0.0, 0.0] for name in names if name in LOSSY_NAMES}  # name -> [sum (x - dq)^2, sum x^2]
    for first in range(0, len(ids), batch_size):
        chunk = list(ids[first:first + batch_size])
        rows = dataset[chunk]
        batch = collate([{"input_ids": x, "loss_mask": m} for x, m in zip(rows["input_ids"], rows["loss_mask"])],
                        pad_id)  # [B, T]
        states = target.capture(batch.to(device), argmax=True)
        stored = _encode(states, names, compression, batch.attention_mask.to(device), sq_error)  # name -> [B, T, ...]
        argmax_valid = states.argmax_valid.cpu()
        for row, i in enumerate(chunk):
            n = int(lengths[i])
            tensors = {"input_ids": batch.input_ids[row, :n].to(torch.int32), "loss_mask": batch.loss_mask[row, :n],
                       "argmax_valid": argmax_valid[row, :n]}
            tensors.update({name: t[row, :n] for name, t in stored.items()})
            # clone: a row is a view of the batch, and safetensors refuses tensors that share memory
            index[str(i)] = {"file": writer.add(i, {k: v.clone() for k, v in tensors.items()}), "tokens": n}
        bar.update(int(batch.attention_mask.sum()))
    writer.flush()
    bar.close()
    _write_json(out_dir / f"index.r{rank:03d}.json", {
        "rank": rank, "examples": index, "num_tokens": int(lengths[rank::world_size].sum()), "bytes": writer.bytes,
        "sq_error": sq_error if compression == "fp8" else {},
    })
    _barrier(world_size)
    if rank == 0:
        head = target.target_head()
        _finish(out_dir, world_size, len(dataset), {
            **manifest, "format_version": FORMAT_VERSION, "aux_layer_ids": list(target.aux_layer_ids),
            "dtype": str(head.dtype).removeprefix("torch."), "hidden_size": int(head.shape[-1]),
            "contents": ["input_ids", "loss_mask", *names, "argmax_valid"],
            "compression": compression, "world_size": world_size,
            "compressed": [n for n in names if n in LOSSY_NAMES] if compression == "fp8" else [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
    _barrier(world_size)
    written = json.loads((out_dir / _MANIFEST).read_text())
    keys = ("num_examples", "num_tokens", "bytes", "bytes_per_token", "compression_error")
    return {**{k: written[k] for k in keys}, "seconds": time.perf_counter() - start_time}


def _encode(states: CapturedStates, names, compression: str, attention_mask: torch.Tensor,
            sq_error: dict) -> dict[str, torch.Tensor]:
    """The hidden tensors as stored, on the CPU: as captured, or fp8 + scale (error summed over real tokens)."""
    out = {}
    for name in names:
        x = getattr(states, name)  # [B, T, D]
        if compression == "none" or name not in LOSSY_NAMES:
            out[name] = x.cpu()
            continue
        q, scale = quantize_fp8(x)
        real = attention_mask[..., None]  # [B, T, 1]: padding rows do not count
        x = x.float()
        sq_error[name][0] += float(((x - dequantize_fp8(q, scale, torch.float32)) ** 2 * real).sum())
        sq_error[name][1] += float((x**2 * real).sum())
        out[name], out[name + ".scale"] = q.cpu(), scale.cpu()
    return out


def _finish(out_dir: Path, world_size: int, num_examples: int, manifest: dict) -> None:
    """Rank 0, after every rank wrote its index: merge the indexes, then write the manifest (last)."""
    parts = [json.loads((out_dir / f"index.r{r:03d}.json").read_text()) for r in range(world_size)]
    index = {k: v for part in parts for k, v in part["examples"].items()}
    assert len(index) == num_examples, (len(index), num_examples)
    num_tokens, num_bytes = sum(p["num_tokens"] for p in parts), sum(p["bytes"] for p in parts)
    error = {}
    if manifest["compression"] == "fp8":
        for name in parts[0]["sq_error"]:
            err, norm = (sum(p["sq_error"][name][j] for p in parts) for j in (0, 1))
            error[name] = math.sqrt(err / norm) if norm > 0 else 0.0
    _write_json(out_dir / _INDEX, {str(i): index[str(i)] for i in range(num_examples)})
    _write_json(out_dir / _MANIFEST, {
        **manifest, "compression_error": error, "num_examples": num_examples, "num_tokens": num_tokens,
        "bytes": num_bytes, "bytes_per_token": num_bytes / max(num_tokens, 1),
    })


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

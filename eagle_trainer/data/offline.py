"""Offline mode: the frozen target's captured states, dumped once to disk and read back for training.

This module is the dump's format (layout, manifest, fp8 encoding) and its reader. `data/dump.py:dump_hidden_states`
runs `FrozenTarget.capture` over a tokenised data set and stores, per example, what training forms its
TargetOutputs from; `OfflineStore` reads it back as OfflineBatches in the order of the
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

Shapes: B batch, T tokens, Ht target hidden.
"""

from __future__ import annotations

import copy
import hashlib
import json
import queue
import threading
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

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
MANIFEST_FILE, INDEX_FILE = "manifest.json", "index.json"
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
        if not (self.path / MANIFEST_FILE).is_file():
            raise ValueError(f"{str(self.path)!r} is not a complete offline dump (no {MANIFEST_FILE}: the dump crashed, "
                             f"is still running, or never ran); {_DUMP_HINT}")
        self.manifest = json.loads((self.path / MANIFEST_FILE).read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"offline dump {str(self.path)!r} has format_version "
                             f"{self.manifest.get('format_version')}, this code reads {FORMAT_VERSION}; dump it again")
        index = json.loads((self.path / INDEX_FILE).read_text())
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

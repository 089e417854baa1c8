"""Tokenised chat datasets: build (cached with HF `datasets`), collate into Batches, shard into batches.

`build_dataset` reads a chat JSONL file, renders and tokenises each conversation with its loss mask, and
streams the rows into an Arrow file under the cache directory, which `datasets` then memory-maps. The
cache entry is keyed by a fingerprint of everything that changes the rows: the data file's content, the
tokenizer (vocabulary, special tokens, chat template), the chat template rendered with (data.chat_template, else the
tokenizer's) and its kwargs, empty_think, max_length, thinking, truncate and on_error. A second build with the same
key reads the Arrow file and the saved stats back without tokenising. Several processes must not build the same key
at once: let rank 0 build, then barrier.

Columns: input_ids list[int32] [T], loss_mask list[bool] [T]. Batch shapes: [B, T] right-padded, or with
data.pack [1, N] (the batch's examples back to back, position_ids and cu_seqlens marking them; see types.Batch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter

from eagle_trainer.config import DataConfig
from eagle_trainer.data.chat import BadLineError, check_on_error, check_thinking, iter_chat_jsonl, line_error
from eagle_trainer.data.template import ChatTemplate, load_chat_template, tokenize_conversation
from eagle_trainer.types import Batch

FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int32")), "loss_mask": datasets.List(datasets.Value("bool"))}
)
_CACHE_VERSION = 2  # bump when the row format or the masking rule changes
_DATA_FILE = "data.arrow"
_STATS_FILE = "stats.json"


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids and the rendered text: vocabulary, merges, specials, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()


def dataset_fingerprint(cfg: DataConfig, tokenizer, path: str | Path, template: ChatTemplate) -> str:
    key = {
        "version": _CACHE_VERSION, "data": file_sha256(path), "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": cfg.max_length, "thinking": cfg.thinking, "truncate": cfg.truncate, "on_error": cfg.on_error,
        "chat_template": hashlib.sha256(template.source.encode()).hexdigest(), "template_kwargs": template.kwargs,
        "empty_think": template.empty_think,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_dataset(
    cfg: DataConfig,
    tokenizer,
    cache_dir: str | Path | None = None,
    *,
    path: str | Path | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Tokenise `path` (default cfg.path) into a memory-mapped Dataset, cached under `cache_dir`, rendered with
    data.chat_template (else the tokenizer's template), data.chat_template_kwargs and data.empty_think.

    Returns the dataset and stats: num_conversations (valid lines read), num_examples (rows kept),
    num_tokens and num_loss_tokens (over kept rows), skipped (bad lines by reason), truncated (rows cut
    to max_length), dropped (by reason: too_long when truncate is off, no_loss_tokens after truncation),
    fingerprint, from_cache.
    """
    check_thinking(cfg.thinking)
    check_on_error(cfg.on_error)
    if cfg.max_length < 2:
        raise ValueError(f"data.max_length={cfg.max_length} is too small; use at least 2 (e.g. 2048)")
    path = Path(path if path is not None else cfg.path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist; set data.path to a chat JSONL file")
    cache_dir = cache_dir if cache_dir is not None else cfg.cache_dir
    if cache_dir is None:
        raise ValueError("no tokenisation cache directory; pass cache_dir or set data.cache_dir")
    template = load_chat_template(tokenizer, cfg.chat_template, cfg.chat_template_kwargs, cfg.empty_think)
    fingerprint = dataset_fingerprint(cfg, tokenizer, path, template)
    entry = Path(cache_dir) / f"tokenized_{path.stem}_{fingerprint}"
    if not (entry / _STATS_FILE).is_file():
        _write_entry(entry, cfg, tokenizer, template, path, fingerprint)
        from_cache = False
    else:
        from_cache = True
    stats = json.loads((entry / _STATS_FILE).read_text())
    stats["from_cache"] = from_cache
    return datasets.Dataset.from_file(str(entry / _DATA_FILE)), stats


def _write_entry(entry: Path, cfg: DataConfig, tokenizer, template: ChatTemplate, path: Path, fingerprint: str) -> None:
    """Tokenise into a temporary directory, then rename it into place, so a crash leaves no half entry."""
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skipped: Counter = Counter()
    dropped = Counter({"too_long": 0, "no_loss_tokens": 0})
    stats = dict(num_conversations=0, num_examples=0, num_tokens=0, num_loss_tokens=0, truncated=0)
    try:
        with ArrowWriter(features=FEATURES, path=str(tmp / _DATA_FILE)) as writer:
            lines = iter_chat_jsonl(path, thinking=cfg.thinking, on_error=cfg.on_error, skipped=skipped)
            for line_no, messages in lines:
                tok = _tokenize_line(tokenizer, template, messages, cfg, path, line_no, skipped)
                if tok is None:
                    continue
                stats["num_conversations"] += 1
                if tok.truncated and not cfg.truncate:
                    dropped["too_long"] += 1
                    continue
                num_loss = sum(tok.loss_mask)
                if num_loss == 0:
                    dropped["no_loss_tokens"] += 1
                    continue
                stats["truncated"] += tok.truncated
                stats["num_examples"] += 1
                stats["num_tokens"] += len(tok.input_ids)
                stats["num_loss_tokens"] += num_loss
                writer.write({"input_ids": tok.input_ids, "loss_mask": tok.loss_mask})
            writer.finalize()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.update(skipped=dict(skipped), dropped=dict(dropped), fingerprint=fingerprint, data_path=str(path))
    if stats["num_examples"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"{path}: no usable conversation (skipped {dict(skipped)}, dropped {dict(dropped)}); "
            f"check the file, or raise data.max_length={cfg.max_length} / set data.truncate=true"
        )
    (tmp / _STATS_FILE).write_text(json.dumps(stats, indent=1))
    if not (entry / _STATS_FILE).is_file():
        shutil.rmtree(entry, ignore_errors=True)  # a half entry from an older crash
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / _STATS_FILE).is_file():
                raise
    # Another process finished the same entry first: its rows are the same, keep those.
    shutil.rmtree(tmp, ignore_errors=True)


def _tokenize_line(tokenizer, template, messages, cfg, path, line_no, skipped):
    """tokenize_conversation, with a conversation the template cannot render or mask raised as a `file:line` error,
    or skipped and counted."""
    try:
        return tokenize_conversation(tokenizer, messages, max_length=cfg.max_length, template=template)
    except BadLineError as e:
        if cfg.on_error == "skip":
            skipped[e.reason] += 1
            return None
        raise line_error(path, line_no, e) from None


def collate(examples: list[dict], pad_id: int, pack: bool = False) -> Batch:
    """Examples ({"input_ids", "loss_mask"}) into a Batch: right-padded rows [B, T] with padding masked out of
    both masks, or with `pack` one row [1, N] holding them back to back (N = their total length, no padding),
    with position_ids restarting at each example and cu_seqlens [B+1] at their starts."""
    if pack:
        lengths = torch.tensor([len(ex["input_ids"]) for ex in examples])
        input_ids = torch.cat([torch.as_tensor(ex["input_ids"], dtype=torch.int64) for ex in examples])[None]  # [1, N]
        loss_mask = torch.cat([torch.as_tensor(ex["loss_mask"], dtype=torch.bool) for ex in examples])[None]
        cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)  # [B+1]
        starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.int64), lengths)  # [N]: each token's document start
        position_ids = (torch.arange(input_ids.shape[1]) - starts)[None]
        return Batch(input_ids, loss_mask, torch.ones_like(loss_mask), position_ids=position_ids,
                     cu_seqlens=cu_seqlens)
    lengths = [len(ex["input_ids"]) for ex in examples]
    num_rows, max_len = len(examples), max(lengths)
    input_ids = torch.full((num_rows, max_len), pad_id, dtype=torch.int64)  # [B, T]
    loss_mask = torch.zeros((num_rows, max_len), dtype=torch.bool)
    attention_mask = torch.zeros((num_rows, max_len), dtype=torch.bool)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.int64)
        loss_mask[row, :n] = torch.as_tensor(ex["loss_mask"], dtype=torch.bool)
        attention_mask[row, :n] = True
    return Batch(input_ids=input_ids, loss_mask=loss_mask, attention_mask=attention_mask)


def num_batches(num_examples: int, batch_size: int, world_size: int = 1) -> int:
    """Batches each rank gets per epoch (the ragged tail is dropped so every rank gets the same number)."""
    return num_examples // (batch_size * world_size)


def batch_indices(
    num_examples: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1,
    start: int = 0,
) -> Iterator[np.ndarray]:
    """This rank's example indices per batch of one epoch, from batch `start` on (resume skips without reading).

    The order is a permutation seeded by (seed, epoch), the same on every rank; global batch j holds
    positions [j*B*W, (j+1)*B*W) of it and rank r takes the r-th slice of B, so ranks are disjoint.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    order = np.arange(num_examples)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    step = batch_size * world_size
    for j in range(start, num_batches(num_examples, batch_size, world_size)):
        yield order[j * step + rank * batch_size : j * step + (rank + 1) * batch_size]


def batches(
    dataset: datasets.Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
    pad_id: int = 0,
    start: int = 0,
    pack: bool = False,
) -> Iterator[Batch]:
    """One epoch of this rank's Batches, in `batch_indices` order (from batch `start` on); `pack`: each batch's
    examples packed into one row (see `collate`). Which examples make a batch does not depend on `pack`."""
    for indices in batch_indices(len(dataset), batch_size, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank,
                                 world_size=world_size, start=start):
        yield collate(examples_at(dataset, indices.tolist()), pad_id, pack)


def examples_at(dataset: datasets.Dataset, indices: list[int]) -> list[dict]:
    """The rows at `indices` as examples ({"input_ids", "loss_mask"}) for `collate`."""
    rows = dataset[indices]  # column dict: {"input_ids": [...], "loss_mask": [...]}
    return [{"input_ids": ids, "loss_mask": m} for ids, m in zip(rows["input_ids"], rows["loss_mask"])]

"""Tokenised dataset: stats, truncation / drop counts, the cache key, collate (padded and packed), and
rank-disjoint batches."""

import json

import pytest
import torch

from eagle_trainer.config import DataConfig
from eagle_trainer.data import dataset as dataset_module
from eagle_trainer.data.dataset import batches, build_dataset, collate, num_batches
from eagle_trainer.data.template import tokenize_conversation
from eagle_trainer.data.vocab import count_loss_tokens
from eagle_trainer.evaluate.acceptance import prompts_from_dataset
from eagle_trainer.targets.tiny_tokenizer import save_tiny_tokenizer, synthetic_corpus


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def conversation(i, lines):
    return [{"role": "user", "content": lines[2 * i]}, {"role": "assistant", "content": lines[2 * i + 1]}]


def write_data(path, num_conversations, extra=()):
    lines = synthetic_corpus(2 * num_conversations, seed=1)
    records = [json.dumps({"messages": conversation(i, lines)}) for i in range(num_conversations)]
    path.write_text("\n".join(records + list(extra)) + "\n")
    return path


def test_build_stats_and_rows(tmp_path, tokenizer):
    path = write_data(tmp_path / "d.jsonl", 12, extra=["not json"])
    cfg = DataConfig(path=str(path), on_error="skip")
    ds, stats = build_dataset(cfg, tokenizer, tmp_path / "cache")
    assert len(ds) == 12 and set(ds.column_names) == {"input_ids", "loss_mask"}
    assert stats["num_conversations"] == 12 and stats["num_examples"] == 12
    assert stats["skipped"] == {"bad_json": 1}
    assert stats["truncated"] == 0 and stats["dropped"] == {"too_long": 0, "no_loss_tokens": 0}
    assert stats["num_tokens"] == sum(len(r) for r in ds["input_ids"])
    assert stats["num_loss_tokens"] == sum(sum(m) for m in ds["loss_mask"])
    lines = synthetic_corpus(24, seed=1)
    expected = tokenize_conversation(tokenizer, conversation(3, lines))
    assert ds[3]["input_ids"] == expected.input_ids and ds[3]["loss_mask"] == expected.loss_mask


def test_a_cut_reply_loses_its_end_of_turn_in_rows_vocab_counts_and_eval_prompts(tmp_path, tokenizer):
    lines = synthetic_corpus(6, seed=3)
    convs = [conversation(i, lines) for i in range(3)]
    marked = [convs[0], [convs[1][0], {**convs[1][1], "truncated": True}], convs[2]]
    built = {}
    for name, data in (("plain", convs), ("marked", marked)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in data))
        built[name] = build_dataset(DataConfig(path=str(path)), tokenizer, tmp_path / "cache")
    (plain, plain_stats), (cut, cut_stats) = built["plain"], built["marked"]
    assert cut["input_ids"] == plain["input_ids"] and cut_stats["num_loss_tokens"] == plain_stats["num_loss_tokens"] - 1
    assert cut["loss_mask"][0] == plain["loss_mask"][0] and cut["loss_mask"][2] == plain["loss_mask"][2]
    assert plain["loss_mask"][1][-2:] == [True, False]  # <|im_end|>, then the "\n" after it
    assert cut["loss_mask"][1] == plain["loss_mask"][1][:-2] + [False, False]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    counts = count_loss_tokens(plain, len(tokenizer)) - count_loss_tokens(cut, len(tokenizer))
    assert counts[end] == 1 and counts.abs().sum() == 1
    assert prompts_from_dataset(cut, 3) == prompts_from_dataset(plain, 3)


def test_truncate_and_drop_are_counted(tmp_path, tokenizer):
    lines = synthetic_corpus(2, seed=2)
    long_user = [{"role": "user", "content": " ".join(lines) * 4}, {"role": "assistant", "content": "Ka."}]
    long_answer = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " ".join(lines) * 4}]
    short = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Ka."}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (long_user, long_answer, short)))
    ds, stats = build_dataset(DataConfig(path=str(path), max_length=32), tokenizer, tmp_path / "cache")
    assert stats["truncated"] == 1 and stats["dropped"] == {"too_long": 0, "no_loss_tokens": 1}
    assert len(ds) == 2 and max(len(r) for r in ds["input_ids"]) == 32
    ds, stats = build_dataset(DataConfig(path=str(path), max_length=32, truncate=False), tokenizer, tmp_path / "cache")
    assert stats["truncated"] == 0 and stats["dropped"] == {"too_long": 2, "no_loss_tokens": 0} and len(ds) == 1


def test_bad_line_raises_with_location(tmp_path, tokenizer):
    path = write_data(tmp_path / "d.jsonl", 3, extra=['{"messages": []}'])
    with pytest.raises(ValueError, match=f"{path}:4:.*empty_conversation"):
        build_dataset(DataConfig(path=str(path)), tokenizer, tmp_path / "cache")
    with pytest.raises(ValueError, match="data.thinking"):
        build_dataset(DataConfig(path=str(path), thinking="hide"), tokenizer, tmp_path / "cache")


def test_cache_hit_then_miss_on_changed_file_or_tokenizer(tmp_path, tokenizer, monkeypatch):
    path = write_data(tmp_path / "d.jsonl", 8)
    cfg = DataConfig(path=str(path))
    first, stats1 = build_dataset(cfg, tokenizer, tmp_path / "cache")
    assert not stats1["from_cache"]

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(dataset_module, "tokenize_conversation", no_tokenising)
        second, stats2 = build_dataset(cfg, tokenizer, tmp_path / "cache")
    assert stats2["from_cache"] and stats2["fingerprint"] == stats1["fingerprint"]
    assert second["input_ids"] == first["input_ids"] and second["loss_mask"] == first["loss_mask"]
    assert second.cache_files and second.cache_files[0]["filename"].startswith(str(tmp_path / "cache"))

    write_data(path, 9)
    third, stats3 = build_dataset(cfg, tokenizer, tmp_path / "cache")
    assert not stats3["from_cache"] and len(third) == 9 and stats3["fingerprint"] != stats1["fingerprint"]
    _, stats4 = build_dataset(DataConfig(path=str(path), max_length=64), tokenizer, tmp_path / "cache")
    assert not stats4["from_cache"]
    other = save_tiny_tokenizer(tmp_path / "tok2", vocab_size=512)
    _, stats5 = build_dataset(cfg, other, tmp_path / "cache")
    assert not stats5["from_cache"] and stats5["fingerprint"] != stats3["fingerprint"]


def test_collate_right_pads_and_masks_padding():
    examples = [{"input_ids": [5, 6, 7], "loss_mask": [False, True, True]}, {"input_ids": [8], "loss_mask": [True]}]
    batch = collate(examples, pad_id=0)
    assert batch.input_ids.dtype == torch.int64 and batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True], [True, False, False]]
    assert batch.attention_mask.tolist() == [[True, True, True], [True, False, False]]


def test_collate_pack_puts_documents_back_to_back():
    examples = [{"input_ids": [5, 6, 7], "loss_mask": [False, True, True]}, {"input_ids": [8], "loss_mask": [True]},
                {"input_ids": [9, 4], "loss_mask": [True, False]}]
    batch = collate(examples, pad_id=0, pack=True)
    assert batch.packed and not collate(examples, pad_id=0).packed
    assert batch.input_ids.dtype == torch.int64 and batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 4]]
    assert batch.loss_mask.tolist() == [[False, True, True, True, True, False]]
    assert batch.attention_mask.tolist() == [[True] * 6]
    assert batch.position_ids.dtype == torch.int64 and batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert batch.document_ids().tolist() == [[0, 0, 0, 1, 2, 2]]
    assert batch.document_lengths() == [3, 1, 2] == collate(examples, pad_id=0).document_lengths()


def test_pad_to_multiple_on_a_packed_batch_adds_a_padding_document():
    examples = [{"input_ids": [5, 6, 7], "loss_mask": [False, True, True]}, {"input_ids": [8], "loss_mask": [True]}]
    batch = collate(examples, pad_id=0, pack=True).pad_to_multiple(8, pad_id=2)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 2, 2, 2, 2]]
    assert batch.loss_mask.tolist() == [[False, True, True, True] + [False] * 4]
    assert batch.attention_mask.tolist() == [[True] * 4 + [False] * 4]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]  # HF sees a new document at the padding
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 8] and batch.cu_seqlens.dtype == torch.int32
    assert batch.document_ids().tolist() == [[0, 0, 0, 1, 2, 2, 2, 2]]
    assert batch.document_lengths() == [3, 1]  # real tokens only: the padding document is left out
    assert batch.pad_to_multiple(8, pad_id=2) is batch
    moved = batch.to("cpu")
    assert torch.equal(moved.position_ids, batch.position_ids) and torch.equal(moved.cu_seqlens, batch.cu_seqlens)
    padded = collate(examples, pad_id=0).pad_to_multiple(4, pad_id=0)
    assert padded.position_ids is None and padded.cu_seqlens is None and padded.document_ids() is None


def test_packing_keeps_the_examples_of_each_batch(tmp_path, tokenizer):
    ds, _ = build_dataset(DataConfig(path=str(write_data(tmp_path / "d.jsonl", 9))), tokenizer, tmp_path / "cache")
    kw = {"seed": 3, "epoch": 1, "shuffle": True, "pad_id": 0, "start": 1}
    for padded, packed in zip(batches(ds, 3, **kw), batches(ds, 3, pack=True, **kw), strict=True):
        assert torch.equal(padded.input_ids[padded.attention_mask], packed.input_ids[0])
        assert torch.equal(padded.loss_mask[padded.attention_mask], packed.loss_mask[0])
        assert packed.cu_seqlens.tolist() == [0, *padded.attention_mask.sum(1).cumsum(0).tolist()]


def test_batches_are_disjoint_across_ranks_and_seeded(tmp_path, tokenizer):
    ds, _ = build_dataset(DataConfig(path=str(write_data(tmp_path / "d.jsonl", 23))), tokenizer, tmp_path / "cache")
    first_tokens = {tuple(r): i for i, r in enumerate(ds["input_ids"])}
    assert len(first_tokens) == 23  # every row is distinct, so rows identify examples

    def rows(rank, world_size, epoch=0, seed=0, shuffle=True):
        out = []
        for b in batches(ds, 2, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size, pad_id=0):
            assert b.input_ids.shape[0] == 2
            for ids, attn in zip(b.input_ids, b.attention_mask):
                out.append(first_tokens[tuple(ids[attn].tolist())])
        return out

    per_rank = [rows(r, 3) for r in range(3)]
    assert all(len(r) == 2 * num_batches(23, 2, 3) == 6 for r in per_rank)
    assert len(set(sum(per_rank, []))) == 18  # disjoint; the ragged tail of 5 is dropped
    assert rows(1, 3) == per_rank[1]  # deterministic per (seed, epoch)
    assert rows(1, 3, epoch=1) != per_rank[1] and rows(1, 3, seed=5) != per_rank[1]
    assert rows(0, 1, shuffle=False) == list(range(22))
